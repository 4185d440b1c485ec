"""The validator's comparison rules: exact selections, ties, fp16 overlap, derived outputs, tolerances."""

import numpy as np

from star_export.validate import ValidationReport, check_indices, compare_graph


def _report(dtype="float32"):
    return ValidationReport(engine="unit", reference_device="cpu", dtype=dtype)


SCORES = np.array([[0.9, 0.5, 0.30000001, 0.3, 0.1]], dtype=np.float64)  # indices 2 and 3 tie at k = 3


def test_identical_selection_passes():
    r = _report()
    assert check_indices(r, "s", [[0, 1, 2]], [[0, 1, 2]], SCORES)
    assert r.ok


def test_swap_at_a_tie_passes_but_is_reported():
    r = _report()
    assert not check_indices(r, "s", [[0, 1, 2]], [[0, 1, 3]], SCORES)
    assert r.ok and "tied scores only" in r.checks[0].value


def test_swap_away_from_the_boundary_fails():
    r = _report()
    check_indices(r, "s", [[0, 1, 2]], [[0, 2, 4]], SCORES)
    assert not r.ok and "different tokens kept" in r.checks[0].value


def test_fp32_without_scores_needs_identical():
    r = _report()
    check_indices(r, "s", [[0, 1, 2]], [[0, 1, 3]])
    assert not r.ok


def test_fp16_uses_overlap():
    ref = [list(range(20))]
    r = _report("float16")
    check_indices(r, "s", ref, [list(range(19)) + [25]])  # 19 / 20 = 0.95 >= 0.9
    assert r.ok
    r = _report("float16")
    check_indices(r, "s", ref, [list(range(10)) + list(range(30, 40))])
    assert not r.ok


def test_derived_outputs_must_match_when_the_selection_does():
    ref = {"stage2_indices": np.array([[1, 2]]), "pruned_attention_mask": np.array([[1, 1, 1]]), "pruned_hidden_states": np.ones((1, 3, 4), np.float32)}
    got = {"stage2_indices": np.array([[1, 2]]), "pruned_attention_mask": np.array([[1, 0, 1]]), "pruned_hidden_states": np.ones((1, 3, 4), np.float32)}
    r = _report()
    compare_graph(r, "pivot", "prefill", ref, got)
    assert not r.ok and [c.name for c in r.checks if not c.ok] == ["pivot[prefill] pruned_attention_mask"]


def test_every_failing_output_is_listed_with_its_stats():
    ref = {"logits": np.linspace(-5, 5, 100, dtype=np.float32)[None], "present.0.key": np.ones((1, 2, 3, 4), np.float32), "hidden_states": np.ones((1, 2, 8), np.float32)}
    got = {"logits": ref["logits"] + 1e-3, "present.0.key": ref["present.0.key"] * 1.01, "hidden_states": ref["hidden_states"] + 1e-6}
    r = _report()
    compare_graph(r, "segment1", "prefill", ref, got)
    failed = {c.name for c in r.checks if not c.ok}
    assert failed == {"segment1[prefill] logits", "segment1[prefill] present.*"}
    assert all("max abs" in c.value and "norm" in c.value for c in r.checks)
    assert "FAIL" in r.table() and "FAILED: 1/3 checks" in r.table()
