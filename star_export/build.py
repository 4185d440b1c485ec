"""`star-export`: build an engine directory, atomically, and self-check it.

Every argument is checked before the model loads; the directory is built in a temporary sibling (export/workdir.py),
written (export/write.py), loaded and validated against the eager reference, and swapped into place at the end; any
failure (or Ctrl-C) removes the build, so no half-written engine is ever left behind.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .config import StarSchedule, WeightScheme
from .export.backends import backend_from_name
from .export.workdir import (
    OutDirError,
    check_disk,
    check_out_dir,
    disk_full,
    make_build_dir,
    out_lock,
    remove_stale_builds,
    replace_dir,
    resolve_out,
    size_text,
)
from .export.write import LimitError, Progress, check_limits, wants_decode_graphs, write_engine
from .memory import available_bytes, check_fits
from .models import load_model, require_weights, spec_from_name
from .runtime.engine import Engine
from .runtime.inputs import prompt_length
from .validate import validate_engine


def check_prompt_room(loaded, max_input_len: int) -> None:
    """The shortest built-in question, with the image and the chat template, must fit: else the engine can never run."""
    need = prompt_length(loaded.processor, "Describe.", loaded.spec.num_vision_tokens)
    if max_input_len < need:
        raise LimitError(
            f"--max-input-len {max_input_len} is too small for any prompt: the image ({loaded.spec.num_vision_tokens} "
            f"tokens) and the chat template with a one-word question take {need}; allowed >= {need}"
        )


def export_engine(
    *,
    model: str,
    keep: int,
    out: str | Path,
    stage1_keep: int | None = None,
    pivot_layer: int | None = None,
    method: str = "star",
    dtype: str = "float32",
    backend: str = "onnx",
    max_batch_size: int = 8,
    max_input_len: int = 2048,
    max_new_tokens: int = 256,
    force: bool = False,
    validate: bool = True,
    weights: WeightScheme = WeightScheme(),
    memory_budget: int | None = None,
    decode_graphs: str = "auto",
    show_progress: bool = True,
    verbose: bool = False,
) -> dict:
    """Load `model`, export its STAR engine to `out`, self-check it against the eager reference. Returns the manifest.
    `verbose`: print the self-check's whole report, not just its verdict (a failure always carries the report).
    Every argument is checked before the model loads (schedule, limits, backend, output directory)."""
    out = resolve_out(out)
    be = backend_from_name(backend)
    be.check_dtype(dtype)
    be.check_available()
    check_out_dir(out, force)
    spec, defaults = spec_from_name(model)  # config only, no weights
    schedule = StarSchedule.from_spec(
        spec, keep=keep, stage1_keep=stage1_keep, pivot_layer=pivot_layer, defaults=defaults, method=method
    )
    check_limits(spec, max_batch_size, max_input_len, max_new_tokens)
    if weights.quantized and backend != "onnx":
        raise LimitError(f"--weights {weights.kind}: only --backend onnx writes quantized (MatMulNBits) engines")
    decode = wants_decode_graphs(decode_graphs, dtype, weights, backend)
    require_weights(model)
    have = memory_budget if memory_budget is not None else available_bytes()
    plan = check_fits(
        spec, schedule, dtype, weights, validate, have, decode_graphs=decode
    )  # refuse now, not by an OOM kill after loading
    mode = plan.validation_mode(have) if validate else None
    lazy = mode == "streamed-lazy" or plan.run_bytes > have  # graphs checked (and run) one at a time
    progress = Progress(5 + validate + decode, enabled=show_progress)
    with out_lock(out):  # a second export into the same --out is exit 2 from here on
        check_out_dir(out, force)  # again, under the lock
        check_disk(out, plan.engine_bytes)
        for path, pid in remove_stale_builds(out):
            progress.note(f"removed {path}: a build left by process {pid}, which no longer runs")
        limits = {"max_batch_size": max_batch_size, "max_input_len": max_input_len, "max_new_tokens": max_new_tokens}
        manifest = _build(
            model,
            out,
            keep=keep,
            stage1_keep=stage1_keep,
            pivot_layer=pivot_layer,
            method=method,
            dtype=dtype,
            backend=backend,
            limits=limits,
            force=force,
            validate=validate,
            weights=weights,
            decode=decode,
            mode=mode,
            lazy=lazy,
            verbose=verbose,
            progress=progress,
            need=plan.engine_bytes,
        )
    manifest["timings_s"] = progress.timings
    return manifest


def _build(
    model: str,
    out: Path,
    *,
    keep: int,
    stage1_keep: int | None,
    pivot_layer: int | None,
    method: str,
    dtype: str,
    backend: str,
    limits: dict,
    force: bool,
    validate: bool,
    weights: WeightScheme,
    decode: bool,
    mode: str | None,
    lazy: bool,
    verbose: bool,
    progress: Progress,
    need: int,
) -> dict:
    """Load, write into a build directory beside `out`, check, validate, swap into place (export_engine's checks done).
    A full file system at any step (`need`: the engine's planned bytes) is an OutDirError."""
    with progress.stage(f"load {model}"):
        loaded = load_model(model)
        schedule = StarSchedule.from_spec(
            loaded.spec,
            keep=keep,
            stage1_keep=stage1_keep,
            pivot_layer=pivot_layer,
            defaults=loaded.defaults,
            method=method,
        )
        check_prompt_room(loaded, limits["max_input_len"])
        progress.note(
            f"schedule: keep={schedule.keep} stage1_keep={schedule.stage1_keep} pivot_layer={schedule.pivot_layer} of "
            f"{schedule.num_layers} layers, method {method} (scorers: stage 1 {schedule.stage1_scorer}, stage 2 "
            f"{schedule.stage2_scorer})"
        )

    tmp = make_build_dir(out)
    try:
        manifest = write_engine(
            loaded,
            schedule,
            tmp,
            dtype=dtype,
            backend=backend,
            limits=limits,
            progress=progress,
            weights=weights,
            decode_graphs=decode,
        )
        with progress.stage("check engine directory"):
            # The hashes were computed from these very files a moment ago: load, don't re-hash.
            engine = Engine.from_dir(tmp, provider="cpu", verify=False, lazy=lazy)
        if validate:
            with progress.stage("validate against the eager reference"):
                if mode != "whole":
                    progress.note(f"the references do not fit as whole-model copies here: validating in mode '{mode}'")
                report = validate_engine(
                    tmp, loaded=loaded, engine=engine, max_new_tokens=8, mode=mode, progress=progress.note
                )
                progress.note(report.table() if verbose else report.summary())
                if not report.ok:
                    raise ValidationFailed(report)
        check_out_dir(out, force)  # nothing else may have appeared there meanwhile
        replace_dir(tmp, out)
    except BaseException as e:
        full = disk_full(e, tmp)  # judged before the build directory's space is given back
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise OutDirError(
                f"no space left on the device of {str(out.parent)!r} while writing the engine (its weights alone take "
                f"about {size_text(need)}): free some space, or choose another --out"
            ) from e
        raise
    return manifest


class ValidationFailed(RuntimeError):
    def __init__(self, report):
        super().__init__("the exported engine does not match the eager reference:\n" + report.table())
        self.report = report
