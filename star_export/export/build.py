"""`star-export`: build an engine directory, atomically.

The directory is built in a temporary sibling and renamed into place at the end; any failure (or
Ctrl-C) removes the temporary directory, so no half-written engine is ever left behind.
"""

from __future__ import annotations

import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..config import StarSchedule
from ..errors import UserError
from ..manifest import graph_io, write_manifest
from ..memory import available_bytes, check_fits
from ..models import load_model, require_weights, spec_from_name
from ..reference import decoder_layout
from .backends import backend_from_name
from .onnx_export import OPSET
from .quantize import WeightScheme
from .workdir import OutDirError, check_disk, check_out_dir, disk_full, make_build_dir, out_lock, remove_stale_builds, replace_dir, resolve_out, size_text


class LimitError(UserError, ValueError):
    """An engine limit (--max-*) that is out of range or leaves no room for a request."""


class Progress:
    """One line per stage with its duration, on stderr (stdout stays for --json)."""

    def __init__(self, total: int, stream=None, enabled: bool = True):
        self.total, self.step, self.stream, self.enabled = total, 0, stream or sys.stderr, enabled
        self.timings: dict[str, float] = {}

    def note(self, text: str) -> None:
        if self.enabled:
            print(f"      {text}", file=self.stream, flush=True)

    @contextmanager
    def stage(self, name: str):
        self.step += 1
        if self.enabled:
            print(f"[{self.step}/{self.total}] {name} ...", file=self.stream, flush=True)
        t = time.perf_counter()
        yield
        self.timings[name] = time.perf_counter() - t
        if self.enabled:
            print(f"[{self.step}/{self.total}] {name} done in {self.timings[name]:.1f} s", file=self.stream, flush=True)


def write_engine(loaded, schedule: StarSchedule, directory: Path, *, dtype: str, backend: str, limits: dict, progress: Progress | None = None,
                 weights: WeightScheme = WeightScheme(), decode_graphs: bool = False) -> dict:
    """Write the engine's graphs, processor, embeddings and manifest into `directory` (no checks). Returns the manifest.
    `decode_graphs`: also ONNX Runtime's decode graphs (export/decode_graphs.py); where a segment's attention blocks
    are not found, the engine is written without them, with a warning."""
    progress = progress or Progress(3 + decode_graphs, enabled=False)
    scheme = "" if not weights.quantized else f", {weights.kind} weights (block {weights.block_size})"
    with progress.stage(f"trace + export {backend} ({dtype}{scheme})"):
        graphs = backend_from_name(backend).build(loaded, schedule, directory, dtype=dtype, progress=progress.note, weights=weights)
        for g in graphs.values():
            progress.note(f"{g.name}: {g.seconds:.1f} s, {g.bytes / 2**20:.1f} MiB")
    with progress.stage("write tokenizer, processor, embeddings"):
        loaded.processor.save_pretrained(directory / "processor")
        embed = loaded.model.get_input_embeddings().weight.detach().float().numpy().astype(dtype)
        np.save(directory / "embed_tokens.npy", embed)
        body = {
            "source": loaded.source,
            "backend": backend,
            "dtype": dtype,
            "weights": weights.asdict(),
            # MatMulNBits is ONNX Runtime's: quantized decoder segments do not parse in TensorRT (every other rule holds)
            "tensorrt_parsable": not weights.quantized,
            "opset": OPSET,
            "model": {k: v for k, v in asdict(loaded.spec).items() if k not in ("num_patches", "num_vision_tokens")},
            "schedule": schedule.asdict(),
            "limits": dict(limits),
            "layout": asdict(decoder_layout(loaded, dtype)),
            "embed_tokens": "embed_tokens.npy",
            "graphs": {name: {"file": g.path.name, **graph_io(g.path)} for name, g in graphs.items()},
        }
    if decode_graphs:
        with progress.stage("write ONNX Runtime decode graphs (GroupQueryAttention, fusions)"):
            body["graphs"] |= decode_graph_entries(directory, body, progress)
    with progress.stage("write star.json (sha256 of every file)"):
        return write_manifest(directory, body)


def decode_graph_entries(directory: Path, body: dict, progress: Progress) -> dict:
    """The manifest's entries of the decode graphs written into `directory`; none (and a warning) where this release
    cannot find the segments' attention blocks."""
    from .decode_graphs import DecodeGraphError, write_decode_graphs

    try:
        written = write_decode_graphs(directory, body)
    except DecodeGraphError as e:
        print(f"warning: no ONNX Runtime decode graphs ({e}); the engine decodes with its segment graphs", file=sys.stderr)
        return {}
    for name, entry in written.items():
        progress.note(f"{name}: GroupQueryAttention in layers {entry['gqa_layers']}, fusions {entry['fusions']}")
    return {name: entry | graph_io(directory / entry["file"]) for name, entry in written.items()}


def wants_decode_graphs(option: str, dtype: str, weights: WeightScheme, backend: str) -> bool:
    """`--decode-graphs auto`: for quantized engines (whose decode step the weight reads bound, issue 13), which
    already need ONNX Runtime (MatMulNBits); `on`: for any float32 onnx engine; `off`: never."""
    if option not in DECODE_GRAPH_OPTIONS:
        raise LimitError(f"--decode-graphs {option!r}: allowed {', '.join(DECODE_GRAPH_OPTIONS)}")
    if option == "on" and (dtype != "float32" or backend != "onnx"):
        raise LimitError(f"--decode-graphs on: needs --dtype float32 --backend onnx (got --dtype {dtype} --backend {backend}); "
                         "ONNX Runtime's CPU GroupQueryAttention is verified in float32 only")
    return option == "on" or (option == "auto" and weights.quantized and dtype == "float32" and backend == "onnx")


