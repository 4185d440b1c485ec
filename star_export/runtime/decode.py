"""The ONNX Runtime decode graphs (export/decode_graphs.py) as `StarPipeline.step` runs them.

A decode graph's attention is `GroupQueryAttention`: each layer's cache buffer is its past and its present (bound to the
same memory), and GQA writes the step's key and value at slot `gqa_seqlens_k` itself; the caller then marks that slot
filled (`KVCache.advance`). Only the `length` filled slots and the new one are read; `gqa_bias` masks a row's padding
among them (rows of a batch are left padded to a shared `length`, kvcache.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .generate import CACHE_LENGTH
from .kvcache import NEW, PAST
from .sessions import OrtGraph


class DecodeGraph(OrtGraph):
    """One decode graph on the CPU provider: one new token per row, caches written in place."""

    def run(self, feed: dict[str, Any]) -> dict[str, Any]:
        mask = np.asarray(feed["attention_mask"])  # (B, capacity + 1): the cache's slots, then the new token
        length = int(feed[CACHE_LENGTH])
        if np.asarray(feed["position_ids"]).shape[1] != 1:
            raise ValueError("a decode graph runs one new token per row")
        if length + 1 > mask.shape[1] - 1:
            raise ValueError(
                f"no free slot for the new key and value ({length} of {mask.shape[1] - 1} filled): make room first"
            )
        own = np.concatenate([mask[:, :length], mask[:, -1:]], 1)
        return super().run(
            feed
            | {
                "gqa_seqlens_k": np.full(len(mask), length, np.int32),
                "gqa_total": np.array(length + 1, np.int32),
                "gqa_bias": np.where(own > 0, 0, np.finfo(np.float32).min).astype(np.float32)[:, None, None, :],
            }
        )

    def _bind_output(self, binding, name: str, feed: dict[str, Any]) -> None:
        if name.startswith("present."):  # the buffer fed as past: GQA writes the new slot into it
            buffer = feed[PAST + name[len("present.") :]]
            binding.bind_output(name, "cpu", 0, buffer.dtype, buffer.shape, buffer.ctypes.data)
        else:
            super()._bind_output(binding, name, feed)


class AsSegment:
    """A decode graph called like its segment graph, for the validator: on a segment's decode feed (whose cache holds
    `length` filled slots, the last of them filled in some row) it runs on copies of the caches with one free slot and
    returns the graph's outputs with the slot GQA wrote as `new_key_values.*`."""

    def __init__(self, graph: DecodeGraph):
        self.graph, self.device, self.provider = graph, graph.device, graph.provider
        self.to_numpy, self.nbytes = graph.to_numpy, graph.nbytes

    def run(self, feed: dict[str, Any]) -> dict[str, Any]:
        mask = np.asarray(feed["attention_mask"])
        length = int(np.flatnonzero(mask[:, :-1].any(0)).max()) + 1
        caches = {}
        for name, value in feed.items():
            if name.startswith(PAST):
                value = np.asarray(value)
                caches[name] = np.zeros((*value.shape[:2], length + 1, value.shape[3]), value.dtype)
                caches[name][:, :, :length] = value[:, :, :length]
        mask = np.concatenate([mask[:, :length], np.zeros((len(mask), 1), mask.dtype), mask[:, -1:]], 1)
        out = {
            k: self.to_numpy(v)
            for k, v in self.graph.run(feed | caches | {"attention_mask": mask, CACHE_LENGTH: length}).items()
        }
        new = {
            NEW + k[len("present.") :]: caches[PAST + k[len("present.") :]][:, :, length : length + 1]
            for k in out
            if k.startswith("present.")
        }
        return {k: v for k, v in out.items() if not k.startswith("present.")} | new
