"""star-calibrate (star_export/calibrate.py, cli/calibrate.py) on tiny-llava.

What is proved is the mechanism, not that a choice is good for a real model (random weights): the unpruned schedule
scores KL 0 with full agreement and pruning scores worse; the metrics on planted logits; the outputs (table, plot,
recipe) and that the recipe builds an engine with its schedule; an interrupted run resumes; bad inputs exit 2 naming
the line or flag.
"""

import json

import numpy as np
import pytest
from PIL import Image

from star_export.calibrate import CalibrationError, calibrate, default_cases, fidelity, schedule_grid
from star_export.cli import calibrate_main, export_main


def test_unpruned_scores_zero_and_pruning_scores_worse(tiny, tmp_path):
    cases = default_cases(2)
    full = schedule_grid(tiny, 576, ["star"], None, None)
    assert [s.is_identity for s in full] == [True]
    calibrate(tiny, "tiny-llava", 576, tmp_path / "full", cases, full, tokens=6, progress=lambda m: None)
    row = json.loads((tmp_path / "full" / "results.jsonl").read_text().splitlines()[0])
    assert (row["kl"], row["top1"], row["exact"], row["flops_ratio"]) == (0.0, 1.0, 1.0, 1.0)

    pruned = schedule_grid(tiny, 8, ["star", "fastv", "fastervlm"], [8, 490], [0, 2])
    recipe = calibrate(tiny, "tiny-llava", 8, tmp_path / "pruned", cases, pruned, tokens=6, progress=lambda m: None)
    rows = json.loads((tmp_path / "pruned" / "table.json").read_text())["rows"]
    assert len(rows) == len(pruned) and all(r["kl"] > 0 and r["flops_ratio"] < 1 for r in rows)
    best = min(rows, key=lambda r: (r["kl"], -r["top1"], r["flops_ratio"]))
    assert (recipe["stage1_keep"], recipe["pivot_layer"], recipe["method"]) == (
        best["stage1_keep"], best["pivot_layer"], best["method"])
    assert {"star", "fastv", "fastervlm"} == {r["method"] for r in rows}
    with Image.open(tmp_path / "pruned" / "pareto.png") as png:
        assert png.size == (720, 480)
    table = (tmp_path / "pruned" / "table.md").read_text()
    assert table.count("\n| ") == len(rows) + 1 and " * |" in table  # header + one line per schedule, a Pareto mark
    # a FLOPs budget picks the most faithful schedule that is at most that expensive
    cheap = calibrate(tiny, "tiny-llava", 8, tmp_path / "pruned", cases, pruned, tokens=6, flops_budget=0.2,
                      progress=lambda m: None)
    assert cheap["cost"]["flops_ratio"] <= 0.2
    with pytest.raises(CalibrationError, match="flops-budget"):
        calibrate(tiny, "tiny-llava", 8, tmp_path / "pruned", cases, pruned, tokens=6, flops_budget=0.001,
                  progress=lambda m: None)


def test_metrics_on_planted_logits():
    rng = np.random.default_rng(0)
    teacher = [rng.standard_normal(50) for _ in range(4)]
    tokens = [int(np.argmax(t)) for t in teacher]
    assert fidelity(teacher, teacher, tokens) == {"kl": 0.0, "top1": 1.0, "exact": 1.0}
    flipped = [t.copy() for t in teacher]
    flipped[2][tokens[2]] = -10.0  # the answer's token made unlikely at one step
    f = fidelity(teacher, flipped, tokens)
    assert f["kl"] > 0 and f["top1"] == 0.75 and f["exact"] == 0.0


def test_an_interrupted_run_resumes_and_other_settings_are_refused(tiny, tmp_path):
    cases = default_cases(1)
    grid = schedule_grid(tiny, 58, ["star", "fastv"], None, None)
    out = tmp_path / "run"
    calibrate(tiny, "tiny-llava", 58, out, cases, grid, tokens=4, progress=lambda m: None)
    lines = (out / "results.jsonl").read_text().splitlines()
    (out / "results.jsonl").write_text(lines[0] + "\n" + lines[1][:40])  # cut mid-line, as a kill would
    said = []
    calibrate(tiny, "tiny-llava", 58, out, cases, grid, tokens=4, progress=said.append)
    assert any("measured before" in m for m in said) and sum("KL" in m for m in said) == 1
    again = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()[-1:]]
    assert again[0] == json.loads(lines[1])  # the schedule measured again gives the same figures
    with pytest.raises(CalibrationError, match="other settings"):
        calibrate(tiny, "tiny-llava", 58, out, cases, grid, tokens=5, progress=lambda m: None)


def test_the_recipe_builds_an_engine_with_its_schedule(tmp_path, capsys):
    out = tmp_path / "cal"
    args = ["--out", str(out), "--keep", "29", "--methods", "star", "fastv", "--stage1-keeps", "115", "--tokens", "4"]
    assert calibrate_main(args + ["--quiet"]) == 0
    assert "star-export --model tiny-llava --recipe" in capsys.readouterr().out
    recipe = json.loads((out / "recipe.json").read_text())
    engine = tmp_path / "engine"
    assert export_main(["--recipe", str(out / "recipe.json"), "--out", str(engine), "--no-validate", "--quiet"]) == 0
    schedule = json.loads((engine / "star.json").read_text())["schedule"]
    assert {k: schedule[k] for k in ("keep", "stage1_keep", "pivot_layer")} == {
        k: recipe[k] for k in ("keep", "stage1_keep", "pivot_layer")}
    assert export_main(["--recipe", str(out / "recipe.json"), "--keep", "58", "--out", str(tmp_path / "x")]) == 2
    assert "disagrees with --recipe" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["missing-image", "bad-json", "not-object", "empty-grid", "keep-over-k1", "empty-file"])
def test_bad_inputs_exit_2_naming_the_line_or_flag(case, tmp_path, capsys):
    data = tmp_path / "set.jsonl"
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    good = json.dumps({"image": "a.png", "prompt": "What is it?"})
    lines, extra, says = [good], [], ""
    if case == "missing-image":
        lines.append(json.dumps({"image": "nope.png", "prompt": "x"}))
        says = "set.jsonl:2: image 'nope.png' not found"
    elif case == "bad-json":
        lines.append("{not json")
        says = "set.jsonl:2: not a JSON object"
    elif case == "not-object":
        lines.append(json.dumps(["a.png", "x"]))
        says = "set.jsonl:2: needs"
    elif case == "empty-grid":
        extra, says = ["--methods"], "--methods is empty"
    elif case == "keep-over-k1":
        extra, says = ["--stage1-keeps", "8"], "--stage1-keeps 8: smaller than --keep 58"
    elif case == "empty-file":
        lines, says = [], "no cases in it"
    data.write_text("\n".join(lines) + "\n")
    assert calibrate_main(["--data", str(data), "--out", str(tmp_path / "o"), "--quiet", *extra]) == 2
    assert says in capsys.readouterr().err
