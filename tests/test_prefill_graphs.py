"""ONNX Runtime prefill graphs (export/decode_graphs.py `io="segment"`): each segment with its inputs and outputs
unchanged and GroupQueryAttention in every layer but the pivot (whose probabilities the stage-2 scores read).

On a model unlike tiny-llava (grouped-query attention, 3 of 6 key/value heads; 6 layers; pivot 2, and pivot 0 where
segment 0 is the pivot alone): what is written and shared, that the engine runs them in place of the segment graphs on
the CPU provider and gets what the segment graphs get (a left-padded batch of two lengths, so padding and the pruned
sequence's non-contiguous positions are both exercised), and that star-validate checks them against the float64
reference and fails a wrong one.
"""

import json

import numpy as np
import onnx
import pytest

from conftest import QUESTIONS
from helpers import planted_defect_fails
from star_export.runtime.engine import Engine
from star_export.runtime.generate import Sampling

# As tests/test_decode_graphs.py: both paths compute in float32 on the same weights (their logits differ by rounding,
# ~1e-6 of their scale); a wrong position, mask or head grouping moves attention outputs by a large fraction of max |v|.
RELATIVE = 1e-3


@pytest.fixture(scope="session", params=[2, 0], ids=["pivot2", "pivot0"])
def prefill_engine(request, other_dir, tmp_path_factory):
    from star_export.cli import export_main

    out = tmp_path_factory.mktemp("prefill-engine") / f"other-p{request.param}"
    args = ["--model", str(other_dir), "--out", str(out), "--keep", "16", "--pivot-layer", str(request.param)]
    args += ["--decode-graphs", "on", "--no-validate", "--quiet", "--max-batch-size", "2", "--max-new-tokens", "8"]
    assert export_main(args) == 0
    return out


def test_prefill_graphs_are_written_with_the_segments_io_and_weights(prefill_engine):
    manifest = json.loads((prefill_engine / "star.json").read_text())
    pivot, layers = manifest["schedule"]["pivot_layer"], manifest["schedule"]["num_layers"]
    for segment, name, span in (("segment0", "prefill0", range(pivot + 1)), ("segment1", "prefill1", range(pivot + 1, layers))):
        entry = manifest["graphs"][name]
        assert entry["segment"] == segment and entry["role"] == "prefill" and entry["file"] in manifest["files"]
        assert entry["gqa_layers"] == [i for i in span if i != pivot]
        graph = onnx.load(str(prefill_engine / entry["file"]), load_external_data=False).graph
        ops = [n.op_type for n in graph.node]
        assert ops.count("GroupQueryAttention") == len(entry["gqa_layers"])
        assert ops.count("Softmax") == (1 if segment == "segment0" else 0), ops  # the pivot's, for the scores
        locations = {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {f"{segment}.onnx.data"}, locations
        want = manifest["graphs"][segment]
        assert (entry["inputs"], entry["outputs"]) == (want["inputs"], want["outputs"])


def test_the_engine_prefills_with_them_and_gets_what_the_segment_graphs_get(prefill_engine, images):
    sampling = Sampling(max_new_tokens=8, stop_at_eos=False)
    runs = {}
    for use in (True, False):
        engine = Engine.from_dir(prefill_engine, provider="cpu", prefill_graphs=use)
        assert engine.variants == ({"segment0": "prefill0", "segment1": "prefill1"} if use else {})
        runs[use] = engine.generate(images[:2], QUESTIONS[:2], sampling)  # two prompt lengths: left padding
    got, want = runs[True], runs[False]
    assert got.token_ids == want.token_ids
    assert (got.stage2_indices == want.stage2_indices).all()
    for step, (g, w) in enumerate(zip(got.logits, want.logits)):
        assert np.abs(g - w).max() <= RELATIVE * np.abs(w).max(), step
    # OpenVINO and lazy engines run the segment graphs
    assert Engine.from_dir(prefill_engine, provider="cpu", lazy=True).variants == {}


def test_the_validator_checks_them_and_fails_a_wrong_one(prefill_engine, other, tmp_path):
    """Planted defect: GQA's softmax scale doubled in one layer of prefill graph 1."""
    from star_export.validate import validate_engine

    report = validate_engine(prefill_engine, loaded=other, max_new_tokens=4)
    assert report.ok, report.table()
    assert any("prefill graphs" in note and "checked as them" in note for note in report.notes), report.notes

    head_dim = json.loads((prefill_engine / "star.json").read_text())["model"]["head_dim"]

    def double_the_scale(model):
        node = next(n for n in model.graph.node if n.op_type == "GroupQueryAttention")
        node.attribute.append(onnx.helper.make_attribute("scale", 2.0 / head_dim**0.5))

    planted_defect_fails(prefill_engine, "prefill1.onnx", double_the_scale, other, "segment1[prefill]", tmp_path)
