"""The checks of a validation, each against the float64 truth by the error-budget rule (`budget.py`): kept indices of
both stages, every output of every graph call, logits of every step, greedy tokens; and what quantization costs."""

from __future__ import annotations

from dataclasses import asdict
from typing import Callable, Sequence

import numpy as np
import torch

from ..manifest import DECODE_GRAPHS, EngineError
from ..models import LoadedModel, fingerprint_weights
from ..runtime.decode import AsSegment
from ..runtime.engine import Engine
from ..runtime.generate import Generation, held_as
from ..runtime.kvcache import NEW
from . import budget
from .quantized import activation_jitter
from .report import Check, ValidationReport

TOP_K_AT_DIVERGENCE = 5
# Graph -> (its selection output, the scores that selection ranks, from the graph's module and torch feed).
SELECTIONS: dict[str, tuple[str, Callable]] = {
    "vision": ("stage1_indices", lambda module, f: module.scores(f["pixel_values"])),
    "pivot": ("stage2_indices", lambda module, f: module.visual_scores(f["stage2_scores"], f["image_start"])),
}
EXACT_OUTPUTS = {"pruned_attention_mask", "pruned_position_ids"}  # follow the selection exactly


class Recorder:
    """Wraps a reference graph and keeps the feeds (without forced selections) and outputs of its first calls."""

    def __init__(self, graph, keep_calls: int = 2):
        self.graph, self.keep_calls, self.calls = graph, keep_calls, []
        self.to_numpy, self.nbytes, self.device = graph.to_numpy, graph.nbytes, graph.device

    def run(self, feed):
        out = self.graph.run(feed)
        if len(self.calls) < self.keep_calls:
            inputs = {
                k: np.array(self.to_numpy(feed[k])) for k in self.graph.input_names
            }  # a copy: caches are written in place
            self.calls.append((inputs, {k: self.to_numpy(v) for k, v in out.items()}))
        return out


def scores(graph, name: str, feed: dict[str, np.ndarray], dtype) -> np.ndarray:
    """The scores behind graph `name`'s selection, from the reference module on `feed` (floats cast to `dtype`)."""
    with torch.no_grad(), graph.context():
        tensors = {k: graph._tensor(v) for k, v in _cast(feed, dtype).items()}
        return SELECTIONS[name][1](graph.module, tensors).double().cpu().numpy()


def _cast(feed: dict[str, np.ndarray], dtype) -> dict[str, np.ndarray]:
    return {k: (v.astype(dtype) if v.dtype.kind == "f" else v) for k, v in feed.items()}


def compare_outputs(report: ValidationReport, label: str, truth: dict, eager: dict, engine: dict) -> None:
    """Every output of one graph call: exact ones exactly, the rest by budget; `new_key_values.*` in one row (the
    worst)."""
    groups: dict[str, list[str]] = {}
    for n in truth:
        groups.setdefault(NEW + "*" if n.startswith(NEW) else n, []).append(n)
    for group, names in groups.items():
        if group in EXACT_OUTPUTS or group in {s for s, _ in SELECTIONS.values()}:
            if group in EXACT_OUTPUTS:
                same = truth[group].shape == engine[group].shape and bool((truth[group] == engine[group]).all())
                report.add(
                    Check(
                        f"{label} {group}",
                        "identical" if same else "differs",
                        "exact",
                        same,
                        cause="" if same else f"differs from the reference's {group} for the same selection",
                    )
                )
            continue
        result = budget.group_budget(
            {n: (truth[n], eager[n], engine[n]) for n in names}, report.dtype, rows=group == "logits"
        )
        suffix = f" ({len(names)})" if len(names) > 1 else ""
        report.add_budget(f"{label} {group}{suffix}", result)