DECODE_GRAPH_OPTIONS = ("auto", "on", "off")


def check_limits(spec, max_batch_size: int, max_input_len: int, max_new_tokens: int) -> None:
    for name, value in (("max_batch_size", max_batch_size), ("max_input_len", max_input_len), ("max_new_tokens", max_new_tokens)):
        if not isinstance(value, int) or value < 1:
            raise LimitError(f"--{name.replace('_', '-')} {value!r}: allowed a whole number >= 1")
    if max_input_len <= spec.num_vision_tokens:
        raise LimitError(
            f"--max-input-len {max_input_len} leaves no room for a prompt: the image alone takes {spec.num_vision_tokens} "
            f"tokens; allowed > {spec.num_vision_tokens} (default 2048)"
        )


def check_prompt_room(loaded, max_input_len: int) -> None:
    """The shortest built-in question, with the image and the chat template, must fit: else the engine can never run."""
    from ..runtime.inputs import prompt_length

    need = prompt_length(loaded.processor, "Describe.", loaded.spec.num_vision_tokens)
    if max_input_len < need:
        raise LimitError(
            f"--max-input-len {max_input_len} is too small for any prompt: the image ({loaded.spec.num_vision_tokens} tokens) "
            f"and the chat template with a one-word question take {need}; allowed >= {need}"
        )


def export_engine(
    *,
    model: str,
    keep: int,
    out: str | Path,
    stage1_keep: int | None = None,
    pivot_layer: int | None = None,
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
    schedule = StarSchedule.from_spec(spec, keep=keep, stage1_keep=stage1_keep, pivot_layer=pivot_layer, defaults=defaults)
    check_limits(spec, max_batch_size, max_input_len, max_new_tokens)
    if weights.quantized and backend != "onnx":
        raise LimitError(f"--weights {weights.kind}: only --backend onnx writes quantized (MatMulNBits) engines")
    decode = wants_decode_graphs(decode_graphs, dtype, weights, backend)
    require_weights(model)
    have = memory_budget if memory_budget is not None else available_bytes()
    plan = check_fits(spec, schedule, dtype, weights, validate, have, decode_graphs=decode)  # refuse now, not by an OOM kill after loading
    mode = plan.validation_mode(have) if validate else None
    lazy = mode == "streamed-lazy" or plan.run_bytes > have  # graphs checked (and run) one at a time
    progress = Progress(5 + validate + decode, enabled=show_progress)
    with out_lock(out):  # a second export into the same --out is exit 2 from here on
        check_out_dir(out, force)  # again, under the lock
        check_disk(out, plan.engine_bytes)
        for path, pid in remove_stale_builds(out):
            progress.note(f"removed {path}: a build left by process {pid}, which no longer runs")
        limits = {"max_batch_size": max_batch_size, "max_input_len": max_input_len, "max_new_tokens": max_new_tokens}
        manifest = _build(model, out, keep=keep, stage1_keep=stage1_keep, pivot_layer=pivot_layer, dtype=dtype, backend=backend, limits=limits,
                          force=force, validate=validate, weights=weights, decode=decode, mode=mode, lazy=lazy, verbose=verbose, progress=progress,
                          need=plan.engine_bytes)
    manifest["timings_s"] = progress.timings
    return manifest


def _build(model: str, out: Path, *, keep: int, stage1_keep: int | None, pivot_layer: int | None, dtype: str, backend: str, limits: dict,
           force: bool, validate: bool, weights: WeightScheme, decode: bool, mode: str | None, lazy: bool, verbose: bool, progress: Progress,
           need: int) -> dict:
    """Load, write into a build directory beside `out`, check, validate, swap into place (export_engine's checks done).
    A full file system at any step (`need`: the engine's planned bytes) is an OutDirError."""
    with progress.stage(f"load {model}"):
        loaded = load_model(model)
        schedule = StarSchedule.from_spec(loaded.spec, keep=keep, stage1_keep=stage1_keep, pivot_layer=pivot_layer, defaults=loaded.defaults)
        check_prompt_room(loaded, limits["max_input_len"])
        progress.note(f"schedule: keep={schedule.keep} stage1_keep={schedule.stage1_keep} pivot_layer={schedule.pivot_layer} of {schedule.num_layers} layers")

    tmp = make_build_dir(out)
    try:
        manifest = write_engine(loaded, schedule, tmp, dtype=dtype, backend=backend, limits=limits, progress=progress, weights=weights,
                                decode_graphs=decode)
        with progress.stage("check engine directory"):
            from ..runtime.engine import Engine

            # The hashes were computed from these very files a moment ago: load, don't re-hash.
            engine = Engine.from_dir(tmp, provider="cpu", verify=False, lazy=lazy)
        if validate:
            from ..validate import validate_engine

            with progress.stage("validate against the eager reference"):
                if mode != "whole":
                    progress.note(f"the references do not fit as whole-model copies here: validating in mode '{mode}'")
                report = validate_engine(tmp, loaded=loaded, engine=engine, max_new_tokens=8, mode=mode, progress=progress.note)
                progress.note(report.table() if verbose else report.summary())
                if not report.ok:
                    raise ValidationFailed(report)
        check_out_dir(out, force)  # nothing else may have appeared there meanwhile
        replace_dir(tmp, out)
    except BaseException as e:
        full = disk_full(e, tmp)  # judged before the build directory's space is given back
        shutil.rmtree(tmp, ignore_errors=True)
        if full:
            raise OutDirError(f"no space left on the device of {str(out.parent)!r} while writing the engine (its weights alone take about "
                              f"{size_text(need)}): free some space, or choose another --out") from e
        raise
    return manifest


class ValidationFailed(RuntimeError):
    def __init__(self, report):
        super().__init__("the exported engine does not match the eager reference:\n" + report.table())
        self.report = report
