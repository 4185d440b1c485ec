"""`star-export`: build an engine directory, atomically.

The directory is built in a temporary sibling and renamed into place at the end; any failure (or
Ctrl-C) removes the temporary directory, so no half-written engine is ever left behind.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..config import StarSchedule
from ..manifest import graph_io, write_manifest
from ..models import load_model
from ..reference import decoder_layout
from .backends import backend_from_name
from .onnx_export import OPSET


class OutDirError(ValueError):
    pass


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


def check_out_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise OutDirError(f"--out {str(out)!r} exists and is not a directory: choose another path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise OutDirError(f"--out {str(out)!r} exists and is not empty: pass --force to replace it, or choose another path")
    parent = out.resolve().parent
    if not parent.is_dir():
        raise OutDirError(f"the parent of --out, {str(parent)!r}, does not exist: create it first")
    if not os.access(parent, os.W_OK | os.X_OK) or (out.is_dir() and not os.access(out, os.W_OK)):
        raise OutDirError(f"--out {str(out)!r} is not writable: choose a directory you can write to")


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)


def write_engine(loaded, schedule: StarSchedule, directory: Path, *, dtype: str, backend: str, limits: dict, progress: Progress | None = None) -> dict:
    """Write the engine's graphs, processor, embeddings and manifest into `directory` (no checks). Returns the manifest."""
    progress = progress or Progress(2, enabled=False)
    with progress.stage(f"trace + export {backend} ({dtype})"):
        graphs = backend_from_name(backend).build(loaded, schedule, directory, dtype=dtype, progress=progress.note)
        for g in graphs.values():
            progress.note(f"{g.name}: {g.seconds:.1f} s, {g.bytes / 2**20:.1f} MiB")
    with progress.stage("write tokenizer, processor, embeddings, manifest"):
        loaded.processor.save_pretrained(directory / "processor")
        embed = loaded.model.get_input_embeddings().weight.detach().float().numpy().astype(dtype)
        np.save(directory / "embed_tokens.npy", embed)
        body = {
            "source": loaded.source,
            "backend": backend,
            "dtype": dtype,
            "opset": OPSET,
            "model": {k: v for k, v in asdict(loaded.spec).items() if k not in ("num_patches", "num_vision_tokens")},
            "schedule": schedule.asdict(),
            "limits": dict(limits),
            "layout": asdict(decoder_layout(loaded, dtype)),
            "embed_tokens": "embed_tokens.npy",
            "graphs": {name: {"file": g.path.name, **graph_io(g.path)} for name, g in graphs.items()},
        }
        return write_manifest(directory, body)


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
    show_progress: bool = True,
) -> dict:
    """Load `model`, export its STAR engine to `out`, self-check it against the eager reference. Returns the manifest."""
    out = Path(out)
    be = backend_from_name(backend)
    be.check_dtype(dtype)
    for name, value in (("max_batch_size", max_batch_size), ("max_input_len", max_input_len), ("max_new_tokens", max_new_tokens)):
        if value < 1:
            raise ValueError(f"{name}={value}: allowed >= 1")
    check_out_dir(out, force)
    progress = Progress(5 if validate else 4, enabled=show_progress)

    with progress.stage(f"load {model}"):
        loaded = load_model(model)
        schedule = StarSchedule.from_spec(loaded.spec, keep=keep, stage1_keep=stage1_keep, pivot_layer=pivot_layer, defaults=loaded.defaults)
        progress.note(f"schedule: keep={schedule.keep} stage1_keep={schedule.stage1_keep} pivot_layer={schedule.pivot_layer} of {schedule.num_layers} layers")

    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.resolve().parent))
    except OSError as e:  # e.g. a read-only or virtual file system, where os.access says yes to root
        raise OutDirError(f"--out {str(out)!r} is not writable ({e.strerror}): choose a directory you can write to") from e
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; the engine gets the usual directory mode
    try:
        limits = {"max_batch_size": max_batch_size, "max_input_len": max_input_len, "max_new_tokens": max_new_tokens}
        manifest = write_engine(loaded, schedule, tmp, dtype=dtype, backend=backend, limits=limits, progress=progress)
        with progress.stage("check engine directory"):
            from ..runtime.engine import Engine

            # The hashes were computed from these very files a moment ago: load, don't re-hash.
            engine = Engine.from_dir(tmp, provider="cpu", verify=False)
        if validate:
            from ..validate import validate_engine

            with progress.stage("validate against the eager reference"):
                report = validate_engine(tmp, loaded=loaded, engine=engine, max_new_tokens=8)
                progress.note(report.table())
                if not report.ok:
                    raise ValidationFailed(report)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    manifest["timings_s"] = progress.timings
    return manifest


class ValidationFailed(RuntimeError):
    def __init__(self, report):
        super().__init__("the exported engine does not match the eager reference:\n" + report.table())
        self.report = report
