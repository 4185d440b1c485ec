"""One segment's key/value caches in buffers allocated once and written in place.

A segment graph reads every layer's cache as it is, `(B, kv_heads, capacity, head_dim)`, and returns only the keys
and values of the tokens it was given (`new_key_values.{i}.*`, `(B, kv_heads, q, head_dim)`); `append` writes those
into the next free slots. A decode step therefore copies one position per layer, not the whole cache. Free slots
(past `length`) are zeros and masked out, so a graph reads the whole buffer, free slots included: room is therefore
made `GROWTH` slots at a time (never more than the request may still generate), one copy of the cache per `GROWTH`
steps instead of one per step, and at most `GROWTH - 1` masked slots read per step.

All rows of a batch share `length`: a shorter row is left padded, its padding slots masked out, as a prefill batch
already is. Buffers are numpy arrays when the graphs run on the host (zero-copy inputs for ONNX Runtime's CPU
provider and for torch), and torch tensors on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

GROWTH = 64  # slots of room made at a time: a copy of the cache every 64 steps, at most 63 free slots read per step
PAST = "past_key_values."
NEW = "new_key_values."


def _zeros_like(buffer, shape):
    if isinstance(buffer, np.ndarray):
        return np.zeros(shape, buffer.dtype)
    import torch

    return torch.zeros(shape, dtype=buffer.dtype, device=buffer.device)


def zeros(shape, dtype: np.dtype, device: str):
    """A zeroed buffer where a graph on `device` reads it without a copy."""
    if device == "cpu":
        return np.zeros(shape, dtype)
    import torch

    return torch.zeros(shape, dtype=getattr(torch, np.dtype(dtype).name), device=device)


def _same_kind(value, buffer, to_numpy: Callable[[Any], np.ndarray]):
    """A graph output (numpy, torch or ORT value) as the buffer's kind, for a slice assignment."""
    if isinstance(buffer, np.ndarray):
        return to_numpy(value)
    import torch

    if torch.is_tensor(value):
        return value
    return torch.from_numpy(np.ascontiguousarray(to_numpy(value))).to(buffer.device)


def _rows_from(buffer, rows: np.ndarray, start: int):
    """Slots `start ..` of rows `rows`: one new contiguous buffer (the row selection copies; nothing else does)."""
    if isinstance(buffer, np.ndarray):
        return np.ascontiguousarray(buffer[rows, :, start:])
    import torch

    return buffer[torch.as_tensor(rows, device=buffer.device), :, start:].contiguous()


@dataclass
class KVCache:
    """`buffers`: `past_key_values.{i}.key|value` -> (B, kv_heads, capacity, head_dim); `mask` (B, capacity) int64, 1 on
    slots that hold a real token; slots `length ..` are free in every row."""

    buffers: dict[str, Any]
    mask: np.ndarray
    length: int

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]

    @classmethod
    def from_prefill(
        cls, new: dict[str, Any], mask: np.ndarray, reserve: int, dtype, device: str, to_numpy
    ) -> "KVCache":
        """The cache after a prefill: the graph's `new_key_values.*` (B, kv_heads, n, head_dim) for the n tokens of
        `mask` (B, n), with room for the next `reserve` tokens (up to `GROWTH` of them; more is made as needed)."""
        batch, n = mask.shape
        capacity = n + min(max(reserve, 1), GROWTH)
        buffers = {}
        for name, value in new.items():
            shape = tuple(int(d) for d in _shape(value, to_numpy))
            buffers[PAST + name[len(NEW) :]] = zeros((shape[0], shape[1], capacity, shape[3]), dtype, device)
        cache = cls(buffers, np.zeros((batch, capacity), np.int64), 0)
        cache.append(new, mask, to_numpy)
        return cache

    def attention_mask(self, q: int) -> np.ndarray:
        """The mask of `[cache | q new tokens]` (B, capacity + q) for a call that reads the whole buffer."""
        return np.concatenate([self.mask, np.ones((len(self.mask), q), np.int64)], 1)

    def append(self, new: dict[str, Any], mask: np.ndarray, to_numpy) -> None:
        """Write a call's `new_key_values.*` (q positions) into slots `length .. length + q - 1`."""
        q = mask.shape[1]
        self.make_room(q)
        end = self.length + q
        for name, value in new.items():
            buffer = self.buffers[PAST + name[len(NEW) :]]
            buffer[:, :, self.length : end] = _same_kind(value, buffer, to_numpy)
        self.advance(mask)

    def advance(self, mask: np.ndarray) -> None:
        """Mark the next `q` slots filled (`mask` (B, q)): written by `append`, or by a graph that writes its new slots
        into the buffers itself (after `make_room`)."""
        end = self.length + mask.shape[1]
        if end > self.capacity:
            raise ValueError(f"{end} slots filled in a cache of {self.capacity}: make room first")
        self.mask[:, self.length : end] = mask
        self.length = end

    def make_room(self, q: int) -> None:
        """At least `q` free slots: for a graph that writes its new slots into the buffers itself."""
        if self.length + q > self.capacity:
            self._grow(self.length + q)

    def _grow(self, needed: int) -> None:
        capacity = needed + GROWTH - 1
        for name, buffer in self.buffers.items():
            grown = _zeros_like(buffer, (*buffer.shape[:2], capacity, buffer.shape[3]))
            grown[:, :, : self.length] = buffer[:, :, : self.length]
            self.buffers[name] = grown
        mask = np.zeros((len(self.mask), capacity), np.int64)
        mask[:, : self.length] = self.mask[:, : self.length]
        self.mask = mask

    def nbytes(self) -> int:
        """Bytes of the filled slots (what the cache holds, not what is reserved)."""
        return sum(int(np.prod(b.shape[:2])) * self.length * b.shape[3] * _itemsize(b) for b in self.buffers.values())


def _shape(value, to_numpy):
    shape = getattr(value, "shape", None)
    return shape() if callable(shape) else (shape if shape is not None else to_numpy(value).shape)


def _itemsize(buffer) -> int:
    return buffer.itemsize if isinstance(buffer, np.ndarray) else buffer.element_size()


def concat(caches: Sequence[KVCache]) -> KVCache:
    """Rows of several caches as one batch, in order: each left padded to the longest `length`, with the largest room
    left by any of them."""
    length = max(c.length for c in caches)
    room = max(c.capacity - c.length for c in caches)
    batch = sum(len(c.mask) for c in caches)
    first = caches[0]
    buffers = {
        name: _zeros_like(b, (batch, b.shape[1], length + room, b.shape[3])) for name, b in first.buffers.items()
    }
    mask = np.zeros((batch, length + room), np.int64)
    row = 0
    for c in caches:
        rows, start = slice(row, row + len(c.mask)), length - c.length
        for name, b in c.buffers.items():
            buffers[name][rows, :, start:length] = b[:, :, : c.length]
        mask[rows, start:length] = c.mask[:, : c.length]
        row += len(c.mask)
    return KVCache(buffers, mask, length)


def take(cache: KVCache, rows: Sequence[int]) -> KVCache:
    """Rows `rows`, without the leading slots that are padding in all of them."""
    rows = np.asarray(rows, dtype=np.int64)
    mask = cache.mask[rows]
    start = int((mask[:, : cache.length] > 0).argmax(-1).min())  # every row holds at least its prompt
    buffers = {name: _rows_from(b, rows, start) for name, b in cache.buffers.items()}
    return KVCache(buffers, np.ascontiguousarray(mask[:, start:]), cache.length - start)
