"""Writing an engine directory's contents: graphs, processor, embeddings, decode graphs, star.json; and the checks of
the options that shape them. The whole export (load, write into a build directory, self-check, swap into place) is
star_export/build.py."""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..config import StarSchedule, WeightScheme
from ..errors import UserError
from ..graphs.stages import decoder_layout
from ..manifest import MANIFEST, EngineManifest, file_table, graph_io, write_manifest
from .backends import backend_from_name
from .decode_graphs import DecodeGraphError, write_decode_graphs
from .onnx_export import OPSET


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


def write_engine(
    loaded,
    schedule: StarSchedule,
    directory: Path,
    *,
    dtype: str,
    backend: str,
    limits: dict,
    progress: Progress | None = None,
    weights: WeightScheme = WeightScheme(),
    decode_graphs: bool = False,
) -> dict:
    """Write the engine's graphs, processor, embeddings and manifest into `directory` (no checks). Returns the manifest.
    `decode_graphs`: also ONNX Runtime's decode graphs (export/decode_graphs.py); where a segment's attention blocks
    are not found, the engine is written without them, with a warning."""
    progress = progress or Progress(3 + decode_graphs, enabled=False)
    scheme = "" if not weights.quantized else f", {weights.kind} weights (block {weights.block_size})"
    with progress.stage(f"trace + export {backend} ({dtype}{scheme})"):
        graphs = backend_from_name(backend).build(
            loaded, schedule, directory, dtype=dtype, progress=progress.note, weights=weights
        )
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
            # MatMulNBits is ONNX Runtime's: quantized decoder segments do not parse in TensorRT (every other rule
            # holds)
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
        with progress.stage("write ONNX Runtime decode and prefill graphs (GroupQueryAttention, fusions)"):
            body["graphs"] |= decode_graph_entries(directory, body, progress)
    with progress.stage("write star.json (sha256 of every file)"):
        return write_manifest(directory, body)


def decode_graph_entries(directory: Path, body: dict, progress: Progress) -> dict:
    """The manifest's entries of the decode graphs written into `directory`; none (and a warning) where this release
    cannot find the segments' attention blocks."""
    try:
        written = write_decode_graphs(directory, body)
    except DecodeGraphError as e:
        print(
            f"warning: no ONNX Runtime decode graphs ({e}); the engine decodes with its segment graphs", file=sys.stderr
        )
        return {}
    for name, entry in written.items():
        progress.note(f"{name}: GroupQueryAttention in layers {entry['gqa_layers']}, fusions {entry['fusions']}")
    return {name: entry | graph_io(directory / entry["file"]) for name, entry in written.items()}


def wants_decode_graphs(option: str, dtype: str, weights: WeightScheme, backend: str) -> bool:
    """`--decode-graphs auto`: for quantized engines (whose decode step the weight reads bound, docs/performance.md),
    which
    already need ONNX Runtime (MatMulNBits); `on`: for any float32 onnx engine; `off`: never."""
    if option not in DECODE_GRAPH_OPTIONS:
        raise LimitError(f"--decode-graphs {option!r}: allowed {', '.join(DECODE_GRAPH_OPTIONS)}")
    if option == "on" and (dtype != "float32" or backend != "onnx"):
        raise LimitError(
            f"--decode-graphs on: needs --dtype float32 --backend onnx (got --dtype {dtype} --backend {backend}); "
            "ONNX Runtime's CPU GroupQueryAttention is verified in float32 only"
        )
    return option == "on" or (option == "auto" and weights.quantized and dtype == "float32" and backend == "onnx")


DECODE_GRAPH_OPTIONS = ("auto", "on", "off")


def check_limits(spec, max_batch_size: int, max_input_len: int, max_new_tokens: int) -> None:
    for name, value in (
        ("max_batch_size", max_batch_size),
        ("max_input_len", max_input_len),
        ("max_new_tokens", max_new_tokens),
    ):
        if not isinstance(value, int) or value < 1:
            raise LimitError(f"--{name.replace('_', '-')} {value!r}: allowed a whole number >= 1")
    if max_input_len <= spec.num_vision_tokens:
        raise LimitError(
            f"--max-input-len {max_input_len} leaves no room for a prompt: the image alone takes "
            f"{spec.num_vision_tokens} tokens; allowed > {spec.num_vision_tokens} (default 2048)"
        )


def add_decode_graphs(directory: str | Path, progress: Progress | None = None) -> list[str]:
    """Write ONNX Runtime decode graphs into an engine exported without them (`star-export --add-decode-graphs`), as
    `--decode-graphs on` would have, and re-sign its star.json (file table included). The engine's files are verified
    first (every sha256), so a damaged engine is not re-signed. The decode graphs share the segments' weight files:
    minutes and two small files, where re-exporting a 7B takes an hour. Returns the names written ([] where this
    release cannot find the segments' attention blocks: a warning says so)."""
    manifest = EngineManifest.read(directory, verify=True)
    if manifest.dtype != "float32" or manifest.backend != "onnx":
        raise LimitError(
            f"--add-decode-graphs: needs a float32 onnx engine (this one is {manifest.dtype} {manifest.backend}); "
            "ONNX Runtime's CPU GroupQueryAttention is verified in float32 only"
        )
    if manifest.decode_graphs:
        return []
    body = json.loads(json.dumps(dict(manifest.raw)))  # a plain, mutable copy of the JSON as written
    entries = decode_graph_entries(manifest.directory, body, progress or Progress(1, enabled=False))
    if entries:
        body["graphs"] |= entries
        body["files"] = file_table(manifest.directory)
        tmp = manifest.directory / f"{MANIFEST}.tmp"
        tmp.write_text(json.dumps(body, indent=2) + "\n")
        tmp.replace(manifest.directory / MANIFEST)
    return list(entries)
