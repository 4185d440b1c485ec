"""Rows of decode state joined into one batch and taken out of it: in-flight (continuous) batching.

Every row carries two KV caches of its own length (segment 0: n + t, segment 1: n' + t). Rows are merged by padding
each cache and its attention mask on the left to the longest row; the padded slots are masked out, and positions are
explicit per row (`next_pos`), so a row computes what it computes alone. Rows leave by selection; columns that are
padding in every remaining row are then dropped, so a batch never stays as long as a row that has left.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from .generate import DecodeState

ToNumpy = Callable[[Any], np.ndarray]


def _pad_left(a: np.ndarray, length: int, axis: int) -> np.ndarray:
    pad = [(0, 0)] * a.ndim
    pad[axis] = (length - a.shape[axis], 0)
    return np.pad(a, pad) if pad[axis][0] else a


def host(state: DecodeState, to_numpy: tuple[ToNumpy, ToNumpy]) -> DecodeState:
    """The state with both caches as numpy arrays (ORT values are read from the provider's memory)."""
    seg0, seg1 = to_numpy
    return DecodeState(
        past0={k: seg0(v) for k, v in state.past0.items()},
        past1={k: seg1(v) for k, v in state.past1.items()},
        mask0=state.mask0, mask1=state.mask1, next_pos=state.next_pos, logits=state.logits,
    )


def concat(states: Sequence[DecodeState]) -> DecodeState:
    """Rows of host states (see `host`) as one batch, in order: caches and masks left padded to the longest row."""
    if len(states) == 1:
        return states[0]

    def merged(past_of, mask_of):
        length = max(mask_of(s).shape[1] for s in states)
        past = {k: np.concatenate([_pad_left(past_of(s)[k], length, 2) for s in states]) for k in past_of(states[0])}
        return past, np.concatenate([_pad_left(mask_of(s), length, 1) for s in states])

    past0, mask0 = merged(lambda s: s.past0, lambda s: s.mask0)
    past1, mask1 = merged(lambda s: s.past1, lambda s: s.mask1)
    return DecodeState(
        past0=past0, past1=past1, mask0=mask0, mask1=mask1,
        next_pos=np.concatenate([s.next_pos for s in states]), logits=np.concatenate([s.logits for s in states]),
    )


def take(state: DecodeState, rows: Sequence[int]) -> DecodeState:
    """Rows `rows` of a host state, without the leading columns that are padding in all of them."""
    rows = np.asarray(rows, dtype=np.int64)

    def kept(past, mask):
        mask = mask[rows]
        start = int((mask > 0).argmax(-1).min())  # every row holds at least its prompt, so some column is real
        return {k: np.ascontiguousarray(v[rows][:, :, start:]) for k, v in past.items()}, np.ascontiguousarray(mask[:, start:])

    past0, mask0 = kept(state.past0, state.mask0)
    past1, mask1 = kept(state.past1, state.mask1)
    return DecodeState(past0=past0, past1=past1, mask0=mask0, mask1=mask1, next_pos=state.next_pos[rows], logits=state.logits[rows])