def sampled_eager(eager_graph, feed: dict, truth: dict, first: dict, samples: int, dtype) -> dict:
    """Eager's error for an int8-compute engine: the RMS over `samples` runs, the first as it is, the others with
    every activation perturbed before its int8 quantization (`activation_jitter`), returned as the worst run rescaled
    to that RMS so that the budget rule reads it unchanged.

    Why: such an engine's error is not a smooth function of rounding. A value that lands on the other side of a
    rounding boundary moves by a whole quantization step, which perturbs the next layers enough to flip many more
    (a cascade), so one run either draws no first flip (error at float rounding) or a cascade. At a decode step (a
    few rows) eager may draw none and the engine one (the real-width int4 self-check: logits 6e-7 vs 1e-2 from
    float64); the perturbed runs give the first flip more chances and so measure the cascades' size on this model
    and input.

    How much: up to the rule's own slack for two implementations' rounding, MULTIPLIER x eps of the dtype. The
    engine's kernels differ from eager's by several roundings before each quantization (a MatMulNBits output lies
    ~4 eps from its exact value, measured); with 1 eps the real-width int4 self-check still found a decode step
    where eager's cascades were 18x smaller than the engine's. A bfloat16 twin (held as float32) keeps float32's
    jitter: its own bfloat16 rounding at every op already perturbs its activations by more and draws the cascades; a
    jitter of 10 bfloat16 eps (7.8 %) loosened the budgets until a planted defect passed (stage-2 scores from layer
    P - 1, an int4 engine on OpenVINO)."""
    runs = [first]
    for seed in range(1, samples):
        with activation_jitter(budget.MULTIPLIER * float(np.finfo(dtype).eps), seed):
            runs.append({k: eager_graph.to_numpy(v) for k, v in eager_graph.run(feed).items()})
    out = {}
    for k, t in truth.items():
        errs = [float(budget.relative_error(r[k], t).max()) for r in runs] if first[k].dtype.kind == "f" else [0.0]
        worst = int(np.argmax(errs))
        if errs[worst] == 0 or not np.isfinite(errs[worst]):
            out[k] = first[k]
        else:
            out[k] = t + (runs[worst][k].astype(np.float64) - t) * (
                float(np.sqrt(np.mean(np.square(errs)))) / errs[worst]
            )
    return out


def check_graph_call(
    report: ValidationReport,
    call: str,
    name: str,
    engine_graph,
    truth_graph,
    eager_graph,
    feed: dict[str, np.ndarray],
    samples: int = 1,
    subset: bool = False,
) -> None:
    """One call of graph `name`: the engine graph on `feed` rounded to its dtype, against both eager graphs on the
    same feed (float64 for the truth), forced onto the engine's selection once that selection is judged; eager's
    error over `samples` runs (`sampled_eager`) where one run is not a fair sample. `subset`: the engine graph returns
    some of graph `name`'s outputs (a decode graph: no stage-2 scores); those are compared."""
    dtype = held_as(report.dtype)
    fed = _cast(feed, dtype)
    wide = _cast(fed, np.float64)
    got = {k: engine_graph.to_numpy(v) for k, v in engine_graph.run(fed).items()}
    forced = {}
    if name in SELECTIONS:
        out = SELECTIONS[name][0]
        ranked = scores(truth_graph, name, wide, np.float64), scores(eager_graph, name, fed, dtype)
        report.add_selection(f"{call} {out}", budget.check_selection(*ranked, got[out], report.dtype))
        forced = {out: got[out]}
    t = {k: truth_graph.to_numpy(v) for k, v in truth_graph.run(wide | forced).items() if not subset or k in got}
    e = {k: eager_graph.to_numpy(v) for k, v in eager_graph.run(fed | forced).items() if not subset or k in got}
    if samples > 1:
        e = sampled_eager(eager_graph, fed | forced, t, e, samples, dtype)
    compare_outputs(report, call, t, e, got)


