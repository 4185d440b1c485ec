"""`star-validate`: an engine against the eager PyTorch reference, judged by measured error budgets.

Three runs per case: the engine; the eager reference in float64 (the truth); the eager reference in the
engine's dtype (what that dtype costs on this model). Both eager runs are forced onto the engine's kept
indices and tokens (teacher forcing), so every value is compared between the same computations; whether
the engine's own choices were right is checked first, on the truth's scores (`budget.check_selection`)
and logits. The rule for every value is `budget.error_budget`.

    decisive, end to end    stage-1 / stage-2 kept indices; greedy tokens at every step
    values, end to end      logits of every step, per row
    values, per graph       each graph fed the truth's own inputs (prefill and one decode step), every output

One loop for every mode (`MODES`, chosen by the memory plan, memory.VALIDATION_MODES); the modes differ in how
the references are built and which checks run:

    whole           whole-model references in memory; every built-in case and the user's; per-graph checks
    streamed        layer-streamed references (`streaming.py`: one unit of the model in the reference dtype at a
                    time); one case and a few tokens (every reference forward re-reads the weights); end to end only
    streamed-lazy   the same, with the engine run one graph at a time (`Engine(lazy=True)`)

A float16 engine's eager-float16 twin cannot run on a CPU (torch's float16 matmul runs at ~0.3 GFLOP/s): in the
streamed modes its error is estimated from eager float32's, scaled by the ratio of unit roundoffs (2^-11 / 2^-24 =
8192, first-order rounding-error analysis), which loosens the budget and is said so.
"""

from __future__ import annotations

import sys
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..config import RuntimeOptions
from ..errors import UserError
from ..manifest import EngineManifest, decode_graph_names
from ..memory import validation_mode
from ..models import LoadedModel, load_model
from ..runtime.engine import Engine
from ..runtime.generate import Forcing, Generation, Sampling
from ..runtime.inputs import prompt_length, synthetic_image
from . import budget
from .checks import Recorder, check_end_to_end, check_graphs, check_same_model, scores
from .quantized import int8_activation_hooks, matmul_compute, quantized_modules, quantized_note, quantized_reference
from .reference import reference_pipeline
from .report import ValidationReport
from .streaming import Streamer, quantized_transform, scaled_eager, streamed_pipeline

BUILTIN_QUESTIONS = (
    "What is in the image?",
    "How many objects are on the table, and what colour is the largest one?",
    "Describe the picture.",
)
INT8_EAGER_SAMPLES = 8  # eager runs per graph call for an int8-compute engine (checks.sampled_eager)
STREAMED_TOKENS = 4
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}


def eager_dtype_for(dtype: str) -> tuple[str, float]:
    """The eager run that can stand for `dtype` on a CPU in the streamed modes, and the factor its error is scaled
    by."""
    if dtype in ("float16", "bfloat16"):
        return "float32", UNIT_ROUNDOFF[dtype] / UNIT_ROUNDOFF["float32"]
    return dtype, 1.0


@dataclass
class Batch:
    """One batch of cases as the engine ran it; the references are forced onto its selections and tokens."""

    label: str
    inputs: dict[str, np.ndarray]
    sampling: Sampling
    got: Generation

    @property
    def feed(self) -> tuple:
        return self.inputs["pixel_values"], self.inputs["input_ids"], self.inputs["attention_mask"], self.sampling

    @property
    def force(self) -> Forcing:
        return Forcing(self.got.stage1_indices, self.got.stage2_indices, self.got.token_ids)


