"""`star-validate`: an engine against the eager PyTorch reference, judged by measured error budgets.

Three runs per case: the engine; the eager reference in float64 (the truth); the eager reference in the
engine's dtype (what that dtype costs on this model). Both eager runs are forced onto the engine's kept
indices and tokens (teacher forcing), so every value is compared between the same computations; whether
the engine's own choices were right is checked first, on the truth's scores (`budget.check_selection`)
and logits. The rule for every value is `budget.error_budget`.

    decisive, end to end    stage-1 / stage-2 kept indices; greedy tokens at every step
    values, end to end      logits of every step, per row
    values, per graph       each graph fed the truth's own inputs (prefill and one decode step), every output
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from . import budget
from .config import StarSchedule
from .export.quantize import WeightScheme, activation_jitter, matmul_compute, quantized_note, quantized_reference
from .memory import validation_mode
from .errors import UserError
from .manifest import EngineError
from .models import LoadedModel, fingerprint_weights, load_model
from .reference import reference_pipeline
from .export.decode_graphs import DECODE_GRAPHS, decode_graph_names
from .runtime.decode import AsSegment
from .runtime.engine import Engine
from .runtime.generate import Forcing, Generation, Sampling
from .runtime.inputs import prompt_length, synthetic_image
from .runtime.kvcache import NEW

BUILTIN_QUESTIONS = (
    "What is in the image?",
    "How many objects are on the table, and what colour is the largest one?",
    "Describe the picture.",
)
TOP_K_AT_DIVERGENCE = 5
# eager runs per graph call for an int8-compute engine (`sampled_eager`)
INT8_EAGER_SAMPLES = 8
# Graph -> (its selection output, the scores that selection ranks, from the graph's module and torch feed).
SELECTIONS: dict[str, tuple[str, Callable]] = {
    "vision": ("stage1_indices", lambda module, f: module.scores(f["pixel_values"])),
    "pivot": ("stage2_indices", lambda module, f: module.visual_scores(f["stage2_scores"], f["image_start"])),
}
EXACT_OUTPUTS = {"pruned_attention_mask", "pruned_position_ids"}  # follow the selection exactly


@dataclass
class Check:
    name: str
    measured: str  # the engine's error, or what was compared
    budget: str  # what it had to meet
    ok: bool
    multiplier: str = ""  # engine error / eager error, for budgeted values
    cause: str = ""  # why it failed, in words
    numbers: dict[str, float] = field(default_factory=dict)


@dataclass
class ValidationReport:
    engine: str
    reference_device: str
    dtype: str
    multiplier: float = budget.MULTIPLIER
    floor: float = 0.0
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    quality: dict[str, dict] = field(default_factory=dict)  # quantized engines: vs the unquantized model, per batch

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def add(self, check: Check) -> None:
        self.checks.append(check)

    def add_budget(self, name: str, b: budget.Budget) -> None:
        self.add(Check(
            name, f"{b.error:.2e} (max abs {b.max_abs:.1e})", f"{b.limit:.2e}", b.ok, f"{b.ratio:.2f}", b.cause,
            {"error": b.error, "eager_error": b.eager_error, "limit": b.limit, "ratio": b.ratio, "max_abs": b.max_abs},
        ))

    def add_selection(self, name: str, s: budget.Selection) -> None:
        self.add(Check(name, s.describe(), "top-k within 2 x score budget", s.ok, cause=s.cause,
                       numbers={"swaps": s.swaps, "gap": s.gap, "limit": s.limit}))

    def table(self) -> str:
        w = max([len(c.name) for c in self.checks] + [5])
        head = f"{'check':<{w}}  {'engine error':<30}  {'budget':<28}  {'x eager':>7}  result"
        lines = [head]
        for c in self.checks:
            lines.append(f"{c.name:<{w}}  {c.measured:<30}  {c.budget:<28}  {c.multiplier:>7}  {'ok' if c.ok else 'FAIL'}")
        lines.append(
            f"rule: relative error ||engine - float64|| / ||float64|| <= {self.multiplier:g} x that of eager {self.dtype} "
            f"+ {budget.FLOOR_ULPS} ulp ({self.floor:.1e}); 'x eager' is the multiplier each output needed"
        )
        lines += [f"note: {n}" for n in self.notes]
        failed = [c for c in self.checks if not c.ok]
        lines += [f"cause: {c.name}: {c.cause}" for c in failed]
        lines.append(f"{'PASSED' if self.ok else 'FAILED'}: {len(self.checks) - len(failed)}/{len(self.checks)} checks")
        return "\n".join(lines)

    def summary(self) -> str:
        """One line: the verdict, and the largest multiplier any value needed against the one allowed."""
        ratios = [c.numbers["ratio"] for c in self.checks if "ratio" in c.numbers]
        worst = f"; largest multiplier {max(ratios):.2f} of {self.multiplier:g} allowed" if ratios else ""
        ok = sum(c.ok for c in self.checks)
        return f"{'PASSED' if self.ok else 'FAILED'}: {ok}/{len(self.checks)} checks against the float64 reference{worst}"

    def asdict(self) -> dict:
        return asdict(self) | {"ok": self.ok}


class _Recorder:
    """Wraps a reference graph and keeps the feeds (without forced selections) and outputs of its first calls."""

    def __init__(self, graph, keep_calls: int = 2):
        self.graph, self.keep_calls, self.calls = graph, keep_calls, []
        self.to_numpy, self.nbytes, self.device = graph.to_numpy, graph.nbytes, graph.device

    def run(self, feed):
        out = self.graph.run(feed)
        if len(self.calls) < self.keep_calls:
            inputs = {k: np.array(self.to_numpy(feed[k])) for k in self.graph.input_names}  # a copy: caches are written in place
            self.calls.append((inputs, {k: self.to_numpy(v) for k, v in out.items()}))
        return out


def _scores(graph, name: str, feed: dict[str, np.ndarray], dtype) -> np.ndarray:
    """The scores behind graph `name`'s selection, from the reference module on `feed` (floats cast to `dtype`)."""
    import torch

    with torch.no_grad(), graph.context():
        tensors = {k: graph._tensor(v) for k, v in _cast(feed, dtype).items()}
        return SELECTIONS[name][1](graph.module, tensors).double().cpu().numpy()


