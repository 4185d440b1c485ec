"""scripts/attention_ab.py (issue 13) compares like with like: the attention block it cuts out of an engine's segment
graph and the ONNX Runtime GroupQueryAttention node it builds give the same output within float32 rounding (the bound
is derived in the script from the inputs' norms; a wrong RoPE, mask or cache slot moves the output by a fraction of
max |v|, far above it)."""

import pytest

from helpers import script


@pytest.mark.parametrize("segment", ["segment0", "segment1"])
def test_block_and_group_query_attention_agree(tiny_engine, segment, tmp_path):
    import json

    ab = script("attention_ab")
    out = tmp_path / "ab.json"
    assert ab.main(["--engine", str(tiny_engine), "--segment", segment, "--lengths", "37,5", "--rounds", "1", "--cache-mb", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["block_nodes"] > 10 and "Softmax" in result["block_ops"]
    for run in result["runs"]:
        assert run["max_abs_difference"] <= run["rounding_bound"], run
        assert run["rounding_bound"] < 1e-3 * run["max_abs_output"], run  # the check can tell a wrong output from rounding


def test_attention_block_is_found_behind_transposed_weights(tiny_engine, tmp_path):
    """The exporter folds the Transpose of small weights only: at other sizes (hidden 128, float32) a projection's MatMul
    reads Transpose(weight). The block finder names the same projections whether the weights are folded or not."""
    import onnx
    from onnx import helper, numpy_helper

    ab = script("attention_ab")
    path = tiny_engine / "segment0.onnx"
    model = onnx.load(str(path))
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    matmuls = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights and len(weights[n.input[1]].dims) == 2]
    assert matmuls
    for node in matmuls:
        name = node.input[1]
        unfolded = numpy_helper.from_array(numpy_helper.to_array(weights[name]).T.copy(), f"{name}.unfolded")
        graph.initializer.append(unfolded)
        graph.node.insert(list(graph.node).index(node), helper.make_node("Transpose", [unfolded.name], [f"{name}.t"], perm=[1, 0]))
        node.input[1] = f"{name}.t"
    onnx.save(model, str(tmp_path / "segment0.onnx"))
    for layer in range(len([i for i in graph.input if i.name.startswith("past_key_values.")]) // 2):
        _, folded, absolute, _ = ab.attention_block(path, layer)
        _, behind, absolute_behind, _ = ab.attention_block(tmp_path / "segment0.onnx", layer)
        assert (behind, absolute_behind) == (folded, absolute)


@pytest.mark.parametrize("flags", [[], ["--pivot-too", "--fuse"]], ids=["pivot-kept", "decode-only-fused"])
def test_gqa_copy_decodes_like_the_engine(tiny_engine, tmp_path, flags):
    """scripts/gqa_step_ab.py's rewritten copy decodes the same logits as the engine: float32 rounding differences are
    ~1e-6 of the logits' scale (2e-6 here, 2.7e-6 at real widths), while a wrong cache slot, mask or RoPE position moves
    attention outputs by a large fraction of max |v| (0.25 for a position off by one, test above); 1e-3 lies between.
    With `--pivot-too --fuse` every layer is rewritten (no Softmax left: no attention block of the exporter's) and the
    fusions are in the graphs that ran: the script's copy is the product's decode graphs (tests/test_decode_graphs.py)
    with their weights copied, run through the pipeline beside the engine's own segments."""
    import json

    import onnx

    ab = script("gqa_step_ab")
    out, copy = tmp_path / "ab.json", tmp_path / "copy"
    # 70 steps: past the 64 slots of room the prefill leaves (kvcache.GROWTH), so the copy's caches grow once
    assert ab.main(["--engine", str(tiny_engine), "--work", str(copy), "--steps", "70", "--json", str(out), *flags]) == 0
    result = json.loads(out.read_text())
    layers = json.loads((tiny_engine / "star.json").read_text())["schedule"]["num_layers"]
    assert sum(len(v) for v in result["gqa_layers"].values()) == (layers if flags else layers - 1), result
    assert result["logits_relative_difference"]["max"] < 1e-3, result
    if flags:
        for segment in ("segment0", "segment1"):
            ops = {n.op_type for n in onnx.load(str(copy / f"{segment}.fused.onnx"), load_external_data=False).graph.node}
            assert "Softmax" not in ops and "GroupQueryAttention" in ops, ops
            assert result["fusions"][segment].get("SkipSimplifiedLayerNormalization", 0) >= 1, result


def test_decode_split_measures_the_decode_graphs_beside_the_segments(decode_engine, tiny_engine, tmp_path, monkeypatch):
    """scripts/decode_split.py on an engine with decode graphs: their steps are measured in the same run as the segment
    graphs', against the same floor, fed the same tokens (the logits equal within the bound above), GroupQueryAttention
    counted as attention and no cache copy in either; the weight files are shared."""
    import json

    split = script("decode_split")
    gemv = split.Gemv
    monkeypatch.setattr(split, "Gemv", lambda threads: gemv(threads, gib=1 / 64))  # a 16 MiB GEMV: the floor's figure, not its accuracy
    out = tmp_path / "split.json"
    assert split.main(["--engine", str(decode_engine), "--steps", "3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["logits_relative_difference"]["max"] < 1e-3, result
    decode = result["decode_graphs"]
    assert decode["weight_bytes"] == result["weight_bytes"] > 0
    assert decode["kernel_ms"]["attention"] > 0 and decode["kernel_ms"]["cache copy"] == 0, result
    for config in (result, decode):
        assert config["step_ms"]["median"] > 0 and config["overhead_beyond_weights"]["median"] is not None
    # --versus: a second engine (here tiny_engine: no decode graphs, so its segments) stepped in the same alternation,
    # against the floor of its own weight bytes
    assert split.main(["--engine", str(decode_engine), "--steps", "2", "--no-decode-graphs", "--versus", str(tiny_engine), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "decode_graphs" not in result
    versus = result["versus"]
    assert versus["engine"] == str(tiny_engine) and versus["weight_bytes"] > 0 and versus["kernel_ms"]["attention"] > 0, versus
    assert versus["step_ms"]["median"] > 0 and result["versus_over_this"]["median"] > 0


def test_fused_copy_is_an_engine_that_decodes_like_the_original(tiny_engine, tmp_path):
    """scripts/fusions_ab.py's copy carries ORT's RMSNorm fusions, decodes the engine's logits within 1e-3 of
    their scale (float32 rounding is ~1e-6; fused norms with epsilon 1e-2 instead of the model's moved them by 3.9e-3 and
    failed the validator), and is a whole engine directory that the validator, against its float64 reference, passes."""
    import json

    from star_export.cli import validate_main

    ab = script("fusions_ab")
    out, copy = tmp_path / "ab.json", tmp_path / "fused"
    assert ab.main(["--engine", str(tiny_engine), "--work", str(copy), "--steps", "4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for segment in ("segment0", "segment1"):
        assert result["fusions"][segment].get("SkipSimplifiedLayerNormalization", 0) >= 1, result
    assert result["logits_relative_difference"]["max"] < 1e-3, result
    assert validate_main([str(copy), "--quiet"]) == 0


def test_kv_cache_types_compute_the_attention_they_hold(monkeypatch):
    """scripts/kv_cache_ab.py times GroupQueryAttention over float32 / float16 / int8 caches; what it times must be that
    attention: each output equals a float64 attention over the kernel's own buffers after the step (dequantized with the
    scale the script passes) within float32 rounding, and the new token is written within half a quantization step.
    A wrong model of the kernel's scale convention must fail both checks, and the int8 cache must differ from the float32
    one more than float16."""
    import numpy as np

    ab = script("kv_cache_ab")
    shape = dict(heads=4, kv_heads=2, head_dim=16, max_pos=128, caches=["float32", "float16", "int8"], rounds=1, cache_mb=0.1)
    for length in (30, 5):
        run = ab.measure(length=length, **shape)
        for cache, check in run["checks"].items():
            assert check["max_abs_difference"] <= check["rounding_bound"], (cache, check)
            # the check can tell a wrong output (a fraction of max |v|) from rounding: float32 arithmetic; float16 roundings
            # of |q| |k| ~ 36 here make its first-order bound ~0.1 of the output, still below a wrong slot or scale
            assert check["rounding_bound"] < (1e-3 if cache != "float16" else 0.25) * run["max_abs_output"], (cache, check)
            for kv, written in check["new_token_written"].items():
                assert written["max_abs_difference"] <= written["bound"], (cache, kv, written)
        assert run["checks"]["int8"]["difference_from_float32_cache"] > run["checks"]["float16"]["difference_from_float32_cache"] > 0
        assert set(run["ms"]) == {"float32", "float16", "int8"} and all(v["median"] > 0 for v in run["ms"].values())

    # a script whose model of the kernel is off (here: dequantizing with 1.25 x the scale the kernel was given) fails
    monkeypatch.setattr(ab, "decode", lambda x, scale: x.astype(np.float64) * (1.25 * scale if x.dtype == np.int8 else 1.0))
    check = ab.measure(length=30, **(shape | {"caches": ["float32", "int8"]}))["checks"]["int8"]
    assert check["max_abs_difference"] > check["rounding_bound"], check
    assert check["new_token_written"]["value"]["max_abs_difference"] > check["new_token_written"]["value"]["bound"], check


def test_kernel_rates_products_and_step_weights(tmp_path):
    """scripts/kernel_rates.py: each session computes its shape's product with the engine's packing (copy 0 equals
    `x @ W` of the dequantized weights at float compute), holds the fewest copies that reach --mib, and the step weights
    count a layer's products as the graphs run them (4 of hidden x hidden, 2 of hidden x intermediate, 1 back, per layer)."""
    import json

    import numpy as np
    import onnxruntime as ort

    from star_export.export.quantize import WeightScheme, quantized_twin

    kr = script("kernel_rates")
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((96, 256)) * 0.02).astype(np.float32)  # (N, K)
    x = rng.standard_normal((1, 256)).astype(np.float32)
    for scheme in (None, WeightScheme("int4", block_size=64, accuracy_level=0)):
        model, copies, nbytes = kr.products_model(scheme, w, 50_000)
        one = nbytes // copies
        assert nbytes >= 50_000 > (copies - 1) * one
        outputs = ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"A": x})
        assert len(outputs) == copies
        truth = x.astype(np.float64) @ (w.astype(np.float64) if scheme is None else quantized_twin(w, scheme)).T
        np.testing.assert_allclose(outputs[0], truth, rtol=1e-4, atol=1e-5 * np.abs(truth).max())
        if copies > 1:  # the copies are other weights (rotated packing), not one tensor read again from the caches
            assert not np.allclose(outputs[1], outputs[0])

    out = tmp_path / "rates.json"
    assert kr.main(["--widths", "64", "96", "128", "--mib", "1", "--rounds", "2", "--floor-gib", "0.03", "--layers", "3",
                    "--schemes", "int4/32/4", "int8/64/0", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["step"]["calls"]["separate"] == {"64x64": 12, "64x96": 6, "96x64": 3, "64x128": 1}
    assert result["step"]["calls"]["fused"] == {"64x192": 6, "64x64": 3, "96x64": 3, "64x128": 1}  # qkv and gate_up: 3h = 2i here
    assert set(result["kernels"]) == {"float32", "int4/32/4", "int8/64/0"}
    assert result["machine"]["thread_pool"] == "per-session"  # the mode that ran (conftest pins it), not the commands' default
    for config, layouts in result["step"]["over_floor"].items():
        for layout, summary in layouts.items():
            assert all(np.isfinite(summary[k]) for k in ("median", "min", "max")), (config, layout)
