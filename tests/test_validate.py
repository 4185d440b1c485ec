"""The validator's rules on synthetic numbers: the error budget, the selection rule, the report."""

import numpy as np
import pytest

from star_export.validate import Check, ValidationReport, budget
from star_export.validate.checks import compare_outputs

RNG = np.random.default_rng(0)
TRUTH = RNG.normal(size=(3, 50))


def _noisy(scale, shape=TRUTH.shape):
    return TRUTH + scale * np.abs(TRUTH).mean() * RNG.normal(size=shape)


# ------------------------------------------------------------------ error_budget


def test_engine_as_accurate_as_eager_passes():
    b = budget.error_budget(TRUTH, _noisy(1e-6), _noisy(1e-6), "float32")
    assert b.ok and 0.3 < b.ratio < 3 and b.limit == pytest.approx(budget.MULTIPLIER * b.eager_error + budget.floor("float32"))


def test_engine_far_worse_than_eager_fails_with_the_numbers():
    b = budget.error_budget(TRUTH, _noisy(1e-6), _noisy(1e-4), "float32")
    assert not b.ok and "> budget" in b.cause and b.ratio > 10


def test_scale_does_not_matter():
    """A model with 1e4-times larger activations gets the same verdict (errors are relative)."""
    eager, engine = _noisy(1e-6), _noisy(3e-6)
    small = budget.error_budget(TRUTH, eager, engine, "float32")
    large = budget.error_budget(TRUTH * 1e4, eager * 1e4, engine * 1e4, "float32")
    assert small.ok == large.ok and small.error == pytest.approx(large.error)


def test_floor_covers_outputs_eager_computes_exactly():
    one_ulp = TRUTH.astype(np.float32).astype(np.float64)  # the engine rounds once to float32
    assert budget.error_budget(TRUTH, TRUTH, one_ulp, "float32").ok
    assert not budget.error_budget(TRUTH, TRUTH, TRUTH * (1 + 1e-5), "float32").ok


def test_rows_are_judged_one_by_one():
    """Per-row: one bad row fails although the whole-tensor norm would hide it."""
    truth = np.vstack([TRUTH[0] * 1e4, TRUTH[1]])
    eager = truth * (1 + 1e-7)
    engine = eager.copy()
    engine[1] += 1e-4 * np.abs(truth[1]).mean()
    assert budget.error_budget(truth, eager, engine, "float32").ok
    b = budget.error_budget(truth, eager, engine, "float32", rows=True)
    assert not b.ok and "(row 1)" in b.cause


def test_non_finite_values_are_named():
    engine = _noisy(1e-6)
    engine[0, 3] = np.inf
    assert "non-finite" in budget.error_budget(TRUTH, _noisy(1e-6), engine, "float16").cause
    eager = _noisy(1e-3)
    eager[1, 1] = np.nan
    assert "eager float16 reference itself overflows" in budget.error_budget(TRUTH, eager, _noisy(1e-3), "float16").cause


def test_shape_mismatch_fails():
    assert "shape" in budget.error_budget(TRUTH, TRUTH, TRUTH[:, :10], "float32").cause


# ------------------------------------------------------------------ check_selection

SCORES = np.array([[0.9, 0.5, 0.3 + 1e-9, 0.3, 0.1]])  # indices 2 and 3 tie at k = 3
EAGER = SCORES + 1e-8  # what the dtype costs on these scores


def test_identical_selection():
    s = budget.check_selection(SCORES, EAGER, np.array([[0, 1, 2]]), "float32")
    assert s.ok and s.describe() == "identical"


def test_swap_within_the_score_budget_passes_and_is_reported():
    s = budget.check_selection(SCORES, EAGER, np.array([[0, 1, 3]]), "float32")
    assert s.ok and s.swaps == 1 and "swapped at ties" in s.describe()


def test_swap_outside_the_score_budget_fails_naming_the_token():
    s = budget.check_selection(SCORES, EAGER, np.array([[0, 2, 4]]), "float32")
    assert not s.ok and "#4 (rank 5)" in s.cause and "different tokens kept" in s.cause


def test_a_coarser_dtype_allows_wider_ties():
    """The tie band follows what eager in that dtype gets wrong: a 0.2 gap is a tie only if eager errs by ~0.1."""
    kept = np.array([[0, 1, 4]])
    assert not budget.check_selection(SCORES, EAGER, kept, "float16").ok
    assert budget.check_selection(SCORES, SCORES + np.array([[0, 0, 0, 0, 0.06]]), kept, "float16").ok


@pytest.mark.parametrize("kept, words", [([[2, 1, 0]], "ascending"), ([[0, 1, 9]], "out of range"), ([[0, 0, 1]], "repeated")])
def test_malformed_selections_fail(kept, words):
    assert words in budget.check_selection(SCORES, EAGER, np.array(kept), "float32").cause


# ------------------------------------------------------------------ report


def _report(dtype="float32"):
    return ValidationReport(engine="unit", reference_device="cpu", dtype=dtype, floor=budget.floor(dtype))


def test_outputs_exact_ones_exactly_and_new_key_values_in_one_row():
    truth = {"pruned_position_ids": np.array([[0, 2, 3]]), "new_key_values.0.key": TRUTH, "new_key_values.0.value": TRUTH * 2, "hidden_states": TRUTH}
    eager = {k: (v if v.dtype.kind == "i" else v * (1 + 1e-7)) for k, v in truth.items()}
    engine = dict(eager) | {"pruned_position_ids": np.array([[0, 1, 2]]), "new_key_values.0.value": truth["new_key_values.0.value"] * 1.01}
    r = _report()
    compare_outputs(r, "pivot[prefill]", truth, eager, engine)
    failed = {c.name for c in r.checks if not c.ok}
    assert failed == {"pivot[prefill] pruned_position_ids", "pivot[prefill] new_key_values.* (2)"}
    table = r.table()
    assert "FAILED: 1/3 checks" in table and "cause: pivot[prefill] new_key_values.* (2): error" in table and "x eager" in table


def test_report_json_has_the_numbers():
    r = _report()
    r.add_budget("segment1[prefill] logits", budget.error_budget(TRUTH, _noisy(1e-6), _noisy(1e-6), "float32"))
    r.add(Check("tokens", "16 equal", "equal", True))
    d = r.asdict()
    assert d["ok"] and d["multiplier"] == budget.MULTIPLIER and {"error", "eager_error", "limit", "ratio"} <= set(d["checks"][0]["numbers"])
