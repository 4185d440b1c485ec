"""Error budgets: how far an engine's output may lie from the truth, measured on the model at hand.

Every compared output comes from three runs on the same input: the eager reference in float64 (the
truth), the eager reference in the engine's own dtype, and the engine. The eager run's distance from the
truth is what that dtype costs on this model, this input and this output; an engine is as good as eager
PyTorch when its own distance is of the same size. The rule is that of PyTorch's accuracy harness
(`torch._dynamo.utils.same(..., fp64_ref=...)`):

    err(engine) <= MULTIPLIER * err(eager) + FLOOR_ULPS * eps(dtype)
    err(x) = ||x - truth|| / ||truth||        per tensor; per row for logits; where several rows or
                                              tensors of one kind are judged together (logits rows, a
                                              segment's K/V caches), err(eager) of each is at least the
                                              RMS of eager's errors over the group

No constant here was fitted to a model: `eps` is the dtype's machine epsilon, the floor covers outputs
that eager computes exactly (a gather, a copy) where the engine may still round once or twice, and
MULTIPLIER is the stated slack for two implementations that sum in different orders (README: the ratios
measured on the sweep in tests/test_validate_sweep.py).

A selection (TopK) is judged on the truth's scores: the engine's kept set is accepted when it is a top-k
of some scores each within `b` of the truth, `b` being the same budget applied to the scores, i.e. when
max(truth score of a dropped token) - min(truth score of a kept token) <= 2 b. Anything else is a
different selection, and the report names the tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Slack for two implementations that sum in different orders. Measured on the 24-model sweep
# (tests/test_validate_sweep.py, run with -m slow): median 1.0, 95th percentile 1.8, max 5.4 (float32, x8-sharpened
# attention).
MULTIPLIER = 10.0
FLOOR_ULPS = 4  # ulps of the dtype, relative: outputs eager computes exactly (a gather) that the engine rounds
EPS = {name: float(np.finfo(name).eps) for name in ("float16", "float32", "float64")} | {"bfloat16": 2.0**-7}  # 8-bit
# significand (numpy has no bfloat16 to ask)


def floor(dtype: str) -> float:
    return FLOOR_ULPS * EPS[dtype]


def _rows(x: np.ndarray, rows: bool) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x.reshape(-1, x.shape[-1]) if rows and x.ndim > 1 else x.reshape(1, -1)


def relative_error(x: np.ndarray, truth: np.ndarray, rows: bool = False) -> np.ndarray:
    """||x - truth|| / ||truth||, one value per row (`rows`) or one for the tensor; inf where x is not finite."""
    x, t = _rows(x, rows), _rows(truth, rows)
    scale = np.linalg.norm(t, axis=1)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.linalg.norm(x - t, axis=1) / np.where(scale > 0, scale, 1.0)
    return np.where(np.isfinite(x).all(axis=1), err, np.inf)


@dataclass(frozen=True)
class Budget:
    """One output's verdict: the worst row's engine error against its budget."""

    error: float  # engine vs truth
    eager_error: float  # eager, same dtype, vs truth (same row)
    limit: float  # MULTIPLIER * eager_error + floor
    max_abs: float  # max |engine - truth| over the tensor, information only
    cause: str = ""  # why it failed, in words ("" when it passed)

    @property
    def ok(self) -> bool:
        return not self.cause

    @property
    def ratio(self) -> float:
        """The multiplier this output needed: engine error / eager error."""
        return self.error / self.eager_error if self.eager_error > 0 else (0.0 if self.error == 0 else np.inf)


def at_least_rms(eager_errors: np.ndarray) -> np.ndarray:
    """Each eager error raised to the RMS of them all where it is lower. One row's (or tensor's, or step's) eager
    error is one sample of what the dtype costs; where eager was lucky on one, the level the dtype shows over all of
    them stands in, so the budget does not hinge on a lucky sample."""
    eager_errors = np.asarray(eager_errors, dtype=np.float64)
    return np.maximum(eager_errors, np.sqrt(np.mean(eager_errors**2)))


def error_budget(truth: np.ndarray, eager: np.ndarray, engine: np.ndarray, dtype: str, *, rows: bool = False) -> Budget:
    """Judge `engine` against `truth` (float64) with the error `eager` (the engine's dtype) makes on it."""
    return group_budget({"": (truth, eager, engine)}, dtype, rows=rows)


def group_budget(
    tensors: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], dtype: str, *, rows: bool = False
) -> Budget:
    """Judge tensors of one kind together (name -> truth, eager, engine; e.g. a segment's K/V caches): every tensor
    (or row) with its own error, against a budget from the eager error level of the group."""
    e, r, names, max_abs = [], [], [], 0.0
    eager_finite = engine_finite = True
    for name, (truth, eager, engine) in tensors.items():
        truth, eager, engine = (np.asarray(a) for a in (truth, eager, engine))
        if truth.shape != engine.shape:
            return Budget(np.inf, np.nan, np.nan, np.inf, f"shape {list(engine.shape)}, expected {list(truth.shape)}")
        eager_finite &= bool(np.isfinite(eager).all())
        engine_finite &= bool(np.isfinite(engine).all())
        e.append(relative_error(engine, truth, rows))
        r.append(relative_error(eager, truth, rows))
        names += [(name, row) for row in range(len(e[-1]))]
        if engine_finite:
            max_abs = max(max_abs, float(np.abs(engine.astype(np.float64) - truth.astype(np.float64)).max(initial=0.0)))
    e, r = np.concatenate(e), np.concatenate(r)
    if len(r) > 1 and np.isfinite(r).all():
        r = at_least_rms(r)
    limit = MULTIPLIER * r + floor(dtype)
    worst = int(np.argmax(np.where(np.isfinite(limit), e / limit, np.inf)))
    cause = ""
    if not eager_finite:
        cause = (
            f"the eager {dtype} reference itself overflows (inf/NaN): this model does not run in {dtype}; "
            "export float32"
        )
    elif not engine_finite:
        cause = f"non-finite values (inf/NaN) in the engine's output, none in eager {dtype}: an overflow in the engine"
    elif not e[worst] <= limit[worst]:
        tensor, row = names[worst]
        where = "".join([f" in {tensor}" if len(tensors) > 1 else "", f" (row {row})" if rows and len(e) > 1 else ""])
        cause = (
            f"error {e[worst]:.2e}{where} > budget {limit[worst]:.2e} = {MULTIPLIER:g} x eager {r[worst]:.2e} + floor"
        )
    return Budget(float(e[worst]), float(r[worst]), float(limit[worst]), max_abs if engine_finite else np.inf, cause)


