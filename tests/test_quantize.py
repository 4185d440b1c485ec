"""Weight-only int8 / int4 engines (MatMulNBits), memory plans, the published checkpoint layout.

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
from star_export.config import SchemeError, WeightScheme
from star_export.export.quantize import quantize_weight
from star_export.validate.quantized import dequantize, int8_activations, matmul_compute, matmulnbits_model, quantized_twin
from star_export.memory import graph_weights, memory_plan, total_params
from star_export.runtime.sessions import session_options


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
    session = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    kernel = session.run(None, {"x": np.eye(K, dtype=np.float32)})[0].T  # (N, K)
    ours = dequantize(packed, scales, zp, K, scheme.bits, block)
    np.testing.assert_allclose(ours, kernel, rtol=1e-6, atol=1e-7)
    # and it is a quantization of w: within half a step of each block's scale, but for the one value a symmetric
    # grid clips (scale = max-magnitude / -2^(bits-1), so +max-magnitude lands on 2^(bits-1) - 1: one step)
    step = np.abs(np.repeat(scales.reshape(N, -1), block, axis=1)[:, :K])  # symmetric scales carry a sign
    err = np.abs(ours - w) / step
    assert err.max() <= 1.001 and np.mean(err <= 0.5 * 1.001) > 0.99


def _x86_avx2() -> bool:
    import platform
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo")
    return platform.machine() in ("x86_64", "AMD64") and cpuinfo.exists() and " avx2" in cpuinfo.read_text()


@pytest.mark.parametrize("kind,symmetric,block,K", [("int4", True, 32, 200), ("int4", False, 128, 256), ("int8", True, 64, 200), ("int8", False, 16, 96)])
@pytest.mark.parametrize("level", [0, 4])
def test_matmul_compute_names_what_the_kernel_computes(kind, symmetric, block, K, level):
    """ONNX Runtime's MatMulNBits output is one of our two float64 models of it -- float activations, or
    `int8_activations` (accuracy_level 4's int8 compute) -- to float32 rounding, and `matmul_compute` names that one.
    Rows of mixed scales, one all-zero block, K not a multiple of the block. Bounds: float32 summation of K products
    is ~sqrt(K) x 6e-8 relative (<= 1e-6 here), so 1e-5; the two models differ by the activations' quantization,
    half a step of amax / 127 per value (~0.5 % relative), so the other model must be >= 1e-3 away."""
    import onnxruntime as ort
    import torch

    rng = np.random.default_rng(1)
    N, M = 24, 6
    scheme = WeightScheme(kind, block_size=block, symmetric=symmetric, accuracy_level=level)
    w = (rng.standard_normal((N, K)) * rng.uniform(0.01, 3, (N, 1))).astype(np.float32)
    a = (rng.standard_normal((M, K)) * rng.uniform(0.01, 30, (M, 1))).astype(np.float32)
    a[0, :block] = 0
    session = ort.InferenceSession(matmulnbits_model(scheme, "float32", K, N, w), session_options(), providers=["CPUExecutionProvider"])
    y = session.run(None, {"A": a})[0].astype(np.float64)
    wq = quantized_twin(w, scheme)
    models = {"float": a.astype(np.float64) @ wq.T, "int8": int8_activations(torch.from_numpy(a), block).double().numpy() @ wq.T}
    err = {k: np.linalg.norm(y - v) / np.linalg.norm(v) for k, v in models.items()}
    compute = matmul_compute(scheme, "float32", ["CPUExecutionProvider"])
    other = "float" if compute == "int8" else "int8"
    assert err[compute] <= 1e-5 and err[other] >= 1e-3, (compute, err)
    if level == 0:
        assert compute == "float"
    elif kind == "int4" and _x86_avx2():
        assert compute == "int8"  # MLAS has int8 kernels for 4-bit weights from AVX2 on


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
    from star_export.build import export_engine
    from star_export.validate import validate_engine

    out = tmp_path / "e4"
    manifest = export_engine(model="tiny-llava", keep=16, out=out, weights=WeightScheme("int4", block_size=32), validate=False, show_progress=False)
    assert manifest["weights"] == {"kind": "int4", "block_size": 32, "symmetric": True, "accuracy_level": 4}
    assert json.loads((out / "star.json").read_text())["weights"]["kind"] == "int4"
    ops = {name: {n.op_type for n in onnx.load(out / f"{name}.onnx", load_external_data=False).graph.node} for name in ("vision", "segment0", "segment1")}
    assert "MatMulNBits" in ops["segment0"] and "MatMulNBits" in ops["segment1"] and "MatMulNBits" not in ops["vision"]
    assert {"decode0", "decode1"} <= set(manifest["graphs"])  # --decode-graphs auto: quantized engines get them
    report = validate_engine(out, loaded=tiny, max_new_tokens=6)
    assert report.ok, report.table()
    assert any(c.name.startswith("decode1[decode]") for c in report.checks), report.table()
    quality = next(iter(report.quality.values()))
    assert set(quality) == {"greedy_agreement", "top5_containment", "kl_mean", "kl_max"}
    assert 0 <= quality["greedy_agreement"] <= 1 and quality["kl_mean"] >= 0


def test_validator_catches_an_engine_quantized_differently(tmp_path, tiny):
    """Planted defect: an int4 engine whose star.json claims block 128 while its weights were packed with block 32
    (so the reference dequantizes other weights): the float rule must fail it."""
    from star_export.build import export_engine
    from star_export.manifest import MANIFEST
    from star_export.validate import validate_engine

    out = tmp_path / "e4"
    export_engine(model="tiny-llava", keep=16, out=out, weights=WeightScheme("int4", block_size=32), validate=False, show_progress=False)
    m = json.loads((out / MANIFEST).read_text())
    m["weights"]["block_size"] = 16
    (out / MANIFEST).write_text(json.dumps(m))
    report = validate_engine(out, loaded=tiny, max_new_tokens=4)
    assert not report.ok, report.table()


@pytest.mark.parametrize("kind,symmetric,block", [("int4", True, 32), ("int8", False, 64)])
def test_int8_compute_engine_passes_and_a_float_reference_fails_it(tmp_path, tiny, monkeypatch, kind, symmetric, block):
    """accuracy_level 4 (the default): the validator probes the compute and its references quantize their activations
    as the engine does, so the float rule holds. Planted defect: references with float activations (what the validator
    did before) must fail the same engine -- the check can tell the two arithmetics apart."""
    from star_export import validate
    from star_export.validate import run as validate_run
    from star_export.build import export_engine

    out = tmp_path / "e"
    scheme = WeightScheme(kind, block_size=block, symmetric=symmetric)
    assert scheme.accuracy_level == 4
    export_engine(model="tiny-llava", keep=16, out=out, weights=scheme, validate=False, show_progress=False)
    compute = matmul_compute(scheme, "float32", ["CPUExecutionProvider"])
    report = validate.validate_engine(out, loaded=tiny, max_new_tokens=6)
    assert report.ok, report.table()
    assert any(f"computes in {compute}" in n for n in report.notes), report.notes
    if compute != "int8":
        pytest.skip(f"this CPU's ONNX Runtime computes {kind} MatMulNBits in float: no int8 arithmetic to tell apart")
    monkeypatch.setattr(validate_run, "matmul_compute", lambda *a: "float")
    report = validate.validate_engine(out, loaded=tiny, max_new_tokens=6)
    assert not report.ok, report.table()