def _cast(feed: dict[str, np.ndarray], dtype) -> dict[str, np.ndarray]:
    return {k: (v.astype(dtype) if v.dtype.kind == "f" else v) for k, v in feed.items()}


def compare_outputs(report: ValidationReport, label: str, truth: dict, eager: dict, engine: dict) -> None:
    """Every output of one graph call: exact ones exactly, the rest by budget; `new_key_values.*` in one row (the worst)."""
    groups: dict[str, list[str]] = {}
    for n in truth:
        groups.setdefault(NEW + "*" if n.startswith(NEW) else n, []).append(n)
    for group, names in groups.items():
        if group in EXACT_OUTPUTS or group in {s for s, _ in SELECTIONS.values()}:
            if group in EXACT_OUTPUTS:
                same = truth[group].shape == engine[group].shape and bool((truth[group] == engine[group]).all())
                report.add(Check(f"{label} {group}", "identical" if same else "differs", "exact", same,
                                 cause="" if same else f"differs from the reference's {group} for the same selection"))
            continue
        result = budget.group_budget({n: (truth[n], eager[n], engine[n]) for n in names}, report.dtype, rows=group == "logits")
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
    where eager's cascades were 18x smaller than the engine's."""
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
            out[k] = t + (runs[worst][k].astype(np.float64) - t) * (float(np.sqrt(np.mean(np.square(errs)))) / errs[worst])
    return out


def check_graph_call(report: ValidationReport, call: str, name: str, engine_graph, truth_graph, eager_graph, feed: dict[str, np.ndarray],
                     samples: int = 1, subset: bool = False) -> None:
    """One call of graph `name`: the engine graph on `feed` rounded to its dtype, against both eager graphs on the
    same feed (float64 for the truth), forced onto the engine's selection once that selection is judged; eager's
    error over `samples` runs (`sampled_eager`) where one run is not a fair sample. `subset`: the engine graph returns
    some of graph `name`'s outputs (a decode graph: no stage-2 scores); those are compared."""
    dtype = np.dtype(report.dtype)
    fed = _cast(feed, dtype)
    wide = _cast(fed, np.float64)
    got = {k: engine_graph.to_numpy(v) for k, v in engine_graph.run(fed).items()}
    forced = {}
    if name in SELECTIONS:
        out = SELECTIONS[name][0]
        scores = _scores(truth_graph, name, wide, np.float64), _scores(eager_graph, name, fed, dtype)
        report.add_selection(f"{call} {out}", budget.check_selection(*scores, got[out], report.dtype))
        forced = {out: got[out]}
    t = {k: truth_graph.to_numpy(v) for k, v in truth_graph.run(wide | forced).items() if not subset or k in got}
    e = {k: eager_graph.to_numpy(v) for k, v in eager_graph.run(fed | forced).items() if not subset or k in got}
    if samples > 1:
        e = sampled_eager(eager_graph, fed | forced, t, e, samples, dtype)
    compare_outputs(report, call, t, e, got)