def check_graphs(
    report: ValidationReport, engine: Engine, truth: dict, eager: dict, recorders: dict[str, Recorder], samples: int = 1
) -> None:
    """Each engine graph on the truth's own recorded feeds (prefill, first decode step); `truth`, `eager`:
    name -> TorchGraph, unwrapped."""
    for name, rec in recorders.items():
        for i, (feed, _) in enumerate(rec.calls):
            call = f"{name}[{'prefill' if i == 0 else 'decode'}]"
            check_graph_call(report, call, name, engine.graphs[name], truth[name], eager[name], feed, samples)
    # The decode graphs on their segment's decode feed: the outputs, and the cache slot GQA wrote as new_key_values.
    for segment, name in DECODE_GRAPHS.items():
        if name in engine.graphs and len(recorders[segment].calls) > 1:
            feed = recorders[segment].calls[1][0]
            check_graph_call(
                report,
                f"{name}[decode]",
                segment,
                AsSegment(engine.graphs[name]),
                truth[segment],
                eager[segment],
                feed,
                samples,
                subset=True,
            )


def _top(logits: np.ndarray) -> np.ndarray:
    return np.argsort(-logits, kind="stable")[:TOP_K_AT_DIVERGENCE]


def check_tokens(report: ValidationReport, label: str, truth: Generation, eager: Generation, got: Generation) -> None:
    """Greedy tokens at every step (the references were fed the engine's tokens). Where the engine's token is
    not the truth's argmax, the float64 logit gap between the two must lie within twice the logits' budget, and
    each token must be in the other side's top-5 -- the latter wherever eager in the engine's dtype meets it
    reproduces float64's greedy tokens itself (a dtype that cannot reproduce float64's ranking on a model
    cannot be asked to; the report says so)."""
    dtype = report.dtype
    rows = [
        [(truth.logits[s][row], eager.logits[s][row], got.logits[s][row]) for s in range(len(tokens))]
        for row, tokens in enumerate(got.token_ids)
    ]
    lost = sum(int(np.argmax(t)) != int(np.argmax(r)) for steps in rows for t, r, _ in steps)
    attainable = lost == 0
    # eager's error at a step, at least the RMS over the steps (budget's group rule: int8-compute engines, whose errors
    # come as rare quantization flips, make one step's error a noisy sample)
    steps_error = {
        (row, s): float(np.abs(r - t).max()) for row, steps in enumerate(rows) for s, (t, r, _) in enumerate(steps)
    }
    eager_error = dict(zip(steps_error, budget.at_least_rms(np.array(list(steps_error.values())))))
    for row, (tokens, steps) in enumerate(zip(got.token_ids, rows)):
        own = [(int(np.argmax(t)), int(np.argmax(r))) for t, r, _ in steps]
        bad = first = None
        for step, (token, (t, r, g)) in enumerate(zip(tokens, steps)):
            best = own[step][0]
            if best == token:
                continue
            gap = float(t[best] - t[token])
            limit = 2 * (
                budget.MULTIPLIER * float(eager_error[row, step]) + budget.floor(dtype) * float(np.abs(t).max())
            )
            ok = gap <= limit and (not attainable or (token in _top(t) and best in _top(g)))
            first = first or (step, best, token, gap, limit)
            if not ok:
                bad = (step, best, token, gap, limit)
                break
        name = f"{label} row {row} greedy tokens"
        if first is None:
            report.add(Check(name, f"{len(tokens)} equal", "equal", True))
            continue
        step, best, token, gap, limit = bad or first
        text = f"step {step}: float64 {best}, engine {token}, gap {gap:.2e}"
        cause = "" if bad is None else f"{text}: > {limit:.2e}, or not in each other's top-{TOP_K_AT_DIVERGENCE}"
        rule = f"gap <= {limit:.2e}" + (f", top-{TOP_K_AT_DIVERGENCE}" if attainable else "")
        report.add(Check(name, text, rule, bad is None, cause=cause))
    if lost:
        steps = sum(len(tokens) for tokens in got.token_ids)
        report.notes.append(
            f"{label}: eager {dtype} itself picks another token than float64 at {lost} of {steps} steps: "
            f"{dtype} is not accurate enough for this model's greedy output (an engine can only match eager {dtype})"
        )


