"""The validator for models whose references do not fit in memory as whole-model copies (a 7B model on 24 GB).

Same rule, same decisive checks as `validate.validate_engine` (kept indices of both stages against the float64
scores, greedy tokens at every step, the logits of every step by the error budget), with three differences, each
stated in the report:
- the references are layer-streamed (`streaming.py`): one unit of the model in the reference dtype at a time;
- one built-in case and a few tokens (every reference forward re-reads the model's weights);
- no per-graph checks (they would load every engine graph again), and an engine that does not fit in memory as a
  whole runs one graph at a time (`Engine(lazy=True)`).
A float16 engine's eager-float16 twin cannot run on a CPU (torch's float16 matmul runs at ~0.3 GFLOP/s here): its
error is estimated from eager float32's, scaled by the ratio of unit roundoffs (2^-11 / 2^-24 = 8192, first-order
rounding-error analysis), which loosens the budget and is said so.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import Any, Sequence

import numpy as np

from .config import StarSchedule
from .export.quantize import WeightScheme, int8_activation_hooks, matmul_compute, quantized_modules, quantized_note
from .runtime.generate import Forcing, Sampling
from .runtime.inputs import synthetic_image
from .streaming import Streamer, quantized_transform, scaled_eager, streamed_pipeline
from .validate import BUILTIN_QUESTIONS, ValidationReport, _Recorder, _scores, check_end_to_end

STREAMED_TOKENS = 4
UNIT_ROUNDOFF = {"float64": 2.0**-53, "float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}


def eager_dtype_for(dtype: str) -> tuple[str, float]:
    """The eager run that can stand for `dtype` on a CPU, and the factor its error is scaled by."""
    if dtype in ("float16", "bfloat16"):
        return "float32", UNIT_ROUNDOFF[dtype] / UNIT_ROUNDOFF["float32"]
    return dtype, 1.0


def validate_streamed(report: ValidationReport, engine, loaded, *, images: Sequence[Any] = (), prompts: Sequence[str] = (),
                      max_new_tokens: int = STREAMED_TOKENS, progress=None) -> ValidationReport:
    manifest, dtype = engine.manifest, report.dtype
    schedule = StarSchedule(**manifest["schedule"])
    scheme = WeightScheme.from_dict(manifest.get("weights"))
    say = progress or (lambda s: None)
    pairs = list(zip(images, prompts)) or [(synthetic_image(0), BUILTIN_QUESTIONS[0])]
    sampling = Sampling(max_new_tokens=min(max_new_tokens, engine.limits["max_new_tokens"]))
    inputs = engine.prepare([p[0] for p in pairs], [p[1] for p in pairs])
    feed = (inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], sampling)
    say("engine run")
    got = engine.pipeline.generate(*feed)
    force = Forcing(got.stage1_indices, got.stage2_indices, got.token_ids)

    int8 = nullcontext
    if scheme.quantized:
        compute = matmul_compute(scheme, dtype, engine.providers)
        report.notes.append(quantized_note(scheme, compute, engine.provider))
        if compute == "int8":
            int8 = partial(int8_activation_hooks, quantized_modules(loaded.model), scheme.block_size)
    eager_dtype, ratio = eager_dtype_for(dtype)
    label = f"batch 0 ({len(pairs)})"
    with Streamer(loaded.model) as streamer:
        transform = quantized_transform(loaded.model, scheme, dtype) if scheme.quantized else None
        runs = {}
        for kind, run_dtype in (("truth", "float64"), ("eager", eager_dtype)):
            say(f"layer-streamed eager reference, {run_dtype}")
            pipe = streamed_pipeline(loaded, schedule, streamer, run_dtype, transform)
            pivot = pipe.graphs["pivot"] = _Recorder(pipe.graphs["pivot"], keep_calls=1)
            with int8():
                gen = pipe.generate(*feed, force)
                s1 = _scores(pipe.graphs["vision"], "vision", {"pixel_values": inputs["pixel_values"]}, np.dtype(run_dtype))
                s2 = _scores(pivot.graph, "pivot", pivot.calls[0][0], np.dtype(run_dtype))
            runs[kind] = (gen, s1, s2)
        plain = None
        if scheme.quantized:
            say("layer-streamed eager reference, float64, unquantized")
            plain = streamed_pipeline(loaded, schedule, streamer, "float64").generate(*feed, force)
    (t, t1, t2), (e, e1, e2) = runs["truth"], runs["eager"]
    if ratio != 1.0:
        e1, e2 = scaled_eager(t1, e1, ratio), scaled_eager(t2, e2, ratio)
        e.logits = [scaled_eager(a, b, ratio) for a, b in zip(t.logits, e.logits)]
        report.notes.append(f"eager {dtype} cannot run on this CPU: its error is eager {eager_dtype}'s x {ratio:g} "
                            "(the ratio of unit roundoffs), a looser budget than a real eager run")
    check_end_to_end(report, label, got, t, e, (t1, e1), (t2, e2), plain)
    report.notes.append(
        f"large model: layer-streamed references, {len(pairs)} case(s) x {sampling.max_new_tokens} tokens, end-to-end "
        "checks only (per-graph checks need the whole engine and reference in memory)"
    )
    return report