class WholeReferences:
    """Whole-model references in memory: float64 and the engine's dtype; for a quantized engine, both holding the
    engine's own quantized weights (the float rule then applies unchanged), and the unquantized float64 model on top
    (what quantization costs, reported). Per-graph checks on the truth's recorded feeds of the first batch."""

    per_graph = True
    says_steps = False  # whole-model references are quick: the export's line for the stage is enough

    def __init__(
        self, report: ValidationReport, engine: Engine, loaded: LoadedModel, device: str, stack: ExitStack, say
    ):
        dtype, scheme, schedule = report.dtype, engine.scheme, engine.schedule
        self.plain, self.samples = None, 1
        if scheme.quantized:
            self.plain = reference_pipeline(loaded, schedule, device=device, dtype="float64")
            # the engine's weights and activations are in its manifest's dtype; it may compute in another (`dtype`)
            compute = matmul_compute(scheme, engine.manifest.dtype, engine.providers)
            self.samples = INT8_EAGER_SAMPLES if compute == "int8" else 1
            loaded = quantized_reference(loaded, scheme, engine.manifest.dtype, compute)
            report.notes.append(quantized_note(scheme, compute, engine.provider))
        self.eager = reference_pipeline(loaded, schedule, device=device, dtype=dtype)
        self.truth = reference_pipeline(loaded, schedule, device=device, dtype="float64")
        self.graphs = {
            "truth": dict(self.truth.graphs),
            "eager": dict(self.eager.graphs),
        }  # unwrapped: scores, per-graph runs
        self.recorders = {name: Recorder(g) for name, g in self.truth.graphs.items()}
        self.truth.graphs = self.recorders
        self.eager_pivot = self.eager.graphs["pivot"] = Recorder(self.eager.graphs["pivot"], keep_calls=1)
        self.dtypes = {"truth": np.float64, "eager": engine.pipeline.np_dtype}

    def run(self, batch: Batch):
        for r in [*self.recorders.values(), self.eager_pivot]:
            r.calls.clear()
        t, e = self.truth.generate(*batch.feed, batch.force), self.eager.generate(*batch.feed, batch.force)
        pixels = {"pixel_values": batch.inputs["pixel_values"]}
        s1 = [scores(self.graphs[k]["vision"], "vision", pixels, self.dtypes[k]) for k in ("truth", "eager")]
        # Stage-2 scores under the engine's stage-1 selection (both references were forced onto it).
        pivots = (("truth", self.recorders["pivot"]), ("eager", self.eager_pivot))
        s2 = [scores(self.graphs[k]["pivot"], "pivot", r.calls[0][0], self.dtypes[k]) for k, r in pivots]
        return t, e, s1, s2, self.plain and self.plain.generate(*batch.feed, batch.force)

    def check_graphs(self, report: ValidationReport, engine: Engine) -> None:
        check_graphs(report, engine, self.graphs["truth"], self.graphs["eager"], self.recorders, self.samples)


class StreamedReferences:
    """Layer-streamed references over the memory-mapped checkpoint (one streamer for every dtype); an engine dtype
    whose eager twin cannot run on a CPU is estimated from float32 (`eager_dtype_for`)."""

    per_graph = False
    says_steps = True  # each streamed forward re-reads the weights (minutes at 7B): every step is said

    def __init__(
        self, report: ValidationReport, engine: Engine, loaded: LoadedModel, device: str, stack: ExitStack, say
    ):
        dtype, self.scheme, self.schedule, self.loaded, self.say = (
            report.dtype,
            engine.scheme,
            engine.schedule,
            loaded,
            say,
        )
        self.int8 = nullcontext
        if self.scheme.quantized:
            compute = matmul_compute(self.scheme, engine.manifest.dtype, engine.providers)
            report.notes.append(quantized_note(self.scheme, compute, engine.provider))
            if compute == "int8":
                self.int8 = partial(int8_activation_hooks, quantized_modules(loaded.model), self.scheme.block_size)
        self.eager_dtype, self.ratio = eager_dtype_for(dtype)
        if self.ratio != 1.0:
            report.notes.append(
                f"eager {dtype} cannot run on this CPU: its error is eager {self.eager_dtype}'s x {self.ratio:g} "
                "(the ratio of unit roundoffs), a looser budget than a real eager run"
            )
        self.streamer = stack.enter_context(Streamer(loaded.model))
        self.transform = (
            quantized_transform(loaded.model, self.scheme, engine.manifest.dtype) if self.scheme.quantized else None
        )

    def run(self, batch: Batch):
        runs = {}
        for kind, run_dtype in (("truth", "float64"), ("eager", self.eager_dtype)):
            self.say(f"layer-streamed eager reference, {run_dtype}")
            pipe = streamed_pipeline(self.loaded, self.schedule, self.streamer, run_dtype, self.transform)
            pivot = pipe.graphs["pivot"] = Recorder(pipe.graphs["pivot"], keep_calls=1)
            with self.int8():
                gen = pipe.generate(*batch.feed, batch.force)
                s1 = scores(
                    pipe.graphs["vision"], "vision", {"pixel_values": batch.inputs["pixel_values"]}, np.dtype(run_dtype)
                )
                s2 = scores(pivot.graph, "pivot", pivot.calls[0][0], np.dtype(run_dtype))
            runs[kind] = (gen, s1, s2)
        plain = None
        if self.scheme.quantized:
            self.say("layer-streamed eager reference, float64, unquantized")
            plain = streamed_pipeline(self.loaded, self.schedule, self.streamer, "float64").generate(
                *batch.feed, batch.force
            )
        (t, t1, t2), (e, e1, e2) = runs["truth"], runs["eager"]
        if self.ratio != 1.0:
            e1, e2 = scaled_eager(t1, e1, self.ratio), scaled_eager(t2, e2, self.ratio)
            e.logits = [scaled_eager(a, b, self.ratio) for a, b in zip(t.logits, e.logits)]
        return t, e, (t1, e1), (t2, e2), plain


