"""ONNX Runtime decode graphs (export/decode_graphs.py, runtime/decode.py).

An engine may carry, beside its portable segment graphs, one decode graph per segment whose attention is ONNX Runtime's
GroupQueryAttention (the cache buffer shared as past and present, only the filled slots read). Checked here: what the
export writes and shares, that both decode paths give the same logits (float32: rounding apart), that the validator
judges the decode graphs against the float64 reference and fails a wrong one, and what happens where they cannot be
built or used. Joined and taken batch rows through the decode graphs: tests/test_kvcache.py.
"""

import json
import shutil

import numpy as np
import onnx
import pytest

from conftest import QUESTIONS
from helpers import planted_defect_fails
from star_export.runtime.engine import Engine

# Both paths compute in float32 on the same weights: their logits differ by rounding (~1e-6 of their scale: 2e-6 on this
# engine, 2.7e-6 at real widths), while a wrong cache slot, mask or RoPE position moves attention outputs by a large
# fraction of max |v| (0.25 for a position off by one); 1e-3 lies between. Both measured with the decode A/B scripts
# (docs/performance.md, "Decided experiments").
RELATIVE = 1e-3


def _graph(path):
    return onnx.load(str(path), load_external_data=False).graph


def test_decode_graphs_are_written_beside_the_segments_and_share_their_weights(decode_engine, tiny_engine):
    manifest = json.loads((decode_engine / "star.json").read_text())
    layers = manifest["schedule"]["num_layers"]
    rewritten = []
    for segment, name in (("segment0", "decode0"), ("segment1", "decode1")):
        entry = manifest["graphs"][name]
        assert entry["file"] == f"{name}.onnx" and entry["segment"] == segment and entry["file"] in manifest["files"]
        graph = _graph(decode_engine / entry["file"])
        ops = [n.op_type for n in graph.node]
        assert "Softmax" not in ops and ops.count("GroupQueryAttention") == len(entry["gqa_layers"]), ops
        assert entry["fusions"].get("SkipSimplifiedLayerNormalization", 0) >= 1, entry
        # the weights are the segment's own file: nothing copied
        locations = {e.value for t in graph.initializer for e in t.external_data if e.key == "location"}
        assert locations == {f"{segment}.onnx.data"}, locations
        assert not any(o.name.startswith(("stage2", "new_key_values")) for o in graph.output)
        rewritten += entry["gqa_layers"]
    assert sorted(rewritten) == list(range(layers))
    assert not list(decode_engine.glob("decode*.data")) and not list(decode_engine.glob("*.unfused.onnx"))
    # float32 engines get them on request only (--decode-graphs on); tiny_engine was built with the default
    assert "decode0" not in json.loads((tiny_engine / "star.json").read_text())["graphs"]


def test_both_decode_paths_give_the_same_logits(decode_engine, images):
    """70 greedy steps (the prefill leaves 64 slots of room for an engine limit of 80: the caches grow once), the decode
    graphs against the segment graphs of the same engine; the decode graphs did run."""
    from star_export.runtime.generate import Sampling

    sampling = Sampling(max_new_tokens=70, stop_at_eos=False)
    runs = {}
    for use in (True, False):
        engine = Engine.from_dir(decode_engine, provider="cpu", decode_graphs=use)
        calls = []
        for name in ("decode0", "decode1") if use else ():
            real = engine.graphs[name].run
            engine.graphs[name].run = lambda feed, real=real: (calls.append(1), real(feed))[1]
        runs[use] = engine.generate(images[:2], QUESTIONS[:2], sampling)
        assert len(calls) == (2 * 69 if use else 0)
        assert ("decode0" in engine.graphs) is use
    got, want = runs[True], runs[False]
    assert got.token_ids == want.token_ids
    for step, (g, w) in enumerate(zip(got.logits, want.logits)):
        assert np.abs(g - w).max() <= RELATIVE * np.abs(w).max(), step


def test_the_validator_checks_the_decode_graphs_and_fails_a_wrong_one(decode_engine, tiny, tmp_path):
    """The decode graphs run in the end-to-end checks (star-validate steps through the pipeline) and on their own: on the
    reference's decode feed, their outputs and the cache slot GQA wrote against the float64 reference. Planted defect:
    RoPE's cos/sin tables of decode graph 0 shifted by one position (so the keys it writes and its queries rotate by the
    wrong angle): the validator must fail it."""
    from star_export.validate import validate_engine

    report = validate_engine(decode_engine, loaded=tiny, max_new_tokens=4)
    assert report.ok, report.table()
    checked = {c.name.split(" ")[0] for c in report.checks if c.name.startswith("decode")}
    assert checked == {"decode0[decode]", "decode1[decode]"}, checked

    def shift_rope(model):
        for t in model.graph.initializer:
            if t.name in ("gqa_cos_cache", "gqa_sin_cache"):
                t.CopyFrom(onnx.numpy_helper.from_array(np.roll(onnx.numpy_helper.to_array(t), -1, axis=0), t.name))

    planted_defect_fails(decode_engine, "decode0.onnx", shift_rope, tiny, "decode0[decode]", tmp_path)


