"""Issue 10: weight-only int8 / int4 engines (MatMulNBits), memory plans, the published checkpoint layout.

Independent paths: ONNX Runtime's own MatMulNBits kernel for the dequantization arithmetic; the unquantized
model for what quantization costs; the validator's float rule against float64 references that hold the engine's
dequantized weights.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from star_export.config import StarSchedule
from star_export.export.quantize import SchemeError, WeightScheme, dequantize, quantize_weight
from star_export.memory import graph_weights, memory_plan, total_params


@pytest.mark.parametrize("kind,symmetric,block", [("int4", True, 32), ("int4", False, 64), ("int8", True, 128), ("int8", False, 16)])
def test_dequantize_is_what_matmulnbits_computes(kind, symmetric, block):
    """Our dequantization against ONNX Runtime's MatMulNBits kernel on the identity (its output is W^T itself),
    with K not a multiple of the block (padding) and weights of mixed scales."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    N, K = 24, 200
    w = (rng.standard_normal((N, K)) * rng.uniform(0.01, 3, (N, 1))).astype(np.float32)
    scheme = WeightScheme(kind, block_size=block, symmetric=symmetric)
    packed, scales, zp = quantize_weight(w, scheme)
    inits = [onnx.numpy_helper.from_array(packed, "B"), onnx.numpy_helper.from_array(scales, "S")]
    inputs = ["x", "B", "S"]
    if zp is not None:
        inits.append(onnx.numpy_helper.from_array(zp, "Z"))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=K, N=N, bits=scheme.bits, block_size=block)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [K, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [K, N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    kernel = session.run(None, {"x": np.eye(K, dtype=np.float32)})[0].T  # (N, K)
    ours = dequantize(packed, scales, zp, K, scheme.bits, block)
    np.testing.assert_allclose(ours, kernel, rtol=1e-6, atol=1e-7)
    # and it is a quantization of w: within half a step of each block's scale, but for the one value a symmetric
    # grid clips (scale = max-magnitude / -2^(bits-1), so +max-magnitude lands on 2^(bits-1) - 1: one step)
    step = np.abs(np.repeat(scales.reshape(N, -1), block, axis=1)[:, :K])  # symmetric scales carry a sign
    err = np.abs(ours - w) / step
    assert err.max() <= 1.001 and np.mean(err <= 0.5 * 1.001) > 0.99


def test_scheme_rejects_bad_settings():
    with pytest.raises(SchemeError, match="--weights 'int3'"):
        WeightScheme("int3")
    with pytest.raises(SchemeError, match="power of two"):
        WeightScheme("int4", block_size=100)
    assert WeightScheme("float", block_size=100).asdict() == {"kind": "float"}  # unused for float


def test_memory_plan_counts_every_parameter(tiny):
    """The plan's parameter count equals the real model's (CLIP layers after the feature layer excluded)."""
    spec = tiny.spec
    schedule = StarSchedule.from_spec(spec, keep=8, defaults=tiny.defaults)
    model = tiny.model
    unused = sum(p.numel() for layer in model.model.vision_tower.encoder.layers[spec.vision_layers_run:] for p in layer.parameters())
    unused += sum(p.numel() for n, p in model.named_parameters() if "post_layernorm" in n)
    assert total_params(spec, schedule) == sum(p.numel() for p in model.parameters()) - unused
    g = graph_weights(spec, schedule)
    linear = sum(m.weight.numel() for layer in model.model.language_model.layers for m in layer.modules() if m.__class__.__name__ == "Linear")
    assert g["segment0"].linear + g["segment1"].linear == linear + model.lm_head.weight.numel()


def test_memory_plan_for_7b_matches_the_published_sizes():
    """llava-1.5-7b-hf: 7.06 B parameters, 14.1 GB in float16 (the published shards hold 7.06 B)."""
    from star_export.models import spec_from_name

    spec, defaults = spec_from_name("llava-1.5-7b")
    schedule = StarSchedule.from_spec(spec, keep=58, defaults=defaults)
    n = total_params(spec, schedule)
    assert 6.9e9 < n < 7.1e9, n  # minus the unused last CLIP layer and post_layernorm (12.6 M)
    f16, i4 = memory_plan(spec, schedule, "float16"), memory_plan(spec, schedule, "float32", WeightScheme("int4"))
    assert f16.run_bytes > 2 * f16.engine_bytes * 0.9  # ORT's CPU provider widens float16
    assert i4.run_bytes < 8 * 2**30  # the acceptance's star-run bound


def test_int4_engine_passes_the_validator_and_reports_its_cost(tmp_path, tiny):
    """A tiny int4 engine: MatMulNBits in the decoder segments only, the scheme in star.json, the validator's float
    rule against references holding the dequantized weights, and the cost against the unquantized model reported."""
    from star_export.export.build import export_engine
    from star_export.validate import validate_engine

    out = tmp_path / "e4"
    manifest = export_engine(model="tiny-llava", keep=16, out=out, weights=WeightScheme("int4", block_size=32), validate=False, show_progress=False)
    assert manifest["weights"] == {"kind": "int4", "block_size": 32, "symmetric": True, "accuracy_level": 0}
    assert json.loads((out / "star.json").read_text())["weights"]["kind"] == "int4"
    ops = {name: {n.op_type for n in onnx.load(out / f"{name}.onnx", load_external_data=False).graph.node} for name in ("vision", "segment0", "segment1")}
    assert "MatMulNBits" in ops["segment0"] and "MatMulNBits" in ops["segment1"] and "MatMulNBits" not in ops["vision"]
    report = validate_engine(out, loaded=tiny, max_new_tokens=6)
    assert report.ok, report.table()
    quality = next(iter(report.quality.values()))
    assert set(quality) == {"greedy_agreement", "top5_containment", "kl_mean", "kl_max"}
    assert 0 <= quality["greedy_agreement"] <= 1 and quality["kl_mean"] >= 0


def test_validator_catches_an_engine_quantized_differently(tmp_path, tiny):
    """Planted defect: an int4 engine whose star.json claims block 128 while its weights were packed with block 32
    (so the reference dequantizes other weights): the float rule must fail it."""
    from star_export.export.build import export_engine
    from star_export.manifest import MANIFEST
    from star_export.validate import validate_engine

    out = tmp_path / "e4"
    export_engine(model="tiny-llava", keep=16, out=out, weights=WeightScheme("int4", block_size=32), validate=False, show_progress=False)
    m = json.loads((out / MANIFEST).read_text())
    m["weights"]["block_size"] = 16
    (out / MANIFEST).write_text(json.dumps(m))
    report = validate_engine(out, loaded=tiny, max_new_tokens=4)
    assert not report.ok, report.table()