def all_cases(engine: Engine, images, prompts, report: ValidationReport) -> list:
    """The built-in cases that fit the engine's --max-input-len (the others left out, with a note), then the user's."""
    limit, V = engine.limits.max_input_len, engine.spec.num_vision_tokens
    builtin = [
        (synthetic_image(i), q)
        for i, q in enumerate(BUILTIN_QUESTIONS)
        if prompt_length(engine.processor, q, V) <= limit
    ]
    if len(builtin) < len(BUILTIN_QUESTIONS):
        report.notes.append(
            f"{len(BUILTIN_QUESTIONS) - len(builtin)} built-in case(s) left out: longer than the engine's "
            f"max input length {limit}"
        )
    pairs = builtin + list(zip(images, prompts))
    if not pairs:
        raise UserError(f"no case fits the engine's max input length {limit}: pass a shorter --image/--prompt pair")
    return pairs


def one_case(engine: Engine, images, prompts, report: ValidationReport) -> list:
    """The user's cases, else the first built-in one."""
    return list(zip(images, prompts)) or [(synthetic_image(0), BUILTIN_QUESTIONS[0])]


@dataclass(frozen=True)
class Mode:
    references: type  # WholeReferences or StreamedReferences
    cases: Callable  # (engine, images, prompts, report) -> [(image, prompt)]
    lazy: bool = False  # the engine runs one graph at a time
    max_new_tokens: int | None = None  # tokens per case at most


MODES = {
    "whole": Mode(WholeReferences, all_cases),
    "streamed": Mode(StreamedReferences, one_case, max_new_tokens=STREAMED_TOKENS),
    "streamed-lazy": Mode(StreamedReferences, one_case, lazy=True, max_new_tokens=STREAMED_TOKENS),
}