@dataclass(frozen=True)
class Selection:
    """A kept-index set judged on the truth's scores."""

    swaps: int  # tokens the engine kept that the truth's top-k does not hold (all rows)
    gap: float  # worst row: max truth score dropped - min truth score kept (<= 0 when identical)
    limit: float  # 2 x that row's score budget
    cause: str = ""

    @property
    def ok(self) -> bool:
        return not self.cause

    def describe(self) -> str:
        if self.cause:
            return self.cause
        if not self.swaps:
            return "identical"
        return f"{self.swaps} swapped at ties: score gap {self.gap:.2e} <= {self.limit:.2e}"


def check_selection(truth_scores: np.ndarray, eager_scores: np.ndarray, kept: np.ndarray, dtype: str) -> Selection:
    """`kept` (B, k): the engine's ascending indices into the scored tokens; scores (B, N): truth (float64)
    and the eager run in the engine's dtype, for the budget of each row."""
    truth_scores, eager_scores, kept = (
        np.asarray(truth_scores, np.float64),
        np.asarray(eager_scores, np.float64),
        np.asarray(kept),
    )
    swaps, worst = 0, (-np.inf, 0.0)
    for b, (t, r, idx) in enumerate(zip(truth_scores, eager_scores, kept)):
        n, k = len(t), len(idx)
        if (idx < 0).any() or (idx >= n).any() or len(np.unique(idx)) != k:
            return Selection(swaps, np.inf, 0.0, f"row {b}: indices out of range or repeated (k={k}, {n} tokens)")
        if k > 1 and not (np.diff(idx) > 0).all():
            return Selection(swaps, np.inf, 0.0, f"row {b}: kept indices are not in ascending (original) order")
        if not np.isfinite(r).all():
            return Selection(swaps, np.inf, 0.0, f"row {b}: the eager {dtype} scores are not finite")
        budget = MULTIPLIER * float(np.abs(r - t).max()) + floor(dtype) * float(np.abs(t).max())
        top = np.argsort(-t, kind="stable")[:k]
        extra = np.setdiff1d(idx, top)
        swaps += len(extra)
        dropped = np.setdiff1d(np.arange(n), idx)
        gap = (t[dropped].max() if len(dropped) else -np.inf) - t[idx].min()
        if len(extra) and gap > 2 * budget:
            rank = np.empty(n, np.int64)
            rank[np.argsort(-t, kind="stable")] = np.arange(n)
            named = ", ".join(f"#{j} (rank {rank[j] + 1})" for j in extra[:3])
            return Selection(
                swaps,
                float(gap),
                2 * budget,
                f"row {b}: different tokens kept: {named}{' ...' if len(extra) > 3 else ''} of top-{k}; score gap "
                f"{gap:.2e} > {2 * budget:.2e} (2 x budget)",
            )
        if len(extra) and gap - 2 * budget > worst[0] - worst[1]:
            worst = (float(gap), 2 * budget)
    return Selection(swaps, *(worst if swaps else (0.0, 0.0)))