def check_graphs(report: ValidationReport, engine: Engine, truth: dict, eager: dict, recorders: dict[str, _Recorder], samples: int = 1) -> None:
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
            check_graph_call(report, f"{name}[decode]", segment, AsSegment(engine.graphs[name]), truth[segment], eager[segment], feed, samples, subset=True)


def _top(logits: np.ndarray) -> np.ndarray:
    return np.argsort(-logits, kind="stable")[:TOP_K_AT_DIVERGENCE]


def check_tokens(report: ValidationReport, label: str, truth: Generation, eager: Generation, got: Generation) -> None:
    """Greedy tokens at every step (the references were fed the engine's tokens). Where the engine's token is
    not the truth's argmax, the float64 logit gap between the two must lie within twice the logits' budget, and
    each token must be in the other side's top-5 -- the latter wherever eager in the engine's dtype meets it
    reproduces float64's greedy tokens itself (a dtype that cannot reproduce float64's ranking on a model
    cannot be asked to; the report says so)."""
    dtype = report.dtype
    rows = [[(truth.logits[s][row], eager.logits[s][row], got.logits[s][row]) for s in range(len(tokens))] for row, tokens in enumerate(got.token_ids)]
    lost = sum(int(np.argmax(t)) != int(np.argmax(r)) for steps in rows for t, r, _ in steps)
    attainable = lost == 0
    # eager's error at a step, at least the RMS over the steps (budget's group rule: int8-compute engines, whose errors
    # come as rare quantization flips, make one step's error a noisy sample)
    steps_error = {(row, s): float(np.abs(r - t).max()) for row, steps in enumerate(rows) for s, (t, r, _) in enumerate(steps)}
    eager_error = dict(zip(steps_error, budget.at_least_rms(np.array(list(steps_error.values())))))
    for row, (tokens, steps) in enumerate(zip(got.token_ids, rows)):
        own = [(int(np.argmax(t)), int(np.argmax(r))) for t, r, _ in steps]
        bad = first = None
        for step, (token, (t, r, g)) in enumerate(zip(tokens, steps)):
            best = own[step][0]
            if best == token:
                continue
            gap = float(t[best] - t[token])
            limit = 2 * (budget.MULTIPLIER * float(eager_error[row, step]) + budget.floor(dtype) * float(np.abs(t).max()))
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
    report.quality[label] = {"greedy_agreement": agree, "top5_containment": top5, "kl_mean": float(kl.mean()), "kl_max": float(kl.max())}
    report.notes.append(f"{label}: vs the unquantized model: greedy agreement {agree:.3f}, top-5 containment {top5:.3f}, "
                        f"KL mean {kl.mean():.2e} max {kl.max():.2e} ({len(tokens)} steps)")


def check_end_to_end(report: ValidationReport, label: str, got: Generation, truth: Generation, eager: Generation,
                     s1: Sequence[np.ndarray], s2: Sequence[np.ndarray], plain: Generation | None = None) -> None:
    """The decisive and end-to-end checks of one batch: both stages' kept indices against the (truth, eager) scores
    `s1` / `s2`, the logits of every step, greedy tokens; with `plain` (the unquantized truth), what quantization costs."""
    report.add_selection(f"{label} stage1_indices", budget.check_selection(*s1, got.stage1_indices, report.dtype))
    report.add_selection(f"{label} stage2_indices", budget.check_selection(*s2, got.stage2_indices, report.dtype))
    lengths = [len(row) for row in got.token_ids]
    logits = [_stack_logits(g, lengths) for g in (truth, eager, got)]
    report.add_budget(f"{label} logits ({len(logits[0])} step-rows)", budget.error_budget(*logits, report.dtype, rows=True))
    check_tokens(report, label, truth, eager, got)
    if plain is not None:
        quality_vs_float(report, label, _stack_logits(plain, lengths), logits[2])


