"""What crosses between the host and the provider's device, counted on the CPU provider through the binding code a GPU
run takes (runtime/sessions.py `OrtGraph.transfers`): from pixels to logits only pixels, token ids, integer bookkeeping
(masks, positions, image starts, kept indices) and the logits. The image features, the merged embeddings, the hidden
states between segment 0, the pivot and segment 1, and the decode steps' embeddings stay device values.

Allowed floating-point host inputs: `pixel_values`, and `gqa_bias` (the decode graphs' additive mask, built per step on
the host; those graphs run on the CPU provider only: on a GPU the segment graphs decode). Allowed floating-point reads:
the logits, (B, vocab) or (B, 1, vocab), one per prefill and one per decode step.
"""

import numpy as np
import pytest

from conftest import QUESTIONS
from star_export.runtime.engine import Engine
from star_export.runtime.generate import Sampling

HOST_FLOAT_INPUTS = {"pixel_values", "gqa_bias"}


def _record(engine) -> list:
    log: list = []
    graphs = list(engine.graphs.values()) + list(engine.ops.graphs if engine.ops else ())
    for graph in graphs:
        graph.transfers = log
    return log


def _floating(log, direction):
    return [(name, shape) for d, name, dtype, shape in log if d == direction and np.dtype(dtype).kind == "f"]


def _check(log, vocab: int, steps: int) -> None:
    sent = [name for name, _ in _floating(log, "to_device")]
    assert set(sent) <= HOST_FLOAT_INPUTS and sent.count("pixel_values") == 1, sent
    read = [shape for _, shape in _floating(log, "to_host")]
    assert all(shape[-1] == vocab for shape in read), read  # logits only
    assert len(read) == 1 + steps, read


@pytest.mark.parametrize("decode_graphs", [True, False], ids=["decode-graphs", "segment-graphs"])
def test_only_pixels_ids_and_logits_cross(decode_engine, images, decode_graphs):
    engine = Engine.from_dir(decode_engine, provider="cpu", decode_graphs=decode_graphs)
    assert engine.ops is not None
    log = _record(engine)
    result = engine.generate(images[:2], QUESTIONS[:2], Sampling(max_new_tokens=5, stop_at_eos=False))
    _check(log, engine.embed_tokens.shape[0], steps=len(result.logits) - 1)
    assert any(d == "to_device" and name == "input_ids" for d, name, *_ in log)  # the count does see the binding


def test_the_count_catches_a_merge_on_the_host(tiny_engine, images):
    """The same run with the merge and lookup done in NumPy (the image features read on the host, every step's
    embeddings sent): the check fails."""
    from star_export.runtime.device_ops import HostOps

    engine = Engine.from_dir(tiny_engine, provider="cpu")
    engine.pipeline.ops = HostOps(engine.embed_tokens, engine.pipeline.np_dtype)
    log = _record(engine)
    engine.generate(images[:1], QUESTIONS[:1], Sampling(max_new_tokens=3, stop_at_eos=False))
    with pytest.raises(AssertionError):
        _check(log, engine.embed_tokens.shape[0], steps=2)


def test_device_and_host_merge_agree(tiny_engine, images):
    """DeviceOps' merge and lookup equal the NumPy ones exactly (a gather and a select), on a left-padded batch."""
    from star_export.runtime.device_ops import HostOps

    engine = Engine.from_dir(tiny_engine, provider="cpu")
    inputs = engine.prepare(images[:2], QUESTIONS[:2])
    features = engine.graphs["vision"].run({"pixel_values": inputs["pixel_values"]})["image_features"]
    host = HostOps(engine.embed_tokens, engine.pipeline.np_dtype)
    got = engine.pipeline.merge(inputs["input_ids"], inputs["attention_mask"], features)
    engine.pipeline.ops = host
    want = engine.pipeline.merge(inputs["input_ids"], inputs["attention_mask"], features)
    assert np.array_equal(engine.graphs["vision"].to_numpy(got[0]), want[0])
    assert all(np.array_equal(g, w) for g, w in zip(got[1:], want[1:]))
    ids = np.array([[3], [7]])
    assert np.array_equal(engine.graphs["vision"].to_numpy(engine.ops.embed(ids)), host.embed(ids))
