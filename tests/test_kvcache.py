"""runtime/kvcache.py: the decode step writes its caches in place (runtime/kvcache.py).

The engine's segments read the cache buffers where they lie and return only the new positions; checked here on
the tiny engine: no buffer is replaced or copied while a request stays within its reserved room; running out of
room (growth), joining rows and taking rows out give the logits a request gets alone, fully reserved.
"""

import numpy as np
import pytest

from conftest import QUESTIONS
from star_export.runtime import batch as rows_of
from star_export.runtime.engine import Engine

ATOL = 1e-5  # fp32 logits, absolute: the same computation over a buffer with more masked (zero) slots

# The engine's segment graphs (they return the new keys and values, which `append` writes), and its ONNX Runtime decode
# graphs (GroupQueryAttention writes them into the buffers itself, runtime/decode.py).
PATHS = {"segments": ("tiny_engine", ("segment0", "segment1")), "decode graphs": ("decode_engine", ("decode0", "decode1"))}


@pytest.fixture(params=list(PATHS))
def path(request):
    fixture, graphs = PATHS[request.param]
    return request.getfixturevalue(fixture), graphs


def _inputs(engine, images, rows):
    return engine.prepare([images[i] for i in rows], [QUESTIONS[i] for i in rows])


def _decode(pipe, state, steps):
    logits = [state.logits]
    for _ in range(steps):
        state = pipe.step(state, state.logits.argmax(-1))
        logits.append(state.logits)
    return state, logits


def test_steps_write_in_place_within_the_reserve(path, images):
    engine_dir, graphs = path
    engine = Engine.from_dir(engine_dir, provider="cpu")
    pipe, inp = engine.pipeline, _inputs(engine, images, [0])
    state, _ = pipe.prefill(inp["pixel_values"], inp["input_ids"], inp["attention_mask"], reserve=6)
    buffers = {name: b for c in (state.cache0, state.cache1) for name, b in c.buffers.items()}
    seen = []  # what the segment graphs are fed: the very buffers, not copies
    for name in graphs:
        graph = pipe.graphs[name]
        real = graph.run
        graph.run = lambda feed, real=real: (seen.extend(v for k, v in feed.items() if k.startswith("past_key_values.")), real(feed))[1]
    try:
        state, _ = _decode(pipe, state, 6)
    finally:
        for name in graphs:
            del pipe.graphs[name].run
    assert all(any(v is b for b in buffers.values()) for v in seen) and len(seen) == 6 * len(buffers)
    after = {name: b for c in (state.cache0, state.cache1) for name, b in c.buffers.items()}
    assert all(after[n] is buffers[n] for n in buffers)  # never reallocated
    assert state.cache0.length == state.cache0.capacity  # the reserve is exactly used up


def test_growth_join_and_take_equal_a_request_alone(path, images):
    engine = Engine.from_dir(path[0], provider="cpu")
    assert all(name in engine.graphs for name in path[1])
    pipe = engine.pipeline
    inp = {row: _inputs(engine, images, [row]) for row in range(len(QUESTIONS))}
    by_length = sorted(inp, key=lambda row: -int(inp[row]["attention_mask"].sum()))
    first, second = by_length[0], by_length[-1]  # the longer prompt starts first, so the later one is left padded
    assert inp[first]["attention_mask"].sum() > inp[second]["attention_mask"].sum()
    alone = {}
    for row in (first, second):
        state, _ = pipe.prefill(inp[row]["pixel_values"], inp[row]["input_ids"], inp[row]["attention_mask"], reserve=12)
        alone[row] = _decode(pipe, state, 12)[1]
    # `first` without room (grows), joined by `second` after 3 steps, then taken out 4 steps later.
    s0, _ = pipe.prefill(inp[first]["pixel_values"], inp[first]["input_ids"], inp[first]["attention_mask"], reserve=0)
    s0, got0 = _decode(pipe, s0, 3)
    s1, _ = pipe.prefill(inp[second]["pixel_values"], inp[second]["input_ids"], inp[second]["attention_mask"], reserve=12)
    both = rows_of.concat([s0, s1])
    got1 = [both.logits[1]]
    for _ in range(4):
        both = pipe.step(both, both.logits.argmax(-1))
        got0.append(both.logits[0])
        got1.append(both.logits[1])
    only1 = rows_of.take(both, [1])
    assert only1.cache1.length < both.cache1.length  # the longer row's slots no longer pad this one
    only1, rest = _decode(pipe, only1, 3)
    got1 += rest[1:]
    for got, want in ((got0, alone[first]), (got1, alone[second])):
        for s, g in enumerate(got):
            assert np.abs(np.asarray(g).reshape(-1) - want[s].reshape(-1)).max() <= ATOL, s
