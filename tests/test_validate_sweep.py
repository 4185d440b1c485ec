"""On a generated sweep of random LLaVA models, every correct engine passes both the export's
self-check and `star-validate` (the budgets are measured per model, nothing is fitted to these models).

The two real-width cases (LLaVA-1.5-7B widths, 2 decoder layers) and the sweep cases of hidden 256 and 512 are slow-marked:
`bash scripts/test.sh -m slow -n 0 tests/test_validate_sweep.py`.
"""

import json

import pytest

from star_export.validate.budget import MULTIPLIER
from star_export.cli import export_main, validate_main
from star_export.testing import real_width_case, save_random_llava, validation_sweep

SWEEP = validation_sweep(24)
REAL_WIDTH = [real_width_case("float32", keep=58), real_width_case("float16", keep=29)]


def test_the_sweep_spans_the_issue_ranges():
    specs = [c.spec for c in SWEEP]
    assert len(SWEEP) >= 24 and len({c.name for c in SWEEP}) == len(SWEEP)
    assert {s.text_layers for s in specs} == set(range(2, 9))
    assert len({s.hidden_size for s in specs}) >= 5 and max(s.hidden_size for s in specs + [c.spec for c in REAL_WIDTH]) == 4096
    kinds = {"mha" if s.num_key_value_heads == s.num_attention_heads else "mqa" if s.num_key_value_heads == 1 else "gqa" for s in specs}
    assert kinds == {"mha", "gqa", "mqa"}
    assert min(c.text_init_std for c in SWEEP) == 0.02 and max(c.text_init_std for c in SWEEP) == 0.3
    for axis in ("qk_scale", "text_qk_scale"):
        assert {getattr(c, axis) for c in SWEEP} == {1, 2, 4, 8}
    assert {s.vision_feature_layer for s in specs} == {-1, -2}
    assert {c.dtype for c in SWEEP} == {"float32", "float16"} and {c.keep for c in SWEEP} == {576, 288, 58, 29}


def _export_and_validate(case, tmp_path, capsys):
    model_dir = save_random_llava(case.spec, tmp_path / "model", seed=case.seed, **case.init)
    out = tmp_path / "engine"
    args = ["--model", str(model_dir), "--keep", str(case.keep), "--dtype", case.dtype, "--out", str(out), "--max-new-tokens", "32"]
    rc = export_main(args)
    err = capsys.readouterr().err
    assert rc == 0, f"{case.name}: self-check failed\n{err[-4000:]}"
    assert "PASSED" in err
    rc = validate_main([str(out), "--max-new-tokens", "8", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0 and report["ok"], f"{case.name}: star-validate failed\n" + "\n".join(f"{c['name']}: {c['cause']}" for c in report["checks"] if not c["ok"])
    assert report["multiplier"] == MULTIPLIER


# The widest sweep models (hidden 512) took 90-133 s each, a third of CI's time: slow-marked, with the real-width ones.
# Hidden 256 too (five models, 30-64 s each, ~3.5 min of one worker) since a CI run reached 20:40: the cases left in CI
# still span every axis of the sweep (dtype, keep, mha / gqa / mqa, init std, qk scales, 2-8 layers; hidden 64-128).
SLOW_WIDTH = 256


@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c.spec.hidden_size >= SLOW_WIDTH else c for c in SWEEP], ids=[c.name for c in SWEEP]
)
def test_correct_engine_passes(case, tmp_path, capsys):
    _export_and_validate(case, tmp_path, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("case", REAL_WIDTH, ids=[c.name for c in REAL_WIDTH])
def test_correct_real_width_engine_passes(case, tmp_path, capsys):
    _export_and_validate(case, tmp_path, capsys)