def _stack_logits(gen: Generation, lengths: list[int]) -> np.ndarray:
    """(rows, vocab) of every (step, row) the engine generated."""
    return np.stack([gen.logits[s][b] for b, n in enumerate(lengths) for s in range(n)])


def check_same_model(loaded: LoadedModel, engine: Engine) -> None:
    """Refuse (usage error) a reference model that is not the engine's: other architecture or other weights."""
    mine, theirs = asdict(loaded.spec), asdict(engine.spec)
    differ = [f"{k} {mine[k]!r} vs engine {theirs[k]!r}" for k in theirs if mine.get(k) != theirs[k]]
    name = loaded.source.get("name")
    if differ:
        raise EngineError(f"the model {name!r} does not have the engine's architecture ({'; '.join(differ)}): pass the engine's source model with --model")
    a, b = loaded.source.get("fingerprint"), engine.manifest.get("source", {}).get("fingerprint")
    if a and b and b.startswith("sha256-weights:") and not a.startswith("sha256-weights:"):
        a = fingerprint_weights(loaded.model)  # the engine's source was in memory, so small (same architecture)
    comparable = a and b and a.split(":")[0] == b.split(":")[0]  # same scheme (models.fingerprint_*)
    if comparable and a != b:
        raise EngineError(
            f"this is not the model the engine was built from: {name!r} has fingerprint {a[:19]}..., the engine's source "
            f"{engine.manifest['source'].get('name')!r} had {b[:19]}...; pass the engine's source model with --model"
        )


def _mode(engine_dir, engine=None) -> str:
    """How to validate here (memory.VALIDATION_MODES), from star.json alone, before the engine or the model loads;
    refuses (exit 2) what this machine cannot hold."""
    from pathlib import Path

    from .config import ModelSpec
    from .manifest import read_manifest

    try:
        m = engine.manifest if engine is not None else read_manifest(Path(engine_dir), verify=False)
        spec, schedule = ModelSpec.from_dict(m["model"]), StarSchedule(**m["schedule"])
        dtype, scheme = m["dtype"], WeightScheme.from_dict(m.get("weights"))
    except (UserError, KeyError, TypeError, ValueError):
        return "whole"  # the engine's own loading names what is wrong with it
    return validation_mode(spec, schedule, dtype, scheme, decode_graphs=bool(decode_graph_names(m["graphs"])))