def test_an_engine_whose_blocks_are_not_found_is_written_without_decode_graphs(tiny_engine, tmp_path, capsys, monkeypatch):
    from star_export.export import decode_graphs
    from star_export.export import write as build
    from star_export.export.write import Progress

    directory = tmp_path / "engine"
    shutil.copytree(tiny_engine, directory)
    body = json.loads((directory / "star.json").read_text())

    real = decode_graphs.attention_blocks

    def not_found(graph, path):  # segment 1's blocks only: decode0.onnx is written first, then must go too
        if path.name == "segment0.onnx":
            return real(graph, path)
        raise decode_graphs.DecodeGraphError(f"{path.name}: no weight matmul upstream of x: not a segment graph of this release")

    monkeypatch.setattr(decode_graphs, "attention_blocks", not_found)
    assert build.decode_graph_entries(directory, body, Progress(1, enabled=False)) == {}
    assert "warning: no ONNX Runtime decode graphs" in capsys.readouterr().err
    assert sorted(p.name for p in directory.iterdir()) == sorted(p.name for p in tiny_engine.iterdir())  # nothing left behind


def test_decode_graph_options_are_checked_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from star_export import build
    from star_export.cli import export_main

    monkeypatch.setattr(build, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    assert export_main(["--out", str(tmp_path / "e"), "--decode-graphs", "on", "--dtype", "float16"]) == 2
    assert "--decode-graphs on: needs --dtype float32" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:  # argparse's choices
        export_main(["--out", str(tmp_path / "e"), "--decode-graphs", "sometimes"])
    assert exited.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_the_memory_plan_counts_the_decoder_weights_twice():
    """Each decode graph's session holds its own copy of its segment's (packed) weights; the files are shared."""
    from star_export.config import StarSchedule
    from star_export.config import WeightScheme
    from star_export.memory import memory_plan
    from star_export.models import spec_from_name

    spec, defaults = spec_from_name("llava-1.5-7b")
    schedule = StarSchedule.from_spec(spec, keep=58, defaults=defaults)
    without, with_ = (memory_plan(spec, schedule, "float32", WeightScheme("int4"), decode) for decode in (False, True))
    assert with_.engine_bytes == without.engine_bytes
    assert with_.run_bytes - without.run_bytes == pytest.approx(without.graph_bytes["segment0"] + without.graph_bytes["segment1"], rel=0.01)


def test_star_run_can_decode_with_the_segment_graphs(decode_engine, tmp_path, capsys):
    from star_export.cli import run_main

    image = tmp_path / "a.png"
    from star_export.runtime.inputs import synthetic_image

    synthetic_image(0).save(image)
    outputs = {}
    for flags in ([], ["--no-decode-graphs"]):
        assert run_main([str(decode_engine), "--image", str(image), "--prompt", "Describe.", "--max-new-tokens", "5", "--json", "--quiet", *flags]) == 0
        outputs[bool(flags)] = json.loads(capsys.readouterr().out)
    assert outputs[False]["timings"]["decode_graphs"] is True and outputs[True]["timings"]["decode_graphs"] is False
    assert outputs[False]["token_ids"] == outputs[True]["token_ids"]
    assert run_main([str(decode_engine), "--image", str(image), "--prompt", "Describe.", "--max-new-tokens", "2"]) == 0
    assert "| CPUExecutionProvider (decode graphs)" in capsys.readouterr().err  # the summary line says which path decoded


def test_attention_block_is_found_behind_transposed_weights(tiny_engine, tmp_path):
    """The exporter folds the Transpose of small weights only: at other sizes (hidden 128, float32) a projection's MatMul
    reads Transpose(weight). The block finder names the same projections whether the weights are folded or not."""
    import onnx
    from onnx import helper, numpy_helper

    from star_export.export.decode_graphs import attention_block

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
        _, folded, absolute, _ = attention_block(path, layer)
        _, behind, absolute_behind, _ = attention_block(tmp_path / "segment0.onnx", layer)
        assert (behind, absolute_behind) == (folded, absolute)


def test_add_decode_graphs_writes_them_into_an_engine_exported_without(tiny_engine, images, tmp_path, capsys):
    """`star-export --add-decode-graphs ENGINE`: an engine exported without decode graphs gets them and a re-signed
    star.json (the next load verifies every sha256), then decodes with them to the tokens its segment graphs give, logits
    within float32 rounding (RELATIVE). Asked again it writes nothing; an engine they do not apply to is exit 2."""
    from star_export.cli import export_main
    from star_export.runtime.generate import Sampling

    directory = tmp_path / "engine"
    shutil.copytree(tiny_engine, directory)
    assert "decode0" not in json.loads((directory / "star.json").read_text())["graphs"]
    assert export_main(["--add-decode-graphs", str(directory), "--quiet"]) == 0
    assert "decode graphs written into" in capsys.readouterr().out
    manifest = json.loads((directory / "star.json").read_text())
    assert {"decode0", "decode1"} <= set(manifest["graphs"]) and {"decode0.onnx", "decode1.onnx"} <= set(manifest["files"])
    sampling = Sampling(max_new_tokens=6, stop_at_eos=False)
    runs = {}
    for use in (True, False):
        engine = Engine(directory, provider="cpu", decode_graphs=use)  # verify=True: the new hashes hold
        assert ("decode0" in engine.graphs) is use
        runs[use] = engine.generate(images[:1], QUESTIONS[:1], sampling)
    assert runs[True].token_ids == runs[False].token_ids
    for g, w in zip(runs[True].logits, runs[False].logits):
        assert np.abs(g - w).max() <= RELATIVE * np.abs(w).max()

    assert export_main(["--add-decode-graphs", str(directory), "--quiet"]) == 0
    assert "no decode graphs written (it has them already" in capsys.readouterr().out

    other = tmp_path / "float16"
    shutil.copytree(tiny_engine, other)
    edited = json.loads((other / "star.json").read_text()) | {"dtype": "float16"}
    (other / "star.json").write_text(json.dumps(edited))
    assert export_main(["--add-decode-graphs", str(other), "--quiet"]) == 2
    assert "--add-decode-graphs: needs a float32 onnx engine" in capsys.readouterr().err
