"""Rows of decode state joined into one batch and taken out of it: in-flight (continuous) batching.

Every row carries two KV caches of its own length (segment 0: n + t, segment 1: n' + t). Rows are merged by padding
each cache and its attention mask on the left to the longest row (kvcache.concat); the padded slots are masked out,
and positions are explicit per row (`next_pos`), so a row computes what it computes alone. Rows leave by selection;
slots that are padding in every remaining row are then dropped, so a batch never stays as long as a row that has left.
Both copy the caches once; the decode steps between them write in place.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from . import kvcache
from .generate import DecodeState


def concat(states: Sequence[DecodeState]) -> DecodeState:
    """Rows of several states as one batch, in order."""
    if len(states) == 1:
        return states[0]
    return DecodeState(
        cache0=kvcache.concat([s.cache0 for s in states]),
        cache1=kvcache.concat([s.cache1 for s in states]),
        next_pos=np.concatenate([s.next_pos for s in states]),
        logits=np.concatenate([s.logits for s in states]),
    )


def take(state: DecodeState, rows: Sequence[int]) -> DecodeState:
    """Rows `rows` of a state, without the leading slots that are padding in all of them."""
    rows = np.asarray(rows, dtype=np.int64)
    return DecodeState(
        cache0=kvcache.take(state.cache0, rows),
        cache1=kvcache.take(state.cache1, rows),
        next_pos=state.next_pos[rows],
        logits=state.logits[rows],
    )