def validate_engine(
    engine_dir,
    *,
    model: str | None = None,
    loaded: LoadedModel | None = None,
    engine: Engine | None = None,
    device: str = "cpu",
    images: Sequence[Any] = (),
    prompts: Sequence[str] = (),
    max_new_tokens: int = 16,
    provider: str = "cpu",
    allow_fallback: bool = False,
    mode: str | None = None,
    progress=None,
) -> ValidationReport:
    """Compare the engine in `engine_dir` with the eager reference of its source model (or `model`).
    `loaded` / `engine`: already loaded (by star-export), so neither is loaded twice."""
    import torch

    if device == "cuda" and not torch.cuda.is_available() and not allow_fallback:
        raise UserError("--device cuda: torch sees no CUDA GPU here: run where one is, use --device cpu, or pass --allow-fallback")
    mode = mode or _mode(engine_dir, engine)
    engine = engine or Engine.from_dir(engine_dir, provider=provider, allow_fallback=allow_fallback, lazy=mode == "streamed-lazy")
    manifest = engine.manifest
    dtype = manifest["dtype"]
    report = ValidationReport(engine=str(engine_dir), reference_device=device, dtype=dtype, floor=budget.floor(dtype))
    if device == "cuda" and not torch.cuda.is_available():
        msg = "--device cuda: torch sees no CUDA GPU here; the reference ran on the CPU (--allow-fallback)"
        print(f"warning: {msg}", file=sys.stderr)
        report.notes.append(msg)
        report.reference_device = device = "cpu"
    loaded = loaded or load_model(model or manifest["source"]["name"])
    check_same_model(loaded, engine)
    if decode_graph_names(manifest["graphs"]) and not decode_graph_names(engine.graphs):
        why = ("the engine ran one graph at a time (memory), which decodes with the segment graphs" if mode == "streamed-lazy"
               else f"they run on ONNX Runtime's CPU provider only, and this engine ran on {engine.provider}")
        report.notes.append(f"the engine's ONNX Runtime decode graphs were not checked (star-run uses them on the CPU provider): {why}")
    if mode != "whole":
        from .validate_streamed import STREAMED_TOKENS, validate_streamed

        return validate_streamed(report, engine, loaded, images=images, prompts=prompts,
                                 max_new_tokens=min(max_new_tokens, STREAMED_TOKENS), progress=progress)
    schedule = StarSchedule(**manifest["schedule"])
    scheme = WeightScheme.from_dict(manifest.get("weights"))
    plain, samples = None, 1
    if scheme.quantized:
        # The references hold the engine's own quantized weights (the float rule then applies unchanged); what
        # quantization costs against the unquantized model is measured on top (quality_vs_float).
        plain = reference_pipeline(loaded, schedule, device=device, dtype="float64")
        compute = matmul_compute(scheme, dtype, engine.providers)
        samples = INT8_EAGER_SAMPLES if compute == "int8" else 1
        loaded = quantized_reference(loaded, scheme, dtype, compute)
        report.notes.append(quantized_note(scheme, compute, engine.provider))
    eager = reference_pipeline(loaded, schedule, device=device, dtype=dtype)
    truth = reference_pipeline(loaded, schedule, device=device, dtype="float64")
    graphs = {"truth": dict(truth.graphs), "eager": dict(eager.graphs)}  # unwrapped, for scores and per-graph runs
    recorders = {name: _Recorder(g) for name, g in truth.graphs.items()}
    truth.graphs = recorders
    eager_pivot = eager.graphs["pivot"] = _Recorder(eager.graphs["pivot"], keep_calls=1)
    dtypes = {"truth": np.float64, "eager": engine.pipeline.np_dtype}

    # Built-in cases that do not fit the engine's --max-input-len are left out (with a note); the user's must fit.
    limit, V = engine.limits["max_input_len"], engine.spec.num_vision_tokens
    builtin = [(synthetic_image(i), q) for i, q in enumerate(BUILTIN_QUESTIONS) if prompt_length(engine.processor, q, V) <= limit]
    if len(builtin) < len(BUILTIN_QUESTIONS):
        report.notes.append(f"{len(BUILTIN_QUESTIONS) - len(builtin)} built-in case(s) left out: longer than the engine's max input length {limit}")
    pairs = builtin + list(zip(images, prompts))
    if not pairs:
        raise UserError(f"no case fits the engine's max input length {limit}: pass a shorter --image/--prompt pair")
    sampling = Sampling(max_new_tokens=min(max_new_tokens, engine.limits["max_new_tokens"]))
    size = engine.limits["max_batch_size"]
    for b, start in enumerate(range(0, len(pairs), size)):
        batch = pairs[start : start + size]
        label = f"batch {b} ({len(batch)})"
        inputs = engine.prepare([p[0] for p in batch], [p[1] for p in batch])
        feed = (inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], sampling)
        got = engine.pipeline.generate(*feed)
        force = Forcing(got.stage1_indices, got.stage2_indices, got.token_ids)
        for r in [*recorders.values(), eager_pivot]:
            r.calls.clear()
        t, e = truth.generate(*feed, force), eager.generate(*feed, force)

        pixels = {"pixel_values": inputs["pixel_values"]}
        s1 = [_scores(graphs[k]["vision"], "vision", pixels, dtypes[k]) for k in ("truth", "eager")]
        # Stage-2 scores under the engine's stage-1 selection (both references were forced onto it).
        s2 = [_scores(graphs[k]["pivot"], "pivot", r.calls[0][0], dtypes[k]) for k, r in (("truth", recorders["pivot"]), ("eager", eager_pivot))]
        check_end_to_end(report, label, got, t, e, s1, s2, plain and plain.generate(*feed, force))
        if b == 0:
            check_graphs(report, engine, graphs["truth"], graphs["eager"], recorders, samples)
    return report
