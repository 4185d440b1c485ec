"""The layer-streamed validator (large models) and the one-graph-at-a-time engine, on tiny-llava.

The modes are forced here (`mode=`); on a 7B model the memory plan chooses them (memory.VALIDATION_MODES)."""

from __future__ import annotations

import json

import pytest
import torch

from star_export.config import StarSchedule
from star_export.config import WeightScheme
from star_export.memory import VALIDATION_MODES, memory_plan
from star_export.memory import release_pages
from star_export.validate.streaming import Streamer, streamed_pipeline
from star_export.validate import validate_engine


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from star_export.build import export_engine

    root = tmp_path_factory.mktemp("streamed")
    made = {}
    for kind, dtype in (("float", "float32"), ("float", "float16"), ("int4", "float32")):
        out = root / f"{kind}-{dtype}"
        export_engine(model="tiny-llava", keep=16, out=out, dtype=dtype, weights=WeightScheme(kind, block_size=32), validate=False, show_progress=False)
        made[kind, dtype] = out
    return made


@pytest.mark.parametrize("kind,dtype,mode", [("float", "float32", "streamed"), ("float", "float32", "streamed-lazy"),
                                             ("float", "float16", "streamed-lazy"), ("int4", "float32", "streamed")])
def test_streamed_validation_passes_correct_engines(engines, tiny, kind, dtype, mode):
    report = validate_engine(engines[kind, dtype], loaded=tiny, mode=mode)
    assert report.ok, report.table()
    names = [c.name for c in report.checks]
    assert any("stage1_indices" in n for n in names) and any("stage2_indices" in n for n in names)
    assert any("logits" in n for n in names) and any("greedy tokens" in n for n in names)
    assert any("layer-streamed" in n for n in report.notes)
    if dtype == "float16":
        assert any("ratio of unit roundoffs" in n for n in report.notes)
    if kind == "int4":
        assert report.quality


def test_streamed_validation_fails_a_wrong_engine(engines, tiny, tmp_path):
    """Planted defect: the int4 engine's star.json claims another block size than its weights were packed with."""
    import shutil

    from star_export.manifest import MANIFEST

    bad = tmp_path / "bad"
    shutil.copytree(engines["int4", "float32"], bad)
    m = json.loads((bad / MANIFEST).read_text())
    m["weights"]["block_size"] = 16
    (bad / MANIFEST).write_text(json.dumps(m))
    assert not validate_engine(bad, loaded=tiny, mode="streamed").ok


def test_streamer_restores_the_model(tiny):
    """Weights, buffers and dtypes are as loaded after a streamed float64 run, and the hooks are gone."""
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    schedule = StarSchedule.from_spec(tiny.spec, keep=16, defaults=tiny.defaults)
    from star_export.runtime.inputs import prepare_inputs, synthetic_image
    from star_export.runtime.generate import Sampling

    inputs = prepare_inputs(tiny.processor, [synthetic_image(1)], ["What is in the image?"])
    with Streamer(tiny.model) as streamer:
        gen = streamed_pipeline(tiny, schedule, streamer, "float64").generate(
            inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], Sampling(max_new_tokens=2))
        assert gen.logits[0].dtype == "float64"
    after = tiny.model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert not any(m._forward_pre_hooks for m in tiny.model.modules())
    assert tiny.model.config._attn_implementation == "eager"
    assert all(type(m).__name__ != "WideRMSNorm" for m in tiny.model.modules())


def test_release_pages_never_loses_data():
    """madvise(MADV_PAGEOUT) on anonymous memory (no swap here) and on a mapped file keeps every value."""
    t = torch.randn(1 << 20)
    copy = t.clone()
    release_pages(t)
    assert torch.equal(t, copy)


def test_memory_plan_picks_the_most_thorough_mode_that_fits(tiny):
    schedule = StarSchedule.from_spec(tiny.spec, keep=16, defaults=tiny.defaults)
    plan = memory_plan(tiny.spec, schedule, "float32")
    assert plan.validation_mode(1 << 40) == "whole"
    need = plan.validation_bytes
    assert need["streamed"] >= need["streamed-lazy"]
    assert plan.validation_mode(need["streamed-lazy"]) in VALIDATION_MODES
    assert plan.validation_mode(min(need.values()) - 1) is None
    from star_export.models import spec_from_name

    spec, defaults = spec_from_name("llava-1.5-7b")  # 7B float16: only one graph at a time fits 24 GB
    big = memory_plan(spec, StarSchedule.from_spec(spec, keep=58, defaults=defaults), "float16")
    assert big.validation_mode(22 << 30) == "streamed-lazy" and big.validation_mode(200 << 30) == "whole"


def test_lazy_graphs_equal_the_engine_bitwise(engines):
    """LazyOrtGraph creates its sessions without constant folding (the 7B float16 peak): every graph of a float16
    engine must still give exactly what star-run's sessions give."""
    import numpy as np

    from star_export.runtime.engine import Engine
    from star_export.runtime.generate import Sampling
    from star_export.runtime.inputs import synthetic_image

    runs = []
    for lazy in (False, True):
        engine = Engine(engines["float", "float16"], provider="cpu", lazy=lazy)
        assert all(type(g).__name__ == ("LazyOrtGraph" if lazy else "OrtGraph") for g in engine.graphs.values())
        runs.append(engine.generate([synthetic_image(3)], ["Describe the picture."], Sampling(max_new_tokens=4, stop_at_eos=False)))
    folded, unfolded = runs
    assert folded.token_ids == unfolded.token_ids
    np.testing.assert_array_equal(folded.stage1_indices, unfolded.stage1_indices)
    np.testing.assert_array_equal(folded.stage2_indices, unfolded.stage2_indices)
    for a, b in zip(folded.logits, unfolded.logits):
        np.testing.assert_array_equal(a, b)