def choose_mode(engine_dir, engine: Engine | None = None) -> str:
    """How to validate here (memory.VALIDATION_MODES), from star.json alone, before the engine or the model loads;
    refuses (exit 2) what this machine cannot hold."""
    try:
        m = engine.manifest if engine is not None else EngineManifest.read(Path(engine_dir), verify=False)
    except UserError:
        return "whole"  # the engine's own loading names what is wrong with it
    return validation_mode(m.model, m.schedule, m.dtype, m.weights, decode_graphs=bool(m.decode_graphs))


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
    options: RuntimeOptions | None = None,
    mode: str | None = None,
    progress=None,
) -> ValidationReport:
    """Compare the engine in `engine_dir` with the eager reference of its source model (or `model`).
    `loaded` / `engine`: already loaded (by star-export), so neither is loaded twice. `options`: how the engine's
    sessions run (its provider and fallback are `provider` and `allow_fallback`)."""
    if device == "cuda" and not torch.cuda.is_available() and not allow_fallback:
        raise UserError(
            "--device cuda: torch sees no CUDA GPU here: run where one is, use --device cpu, or pass --allow-fallback"
        )
    name = mode or choose_mode(engine_dir, engine)
    mode = MODES[name]
    engine = engine or Engine.from_dir(
        engine_dir, options, provider=provider, allow_fallback=allow_fallback, lazy=mode.lazy
    )
    manifest, dtype = engine.manifest, engine.compute_dtype  # the eager twin's dtype: what the graphs compute in
    report = ValidationReport(engine=str(engine_dir), reference_device=device, dtype=dtype, floor=budget.floor(dtype))
    if dtype != manifest.dtype:
        decode = decode_graph_names(engine.graphs)
        report.notes.append(
            f"{engine.provider} computes this engine's graphs in {dtype} (its inference precision on this CPU; the "
            f"engine's dtype is {manifest.dtype}): judged against an eager {dtype} twin"
            + (
                f"; its decode graphs run on ONNX Runtime in {manifest.dtype}, judged by the same budgets"
                if decode
                else ""
            )
        )
    if device == "cuda" and not torch.cuda.is_available():
        msg = "--device cuda: torch sees no CUDA GPU here; the reference ran on the CPU (--allow-fallback)"
        print(f"warning: {msg}", file=sys.stderr)
        report.notes.append(msg)
        report.reference_device = device = "cpu"
    loaded = loaded or load_model(model or manifest.source["name"])
    check_same_model(loaded, engine)
    if engine.variants:
        report.notes.append(
            "the engine's ONNX Runtime prefill graphs ("
            + ", ".join(f"{variant} for {segment}" for segment, variant in engine.variants.items())
            + ") ran in place of the segment graphs, and were checked as them"
        )
    elif manifest.prefill_graphs:
        report.notes.append(
            f"the engine's ONNX Runtime prefill graphs were not checked (star-run uses them on the CPU provider only; "
            f"this engine ran on {engine.provider}{', one graph at a time' if mode.lazy else ''})"
        )
    if manifest.decode_graphs and not decode_graph_names(engine.graphs):
        why = (
            "the engine ran one graph at a time (memory), which decodes with the segment graphs"
            if mode.lazy
            else f"they run on ONNX Runtime's CPU provider only, and this engine ran on {engine.provider}"
        )
        report.notes.append(
            f"the engine's ONNX Runtime decode graphs were not checked (star-run uses them on the CPU provider): {why}"
        )
    say = progress or (lambda s: None)
    pairs = mode.cases(engine, images, prompts, report)
    tokens = min(max_new_tokens, mode.max_new_tokens or max_new_tokens, engine.limits.max_new_tokens)
    sampling = Sampling(max_new_tokens=tokens)
    size = engine.limits.max_batch_size
    with ExitStack() as stack:
        references = mode.references(report, engine, loaded, device, stack, say)
        for b, start in enumerate(range(0, len(pairs), size)):
            cases = pairs[start : start + size]
            inputs = engine.prepare([p[0] for p in cases], [p[1] for p in cases])
            if references.says_steps:
                say("engine run")
            batch = Batch(f"batch {b} ({len(cases)})", inputs, sampling, None)
            batch.got = engine.pipeline.generate(*batch.feed)
            t, e, s1, s2, plain = references.run(batch)
            check_end_to_end(report, batch.label, batch.got, t, e, s1, s2, plain)
            if b == 0 and references.per_graph:
                references.check_graphs(report, engine)
    if not references.per_graph:
        report.notes.append(
            f"large model: layer-streamed references, {len(pairs)} case(s) x {tokens} tokens, end-to-end "
            "checks only (per-graph checks need the whole engine and reference in memory)"
        )
    return report
