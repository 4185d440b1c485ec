"""OpenVINO's CPU plugin running an engine's exported ONNX graphs: the same files ONNX Runtime runs, read by OpenVINO's
ONNX front end and compiled for this CPU (`--provider openvino`; `auto` picks it where it measured faster).

OpenVINO computes in its `INFERENCE_PRECISION_HINT`: bfloat16 by default on a CPU with bfloat16 units (AVX-512 BF16 or
AMX), float32 elsewhere. Its graph interface keeps the file's dtypes (float32 in and out); the products inside are
bfloat16 with float32 accumulation, so an engine run so is judged as a bfloat16 engine (`compute_dtype`, the
validator's eager twin in bfloat16). Measured on 2 cores of an AMD EPYC with AVX-512 VNNI and BF16, no AMX, real-width
4-layer engines, fresh process per run (docs/performance.md, "Against the CPU peers"): time to first token 0.61x ONNX
Runtime's for int4 and 0.38x for float32; float32 decode 0.93x (bfloat16 weights are half the bytes per step), int4
decode with the engine's ONNX Runtime decode graphs as before. Peak RSS: the int4 engine 1.16x ONNX Runtime's, a
float32 engine 1.71x (OpenVINO keeps the file's float32 weights beside its bfloat16 copies), so `auto` takes OpenVINO
for quantized engines only (sessions.auto_provider). OpenVINO in float32 was no faster than ONNX Runtime.
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ..config import WeightScheme
from ..errors import UserError

CACHE_ENV = "STAR_OPENVINO_CACHE"
# OpenVINO's cache reading and writing switch the process's C locale and back; two at once in different threads left
# it at "C" (seen: 1 cold load in 3 with two graphs compiling at once; Python's open() then defaulted to ASCII), so
# compiles that use the cache take turns.
_CACHE_LOCK = threading.Lock()
OPENVINO = "OpenVINO"  # the provider name star-export records for graphs OpenVINO runs (not an ONNX Runtime provider)
PRECISIONS = {"bf16": "bfloat16", "f16": "float16", "f32": "float32"}  # OpenVINO's element types -> numpy names


def missing() -> str | None:
    """Why OpenVINO cannot run here (None: it can)."""
    try:
        import openvino  # noqa: F401
    except ModuleNotFoundError:
        return "the Python package 'openvino' is not installed: pip install 'star-export[openvino]'"
    return None


@functools.cache
def core():
    """OpenVINO's core, reading files into memory rather than mapping them: mapped, a compiled int4 segment held its
    repacked weights and the file's pages (a real-width 4-layer int4 engine: 2.86 GiB peak RSS mapped, 2.47 read)."""
    import openvino as ov

    ov_core = ov.Core()
    ov_core.set_property({"ENABLE_MMAP": False})
    return ov_core


def bfloat16_units() -> bool:
    """Whether this CPU computes bfloat16 natively (OpenVINO's own reading of the CPU: AVX-512 BF16 or AMX)."""
    return "BF16" in core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def graph_config(scheme: WeightScheme) -> dict[str, Any]:
    """OpenVINO's compile properties for an engine whose weights are `scheme`: its defaults (bfloat16 where the CPU has
    bfloat16 units), and for a quantized engine's MatMulNBits the activations quantized to int8 per block of the
    weights' `block_size` (DYNAMIC_QUANTIZATION_GROUP_SIZE) where the engine asks for int8 compute (accuracy_level 4),
    as ONNX Runtime's kernels do; none otherwise. Probed on one op (validate.quantized.matmul_compute): OpenVINO's
    dynamic quantization is `int8_activations` of that group size, symmetric, amax / 127, up to float rounding
    (relative 1e-7 in float32); its default group (32) would differ from the engine's block."""
    if not scheme.quantized:
        return {}
    return {"DYNAMIC_QUANTIZATION_GROUP_SIZE": scheme.block_size if scheme.accuracy_level == 4 else 0}


def run_once(model: bytes, feed: dict[str, np.ndarray], config: dict[str, Any]) -> list[np.ndarray]:
    """One serialized ONNX model compiled with `config` and run once (a probe)."""
    compiled = core().compile_model(core().read_model(model, b""), "CPU", config)
    return [np.asarray(v) for v in compiled.create_infer_request().infer(feed).to_tuple()]