def quality_vs_float(report: ValidationReport, label: str, reference: np.ndarray, engine: np.ndarray) -> None:
    """What weight quantization costs, per generated step (the unquantized float64 model forced onto the engine's
    tokens): greedy agreement, the engine's token in the unquantized top-5, KL(unquantized || engine). Reported,
    not judged: on random weights these numbers say nothing about a real checkpoint (see README)."""
    ref = reference - reference.max(-1, keepdims=True)
    eng = engine.astype(np.float64) - engine.max(-1, keepdims=True)
    p = np.exp(ref) / np.exp(ref).sum(-1, keepdims=True)
    log_q = eng - np.log(np.exp(eng).sum(-1, keepdims=True))
    kl = (p * (np.log(np.clip(p, 1e-300, None)) - log_q)).sum(-1)
    tokens = engine.argmax(-1)
    agree = float((reference.argmax(-1) == tokens).mean())
    top5 = float(np.mean([t in _top(r) for t, r in zip(tokens, reference)]))
    report.quality[label] = {
        "greedy_agreement": agree,
        "top5_containment": top5,
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
    }
    report.notes.append(
        f"{label}: vs the unquantized model: greedy agreement {agree:.3f}, top-5 containment {top5:.3f}, "
        f"KL mean {kl.mean():.2e} max {kl.max():.2e} ({len(tokens)} steps)"
    )


def check_end_to_end(
    report: ValidationReport,
    label: str,
    got: Generation,
    truth: Generation,
    eager: Generation,
    s1: Sequence[np.ndarray],
    s2: Sequence[np.ndarray],
    plain: Generation | None = None,
) -> None:
    """The decisive and end-to-end checks of one batch: both stages' kept indices against the (truth, eager) scores
    `s1` / `s2`, the logits of every step, greedy tokens; with `plain` (the unquantized truth), what quantization
    costs."""
    report.add_selection(f"{label} stage1_indices", budget.check_selection(*s1, got.stage1_indices, report.dtype))
    report.add_selection(f"{label} stage2_indices", budget.check_selection(*s2, got.stage2_indices, report.dtype))
    lengths = [len(row) for row in got.token_ids]
    logits = [stack_logits(g, lengths) for g in (truth, eager, got)]
    report.add_budget(
        f"{label} logits ({len(logits[0])} step-rows)", budget.error_budget(*logits, report.dtype, rows=True)
    )
    check_tokens(report, label, truth, eager, got)
    if plain is not None:
        quality_vs_float(report, label, stack_logits(plain, lengths), logits[2])


def stack_logits(gen: Generation, lengths: list[int]) -> np.ndarray:
    """(rows, vocab) of every (step, row) the engine generated."""
    return np.stack([gen.logits[s][b] for b, n in enumerate(lengths) for s in range(n)])


def check_same_model(loaded: LoadedModel, engine: Engine) -> None:
    """Refuse (usage error) a reference model that is not the engine's: other architecture or other weights."""
    mine, theirs = asdict(loaded.spec), asdict(engine.spec)
    differ = [f"{k} {mine[k]!r} vs engine {theirs[k]!r}" for k in theirs if mine.get(k) != theirs[k]]
    name = loaded.source.get("name")
    if differ:
        raise EngineError(
            f"the model {name!r} does not have the engine's architecture ({'; '.join(differ)}): pass the engine's "
            "source model with --model"
        )
    a, b = loaded.source.get("fingerprint"), engine.manifest.source.get("fingerprint")
    if a and b and b.startswith("sha256-weights:") and not a.startswith("sha256-weights:"):
        a = fingerprint_weights(loaded.model)  # the engine's source was in memory, so small (same architecture)
    comparable = a and b and a.split(":")[0] == b.split(":")[0]  # same scheme (models.fingerprint_*)
    if comparable and a != b:
        raise EngineError(
            f"this is not the model the engine was built from: {name!r} has fingerprint {a[:19]}..., the engine's "
            f"source {engine.manifest.source_name!r} had {b[:19]}...; pass the engine's source model with --model"
        )
