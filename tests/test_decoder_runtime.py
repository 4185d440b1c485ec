"""The two-segment decoder (segment 0 + pivot + segment 1) in ONNX Runtime, generating with two
KV caches, against the eager reference, and at keep = 576 against the unmodified HF model."""

import numpy as np
import pytest
import torch

from conftest import QUESTIONS
from star_export.config import StarSchedule
from star_export.export.onnx_export import export_onnx
from star_export.export.trt_rules import check_tensorrt_rules
from star_export.flops import plan
from star_export.graphs.stages import decoder_layout
from star_export.validate.reference import reference_pipeline
from star_export.runtime.generate import Sampling, StarPipeline
from star_export.runtime.inputs import prepare_inputs
from star_export.runtime.sessions import OrtGraph

LOGITS_ATOL = 1e-4  # fp32, first step (measured ~1e-5)
NEW_TOKENS = 32


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    """Exported graphs, cached: segments per (model, pivot), vision per k1, pivot per (k1, keep)."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("exports")

    def get(name, loaded, schedule):
        key = {"vision": (schedule.stage1_keep,), "pivot": (schedule.stage1_keep, schedule.keep)}.get(name, (schedule.pivot_layer,))
        key = (id(loaded), name, *key)
        if key not in cache:
            out = root / "_".join(map(str, key))
            path = export_onnx(loaded, schedule, out, graphs=[name])[name].path
            assert check_tensorrt_rules(path) == [], name
            cache[key] = OrtGraph(path)
        return cache[key]

    def pipeline(loaded, schedule):
        graphs = {n: get(n, loaded, schedule) for n in ("vision", "segment0", "pivot", "segment1")}
        embed = loaded.model.get_input_embeddings().weight.detach().numpy()
        return StarPipeline(graphs, embed, schedule, decoder_layout(loaded))

    return pipeline


def _run(pipe, inputs, rows=None, n=NEW_TOKENS):
    sel = slice(None) if rows is None else rows
    return pipe.generate(inputs["pixel_values"][sel], inputs["input_ids"][sel], inputs["attention_mask"][sel], Sampling(max_new_tokens=n))


def _unpad(inputs, row):
    """Row `row` as its own batch-1 request (left padding removed)."""
    keep = inputs["attention_mask"][row] > 0
    return {"pixel_values": inputs["pixel_values"][row : row + 1], "input_ids": inputs["input_ids"][row : row + 1, keep], "attention_mask": inputs["attention_mask"][row : row + 1, keep]}


@pytest.mark.parametrize("keep", [576, 288, 58, 29])
def test_engine_equals_reference(any_model, images, exports, keep):
    schedule = StarSchedule.from_spec(any_model.spec, keep=keep, defaults=any_model.defaults)
    inputs = prepare_inputs(any_model.processor, images[:3], QUESTIONS)
    assert len(set(inputs["attention_mask"].sum(-1).tolist())) == 3, "prompts of different lengths"
    engine = exports(any_model, schedule)
    got = _run(engine, inputs)
    ref = _run(reference_pipeline(any_model, schedule), inputs)
    np.testing.assert_array_equal(got.stage1_indices, ref.stage1_indices)
    np.testing.assert_array_equal(got.stage2_indices, ref.stage2_indices)
    assert got.stage2_indices.shape == (3, keep)
    assert np.abs(got.logits[0] - ref.logits[0]).max() <= LOGITS_ATOL
    assert got.token_ids == ref.token_ids
    assert got.seq_lens["segment1"] == got.seq_lens["segment0"] - schedule.stage1_keep + keep
    # batch 3 with different prompt lengths equals the three batch-1 runs
    for row in range(3):
        single = _run(engine, _unpad(inputs, row))
        assert single.token_ids[0] == got.token_ids[row]
        np.testing.assert_array_equal(single.stage1_indices[0], got.stage1_indices[row])
        np.testing.assert_array_equal(single.stage2_indices[0], got.stage2_indices[row])
        assert np.abs(single.logits[0][0] - got.logits[0][row]).max() <= LOGITS_ATOL


def test_full_budget_equals_hf_generate(any_model, images, exports):
    """keep = k1 = 576: the engine reproduces the unmodified Hugging Face model's greedy generate."""
    schedule = StarSchedule.from_spec(any_model.spec, keep=576, defaults=any_model.defaults)
    assert schedule.is_identity
    inputs = prepare_inputs(any_model.processor, images[:2], QUESTIONS[:2])
    got = _run(exports(any_model, schedule), inputs, n=16)
    with torch.no_grad():
        hf = any_model.model.generate(
            **{k: torch.from_numpy(v) for k, v in inputs.items()}, max_new_tokens=16, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    new = hf.sequences[:, inputs["input_ids"].shape[1] :].tolist()
    for row in range(2):
        n = len(got.token_ids[row])
        assert got.token_ids[row] == new[row][:n]
    assert np.abs(got.logits[0] - hf.logits[0].numpy()).max() <= LOGITS_ATOL


@pytest.mark.parametrize("keep", [576, 58])
def test_kv_bytes_after_prefill_equal_the_plan(any_model, images, exports, keep):
    schedule = StarSchedule.from_spec(any_model.spec, keep=keep, defaults=any_model.defaults)
    inputs = prepare_inputs(any_model.processor, images[:1], QUESTIONS[:1])
    got = _run(exports(any_model, schedule), inputs, n=1)
    text_tokens = int(inputs["attention_mask"].sum()) - any_model.spec.num_vision_tokens
    predicted = plan(any_model.spec, schedule, text_tokens).kv_cache_bytes_per_sequence["float32"]["star"]
    assert got.kv_bytes_after_prefill == predicted


def test_sampling_is_seeded(tiny, images, exports):
    schedule = StarSchedule.from_spec(tiny.spec, keep=58, defaults=tiny.defaults)
    inputs = prepare_inputs(tiny.processor, images[:2], QUESTIONS[:2])
    pipe = exports(tiny, schedule)
    sampling = Sampling(max_new_tokens=12, temperature=0.9, top_p=0.8, seed=5)
    a = pipe.generate(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], sampling)
    b = pipe.generate(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], sampling)
    c = pipe.generate(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], Sampling(max_new_tokens=12, temperature=0.9, top_p=0.8, seed=6))
    greedy = pipe.generate(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], Sampling(max_new_tokens=12))
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids and a.token_ids != greedy.token_ids