def cache_dir() -> Path | None:
    """Where OpenVINO keeps the graphs it compiled (its CACHE_DIR), so that the next load of the same graph imports the
    compiled blob instead of compiling: $STAR_OPENVINO_CACHE, `off` for none; default
    `$XDG_CACHE_HOME/star-export/openvino` (`~/.cache/...`). None where the directory cannot be written. Measured on a
    real-width 4-layer int4 engine (2 cores, fresh processes; docs/performance.md): load 0.60-0.74 s from the cache
    against 1.1-1.3 s compiling, the same peak RSS; the cache holds about the engine's weights again (658 MB there)."""
    value = os.environ.get(CACHE_ENV)
    if value is not None and value.strip().lower() in ("", "off", "none", "0"):
        return None
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "star-export" / "openvino"
    path = Path(value) if value else base
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError:
        return None
    return path


def _compiled_marker(cache: Path, path: Path, config: dict[str, Any]) -> Path:
    """A file saying this graph file (path, size, modification time, its weights file), compiled with `config` by this
    OpenVINO on this CPU, is in the cache. Only chooses how the cache is read: OpenVINO's own key decides a hit."""
    files = [path, path.with_name(path.name + ".data")]
    stamp = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    who = (*_compiler_identity(), sorted(map(str, config.items())))
    return cache / f"star-{hashlib.sha256(repr((stamp, who)).encode()).hexdigest()[:32]}.compiled"


@functools.cache
def _compiler_identity() -> tuple[str, str]:
    """This OpenVINO's version and this CPU's name, as OpenVINO reports them: the same for every graph of a process."""
    import openvino as ov

    return ov.get_version(), core().get_property("CPU", "FULL_DEVICE_NAME")


def compile_graph(path: str | Path, config: dict[str, Any]):
    """`path` compiled for the CPU, through the cache where there is one. A graph already in the cache is imported with
    its blob memory-mapped (load 0.60-0.66 s against 0.75-1.04 s read, same peak RSS); one compiled for the first time
    reads the ONNX file into memory (mapped, that first load peaked at 2.92 GiB against 2.48 read)."""
    props = {"PERFORMANCE_HINT": "LATENCY", **config}
    cache = cache_dir()
    if cache is None:
        return core().compile_model(str(path), "CPU", props)
    marker = _compiled_marker(cache, Path(path), config)
    cached = marker.is_file()
    try:
        with _CACHE_LOCK:
            compiled = core().compile_model(str(path), "CPU", props | {"CACHE_DIR": str(cache), "ENABLE_MMAP": cached})
    except RuntimeError:  # the cache and not the graph, if compiling without it succeeds
        return core().compile_model(str(path), "CPU", props)
    if not cached:
        try:
            marker.touch()
        except OSError:
            pass
    return compiled


class OvGraph:
    """One exported ONNX graph compiled by OpenVINO for the CPU, with the `run(feed) -> dict` API of sessions.py: numpy
    in, numpy out (copies: the request's buffers are reused by the next call)."""

    device = "cpu"

    def __init__(self, path: str | Path, config: dict[str, Any] | None = None):
        """`config`: OpenVINO properties (`graph_config`)."""
        reason = missing()
        if reason:
            raise UserError(f"--provider openvino: {reason}")
        compiled = compile_graph(path, config or {})
        self.precision = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        self.compute_dtype = PRECISIONS.get(self.precision, "float32")
        self.provider = f"{OPENVINO}-CPU-{self.precision}"
        self.request = compiled.create_infer_request()
        self.input_names = [p.get_any_name() for p in compiled.inputs]
        self.output_names = [p.get_any_name() for p in compiled.outputs]

    def run(self, feed: dict[str, Any]) -> dict[str, Any]:
        inputs = {n: np.ascontiguousarray(self.to_numpy(feed[n])) for n in self.input_names}
        results = self.request.infer(inputs, share_inputs=True, share_outputs=False)
        return dict(zip(self.output_names, results.to_tuple()))

    @staticmethod
    def to_numpy(value) -> np.ndarray:
        return np.asarray(value)

    @staticmethod
    def nbytes(value) -> int:
        return np.asarray(value).nbytes


class LazyOvGraph:
    """An OpenVINO graph compiled only while it runs, for an engine validated one graph at a time (sessions.LazyOrtGraph
    is its ONNX Runtime twin): each call compiles, runs and frees it."""

    device = "cpu"

    def __init__(self, path: str | Path, config: dict[str, Any] | None = None):
        self.path, self.config = Path(path), config
        graph = OvGraph(self.path, config)  # check now that it compiles, and learn its names and precision
        self.input_names, self.output_names = graph.input_names, graph.output_names
        self.provider, self.compute_dtype = graph.provider, graph.compute_dtype

    def run(self, feed: dict[str, Any]) -> dict[str, Any]:
        return OvGraph(self.path, self.config).run(feed)

    to_numpy = staticmethod(OvGraph.to_numpy)
    nbytes = staticmethod(OvGraph.nbytes)
