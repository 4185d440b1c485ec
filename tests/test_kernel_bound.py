"""scripts/kernel_bound.py (what bounds decode, prefill and memory per runtime): the graph it times holds the weight
bytes its report divides by, both runtimes compute the same products on it, and a run reports every runtime asked
for."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.helpers import script

pytest.importorskip("openvino")


def test_the_timed_graph_holds_the_bytes_it_reports_and_both_runtimes_agree_on_it(tmp_path):
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    from star_export.config import WeightScheme
    from star_export.runtime.openvino import core, graph_config

    kb = script("kernel_bound")
    graph = tmp_path / "weights.onnx"
    reported = kb.write_graph(graph, layers=2, hidden=256, intermediate=512, block=128)
    stored = sum(
        numpy_helper.to_array(t, base_dir=str(tmp_path)).nbytes for t in onnx.load(str(graph)).graph.initializer
    )
    assert reported == stored == 2 * sum(kb.int4_bytes(k, n, 128) for _, k, n in kb.layer_shapes(256, 512))

    x = np.random.default_rng(0).standard_normal((1, 5, 256), dtype=np.float32)
    by_ort = ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    compiled = core().compile_model(str(graph), "CPU", graph_config(WeightScheme(kind="int4")))
    by_ov = compiled.create_infer_request().infer({"x": x}).to_tuple()[0]
    assert np.isfinite(by_ort).all() and np.abs(by_ort).max() > 0  # the scales keep values in range
    # Both quantize activations to int8 per 128-element block the same way (runtime/openvino.graph_config); OpenVINO
    # keeps the intermediates in bfloat16 where the CPU has it (relative rounding 2^-9 per value, through two layers of
    # seven products and the elementwise ops between them: ~1e-2 at most), float32 elsewhere.
    error = np.linalg.norm(by_ov - by_ort) / np.linalg.norm(by_ort)
    assert error < 2e-2, error


def test_a_run_reports_every_runtime_asked_for(tmp_path):
    kb = script("kernel_bound")
    argv = [
        "--layers",
        "1",
        "--hidden",
        "256",
        "--intermediate",
        "512",
        "--prompt",
        "8",
        "--rounds",
        "1",
        "--only",
        "onnxruntime",
        "openvino",
        "--out",
        str(tmp_path),
    ]
    assert kb.main(argv) == 0
    results = json.loads((tmp_path / "kernels.json").read_text())["results"]
    for name in ("onnxruntime", "openvino"):
        (run,) = results[name]
        assert "error" not in run, run
        assert len(run["one_row_s"]) == 20 and len(run["prompt_s"]) == 3 and min(run["one_row_s"]) > 0
    table = (tmp_path / "kernels.md").read_text()
    assert "| onnxruntime | " in table and "| openvino | " in table and "failed" not in table


def test_an_engine_run_times_every_graph_the_way_runs(tmp_path, decode_engine):
    kb = script("kernel_bound")
    argv = ["--only", "--engine", str(decode_engine), "--ways", "onnxruntime", "openvino-segments", "--rounds", "1",
            "--tokens", "3", "--out", str(tmp_path)]  # fmt: skip
    assert kb.main(argv) == 0
    runs = json.loads((tmp_path / "kernels.json").read_text())["engine"]
    (by_ort,), (by_ov,) = runs["onnxruntime"], runs["openvino-segments"]
    assert by_ort["runs_on"] == "CPUExecutionProvider" and by_ov["runs_on"].startswith("OpenVINO")
    prefill = {"vision", "segment0", "pivot", "segment1"}
    # 3 new tokens: the prefill makes the first, then 2 decode steps
    assert set(by_ort["graphs"]) == prefill | {"decode0", "decode1"}
    assert all(
        len(by_ort["graphs"][g]["later_s"]) == 2 and by_ort["graphs"][g]["first_s"] is None
        for g in ("decode0", "decode1")
    )
    assert set(by_ov["graphs"]) == prefill
    assert all(len(by_ov["graphs"][g]["later_s"]) == 2 for g in ("segment0", "segment1"))
    assert all(by_ov["graphs"][g]["first_s"] > 0 and not by_ov["graphs"][g]["later_s"] for g in ("vision", "pivot"))
    assert "| onnxruntime | " in (tmp_path / "kernels.md").read_text()
