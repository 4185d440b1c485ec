"""The vision graph (CLIP to the feature layer + STAR stage 1 + projector) exported to ONNX,
against the eager reference module, with ONNX Runtime on the CPU."""

import dataclasses
import time

import numpy as np
import pytest
import torch

from helpers import assert_graph_parity
from star_export.config import ModelSpec, StarSchedule
from star_export.export.onnx_export import export_onnx
from star_export.export.trt_rules import check_tensorrt_rules
from star_export.models import LoadedModel, build_random_llava
from star_export.graphs.stages import graph_modules
from star_export.runtime.inputs import prepare_inputs, synthetic_image
from star_export.runtime.sessions import OrtGraph
from star_export.testing import real_width_spec

# fp32: ORT and torch differ by summation order (measured <= 3.2e-7 at CLIP-L widths).
# fp16: measured 2.5e-4 at CLIP-L widths = one fp16 ulp at the features' magnitude (~0.29); we allow 1e-3 (4 ulps).
FEATURE_ATOL = {"float32": 1e-4, "float16": 1e-3}


@pytest.fixture(scope="session")
def clip_l():
    """Real CLIP-L/14-336 widths (1024 wide, 16 heads, 4096 MLP), 3 layers; a small decoder (unused here)."""
    spec = dataclasses.replace(real_width_spec(vision_layers=3, text_layers=2), hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=4)
    model, processor = build_random_llava(spec, seed=3)
    return LoadedModel(model, processor, ModelSpec.from_hf(model.config), {})


def _pixels(loaded, batch):
    return prepare_inputs(loaded.processor, [synthetic_image(i) for i in range(batch)], ["Describe."] * batch)["pixel_values"]


def _export_vision(loaded, k1, tmp_path, dtype="float32"):
    schedule = StarSchedule.from_spec(loaded.spec, keep=min(58, k1), stage1_keep=k1, pivot_layer=0)
    exported = export_onnx(loaded, schedule, tmp_path, dtype=dtype, graphs=["vision"])["vision"]
    return schedule, exported


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("which", ["tiny", "clip_l"])
def test_vision_onnx_matches_eager(which, dtype, request, tmp_path):
    loaded = request.getfixturevalue(which)
    schedule, exported = _export_vision(loaded, 490, tmp_path, dtype)
    module = graph_modules(loaded, schedule)["vision"][0]
    session = OrtGraph(exported.path)
    assert check_tensorrt_rules(exported.path) == []
    for batch in (1, 4):
        pixels = _pixels(loaded, batch)
        got = {k: session.to_numpy(v) for k, v in session.run({"pixel_values": pixels.astype(dtype)}).items()}
        with torch.no_grad():
            features, indices = module(torch.from_numpy(pixels))
        assert got["stage1_indices"].shape == (batch, 490)
        np.testing.assert_array_equal(got["stage1_indices"], indices.numpy())  # exact before values are compared
        assert np.all(np.diff(got["stage1_indices"], axis=1) > 0), "kept patches must stay in patch order"
        diff = np.abs(got["image_features"].astype(np.float32) - features.numpy())
        assert diff.max() <= FEATURE_ATOL[dtype], f"{which} {dtype} batch {batch}: max abs {diff.max():.3e} mean {diff.mean():.3e}"
        assert_graph_parity(loaded, schedule, "vision", session, {"pixel_values": pixels}, dtype)  # the validator's rule, every output


def test_full_budget_is_identity_and_equals_llava_features(tiny, tmp_path):
    """k1 = 576: every patch, in order, and features equal HF LLaVA's own `get_image_features`."""
    _, exported = _export_vision(tiny, 576, tmp_path)
    pixels = _pixels(tiny, 2)
    got = OrtGraph(exported.path).run({"pixel_values": pixels})
    np.testing.assert_array_equal(got["stage1_indices"].numpy(), np.tile(np.arange(576), (2, 1)))
    with torch.no_grad():
        hf = tiny.model.model.get_image_features(
            pixel_values=torch.from_numpy(pixels),
            vision_feature_layer=tiny.model.config.vision_feature_layer,
            vision_feature_select_strategy=tiny.model.config.vision_feature_select_strategy,
        ).pooler_output
    hf = torch.stack(list(hf)).numpy()
    assert np.abs(got["image_features"].numpy() - hf).max() <= 1e-4


def test_tiny_export_is_fast_and_reports_size(tiny, tmp_path):
    """The issue asks the tiny vision export to stay within a few seconds (measured 2.3-2.7 s on 2 cores);
    the bound is loose so that only a real regression (e.g. a slow exporter path) trips it."""
    t = time.perf_counter()
    _, exported = _export_vision(tiny, 490, tmp_path)
    assert time.perf_counter() - t < 15
    assert exported.seconds > 0 and exported.bytes == sum(p.stat().st_size for p in tmp_path.glob("vision.onnx*"))
    assert (tmp_path / "vision.onnx.data").is_file()  # weights as external data


def test_float16_engines_keep_rope_frequencies_in_float32(tiny, tmp_path):
    """Hugging Face computes RoPE angles from a float32 `inv_freq` whatever the weights' dtype; an engine (and the eager
    float16 twin) must not round the frequencies to float16 (models.cast_module)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from star_export.config import StarSchedule
    from star_export.export.onnx_export import export_onnx

    schedule = StarSchedule.from_spec(tiny.spec, keep=58, defaults=tiny.defaults)
    path = export_onnx(tiny, schedule, tmp_path, graphs=["segment0"], dtype="float16")["segment0"].path
    inv_freq = tiny.model.model.language_model.rotary_emb.inv_freq.numpy()
    assert inv_freq.dtype == np.float32 and not np.array_equal(inv_freq, inv_freq.astype(np.float16).astype(np.float32))
    found = [numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer if list(t.dims) == [inv_freq.size]]
    assert any(a.dtype == np.float32 and np.array_equal(a, inv_freq) for a in found), "RoPE frequencies not in float32"
    twin = tiny.cast("float16").model.model.language_model.rotary_emb.inv_freq
    assert twin.dtype == torch.float32 and np.array_equal(twin.numpy(), inv_freq)


def test_no_graph_transposes_a_weight_at_load(tiny_engine):
    """Weights are stored as the MatMuls read them (export/onnx_export.fold_weight_transposes): no graph of an engine
    has a Transpose of an initializer left for ONNX Runtime to fold at every session creation (before, tiny-llava's
    weights over 8192 elements were read through one), and the MatMuls still read weights."""
    import onnx

    for name in ("vision", "segment0", "pivot", "segment1"):
        graph = onnx.load(str(tiny_engine / f"{name}.onnx"), load_external_data=False).graph
        weights = {i.name for i in graph.initializer}
        assert [n.name for n in graph.node if n.op_type == "Transpose" and n.input[0] in weights] == [], name
        if name != "pivot":
            assert any(n.op_type == "MatMul" and n.input[1] in weights for n in graph.node), name
