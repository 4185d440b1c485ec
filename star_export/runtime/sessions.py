"""ONNX Runtime sessions with the graphs' one API, `run(feed) -> dict` (runtime/eager.py: the eager PyTorch one).

Values flow between graphs in each backend's own type (`OrtValue`s bound with ORT IO binding so key/value caches stay
where the provider put them; torch tensors for the caches on a GPU); `to_numpy` reads one on the host. torch is
imported only where a GPU needs it: a CPU engine loads without it (about a second of the load).
"""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..config import PROVIDERS
from ..errors import UserError
from . import openvino
from .kvcache import NEW as NEW_KV
from .kvcache import PAST as PAST_KV
from .threads import thread_pool

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # onnxruntime otherwise writes state under ~/.cache


PROVIDER_ALIASES = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


# Options per provider, passed with its name. CUDA: float32 products in float32, not TF32 (ONNX Runtime's default is
# TF32 on Ampere and later), so a float32 engine computes what its dtype says and star-validate's budgets hold
# (measured on an H100: a float32 MatMul 2.9e-4 from float64 by default, 1.5e-7 with use_tf32 0). Convolution
# algorithms by cuDNN's heuristic, not ONNX Runtime's default exhaustive search: that search runs again whenever the
# input's shape changes, and a server's batch size changes from call to call (H100, a float16 engine's vision graph
# with batch 1 and batch 4 calls alternating: 26.7 and 30.1 ms per call exhaustive, 8.1 and 14.0 heuristic;
# docs/performance.md, "Decided experiments").
PROVIDER_OPTIONS = {"CUDAExecutionProvider": {"use_tf32": "0", "cudnn_conv_algo_search": "HEURISTIC"}}


def with_options(providers: Sequence[str]) -> list:
    """`providers` as ONNX Runtime takes them: (name, options) where PROVIDER_OPTIONS has some."""
    return [(p, PROVIDER_OPTIONS[p]) if p in PROVIDER_OPTIONS else p for p in providers]


class ProviderError(UserError):
    pass


PROVIDER_ENV = "STAR_PROVIDER"  # what `auto` means in this environment (a fleet or a test suite pinned to one)


def auto_provider(quantized: bool) -> str:
    """`auto`: $STAR_PROVIDER where set; else CUDA where this onnxruntime build and torch see a GPU; else OpenVINO for
    a quantized (int4 / int8) engine on a CPU with bfloat16 units (time to first token 0.6x ONNX Runtime's, decode and
    memory close: runtime/openvino.py); else ONNX Runtime's CPU provider. A float engine keeps ONNX Runtime: OpenVINO
    halves its time to first token but holds 1.7x the memory; OpenVINO in float32 measured no faster."""
    import onnxruntime as ort

    pinned = os.environ.get(PROVIDER_ENV)
    if pinned:
        allowed = [p for p in PROVIDERS if p != "auto"]
        if pinned not in allowed:
            raise ProviderError(f"{PROVIDER_ENV}={pinned!r}: allowed {', '.join(allowed)}")
        return pinned
    if "CUDAExecutionProvider" in ort.get_available_providers():
        import torch  # onnxruntime-gpu is installed: whether a GPU is there, torch answers

        if torch.cuda.is_available():
            return "cuda"
    if quantized and openvino.missing() is None and openvino.bfloat16_units():
        return "openvino"
    return "cpu"


def resolve_providers(name: str, allow_fallback: bool = False, quantized: bool = False) -> list[str]:
    """Providers for `cpu` / `cuda` / `tensorrt` / `openvino` / `auto` (`auto_provider`) that this machine has:
    ONNX Runtime's provider names, or [OPENVINO]. A GPU provider that is missing is an error unless `allow_fallback`
    (then the CPU, with a warning on stderr); so is OpenVINO where it is not installed."""
    import onnxruntime as ort

    if name == "auto":
        name = auto_provider(quantized)
    if name == "openvino":
        reason = openvino.missing()
        if reason and not allow_fallback:
            raise ProviderError(f"--provider openvino: {reason}; use --provider cpu")
        if reason:
            print(f"warning: --provider openvino: {reason}: running on ONNX Runtime's CPU provider", file=sys.stderr)
            return PROVIDER_ALIASES["cpu"]
        return [openvino.OPENVINO]
    available = ort.get_available_providers()
    if name in PROVIDER_ALIASES:
        wanted = PROVIDER_ALIASES[name]
    else:
        raise ProviderError(f"unknown provider {name!r}: allowed {', '.join(PROVIDERS)}")
    missing = [p for p in wanted if p not in available]
    if missing and name != "cpu" and allow_fallback:
        print(
            f"warning: provider {name!r} needs {missing[0]}, which this onnxruntime build lacks: running on the CPU "
            "(--allow-fallback)",
            file=sys.stderr,
        )
        return PROVIDER_ALIASES["cpu"]
    if missing and name != "cpu":
        raise ProviderError(
            f"provider {name!r} needs {missing[0]}, which this onnxruntime build lacks (it has {available}); "
            "install onnxruntime-gpu in place of onnxruntime (`pip uninstall -y onnxruntime && pip install "
            "onnxruntime-gpu`), or pass --allow-fallback to run on the CPU"
        )
    return wanted


CPU_ARENA_ENV = "STAR_ORT_CPU_ARENA"


def _own_arena(opts) -> None:
    opts.enable_cpu_mem_arena = True  # ONNX Runtime's default: an arena per session


def _no_arena(opts) -> None:
    opts.enable_cpu_mem_arena = False


@functools.cache
def _register_shared_arena() -> None:
    """ONNX Runtime's environment allocator: one CPU arena, registered once per process, for every session that opts in
    (only ours do; other libraries' sessions keep their own)."""
    import onnxruntime as ort

    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, -1, -1, -1))  # ONNX Runtime's default arena settings


def _shared_arena_of_process(opts) -> None:
    _register_shared_arena()
    opts.enable_cpu_mem_arena = True
    opts.add_session_config_entry("session.use_env_allocators", "1")


ARENA_SETTINGS = {"shared": _shared_arena_of_process, "session": _own_arena, "off": _no_arena}


def cpu_arena(transient: bool = False, value: str | None = None) -> str:
    """Where a session's CPU tensors come from: `value` (RuntimeOptions.cpu_arena), else $STAR_ORT_CPU_ARENA, read as
    each session is created (another value is a user error), else "shared"; `session_options` sets it. Measured on 2
    cores (docs/performance.md, "Decided experiments"):
    - "shared" (default): one ONNX Runtime arena for every session of the process. Prefill and decode took the time
      they took with an arena per session (0.97-1.03x in one process, either load order, 4-layer int4 and float32 and
      full-size int4), and a process's memory grows to its largest call's, not to the sum of every session's:
      bench.py's process (14 engine configurations at batch 1 and 4, a 4-layer real-width model) peaked at 14.2 GiB.
    - "session": an arena per session (ONNX Runtime's default, and star-export's before): each keeps what it grew to;
      bench.py peaked at 22.0 GiB on a 24 GiB machine.
    - "off": no arena. The least memory (bench.py 12.0 GiB), but every call maps its large buffers afresh: a repeated
      prefill took 1.14x as long (1.03-1.20).
    `transient`: a session freed after one run (LazyOrtGraph) gets its own arena where the process's is shared, so that
    what it grew to is freed with it (memory.py's plan for a lazy validation counts on that)."""
    value = value or os.environ.get(CPU_ARENA_ENV) or "shared"
    if value not in ARENA_SETTINGS:
        raise UserError(f"{CPU_ARENA_ENV}={value!r}: allowed {', '.join(ARENA_SETTINGS)}")
    return "session" if transient and value == "shared" else value


def session_options(threads: int | None = None, transient: bool = False, arena: str | None = None):
    """The options every engine session is created with (see `thread_pool`; `cpu_arena`, with `transient` and
    `arena`)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    ARENA_SETTINGS[cpu_arena(transient, arena)](opts)
    if thread_pool(threads) == "shared":  # runtime/threads.py
        opts.use_per_session_threads = False
        return opts
    if threads:
        opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # see runtime/threads.py
    return opts


NUMPY_OF_TORCH = ("float32", "float16", "float64", "int64")  # torch dtypes a GPU value is bound with, by name
TORCH_OF_ORT = {"tensor(float)": "float32", "tensor(float16)": "float16"}


def loaded_torch():
    """torch where the process has imported it (a torch tensor can exist only then), else None."""
    return sys.modules.get("torch")


def numpy_dtype(torch_dtype):
    name = str(torch_dtype).removeprefix("torch.")
    if name not in NUMPY_OF_TORCH:
        raise TypeError(f"no binding for a {torch_dtype} tensor")
    return np.dtype(name).type


def gpu_kv_outputs(outputs) -> dict[str, tuple[str, int, int]]:
    """A graph's new key and value outputs (`new_key_values.*`, (B, kv_heads, q, head_dim) with static heads and
    head_dim) that a GPU run writes into torch tensors: name -> (torch dtype name, kv_heads, head_dim)."""
    return {
        o.name: (TORCH_OF_ORT[o.type], o.shape[1], o.shape[3])
        for o in outputs
        if o.name.startswith(NEW_KV)
        and o.type in TORCH_OF_ORT
        and len(o.shape) == 4
        and isinstance(o.shape[1], int)
        and isinstance(o.shape[3], int)
    }


def host_numpy(value) -> np.ndarray:
    """A torch tensor (bfloat16 widened: numpy has none, float32 holds each value exactly) or an array, on the host."""
    torch = loaded_torch()
    if torch is None or not torch.is_tensor(value):
        return np.asarray(value)
    value = value.detach().cpu()
    return (value.float() if value.dtype == torch.bfloat16 else value).numpy()


def host_nbytes(value) -> int:
    torch = loaded_torch()
    return value.numel() * value.element_size() if torch and torch.is_tensor(value) else np.asarray(value).nbytes


class OrtGraph:
    """An ONNX Runtime session run through IO binding: outputs stay `OrtValue`s on the provider's device, and inputs
    are bound where they lie (numpy arrays without a copy on the CPU, torch tensors on the GPU), so KV cache buffers
    are read in place."""

    # Host transfers, where a list: ("to_device", input name, dtype, shape) for each host array bound as an input (the
    # KV cache buffers excepted: they live on the provider's device, kvcache.zeros), ("to_host", None, dtype, shape) for
    # each value read with `to_numpy`. On the CPU provider nothing is copied; what is counted is what would cross on a
    # GPU, through the same binding code (tests/test_transfers.py).
    transfers: list | None = None

    def __init__(
        self,
        path: str | Path | bytes,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        threads: int | None = None,
        arena: str | None = None,
    ):
        """`path`: a graph file, or a serialized model. `arena`: the CPU arena (`cpu_arena`'s value; None: the
        environment's, else shared)."""
        import onnxruntime as ort

        self._ort = ort
        self.session = ort.InferenceSession(
            path if isinstance(path, bytes) else str(path),
            sess_options=session_options(threads, arena=arena),
            providers=with_options(providers),
        )
        self.cpu_arena = cpu_arena(value=arena)  # what session_options just set
        self.provider = self.session.get_providers()[0]
        if self.provider != providers[0]:
            warnings.warn(
                f"{'a graph' if isinstance(path, bytes) else Path(path).name}: asked for {providers[0]}, running on "
                f"{self.provider}",
                RuntimeWarning,
                stacklevel=2,
            )
        self.device = "cuda" if self.provider in ("CUDAExecutionProvider", "TensorrtExecutionProvider") else "cpu"
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._torch_outputs = gpu_kv_outputs(self.session.get_outputs()) if self.device == "cuda" else {}

    def run(self, feed: dict[str, Any]) -> dict[str, Any]:
        binding = self.session.io_binding()
        torch, written_by_torch = loaded_torch(), set()
        for name in self.input_names:
            value = feed[name]
            if isinstance(value, self._ort.OrtValue):
                binding.bind_ortvalue_input(name, value)
            elif torch is not None and torch.is_tensor(value):  # a KV buffer on the GPU (kvcache.zeros), read in place
                value = value.contiguous()
                binding.bind_input(
                    name,
                    value.device.type,
                    value.device.index or 0,
                    numpy_dtype(value.dtype),
                    tuple(value.shape),
                    value.data_ptr(),
                )
                written_by_torch.add(value.device)
            else:
                value = np.ascontiguousarray(value)
                if self.transfers is not None and not name.startswith(PAST_KV):
                    self.transfers.append(("to_device", name, value.dtype, value.shape))
                binding.bind_cpu_input(name, value)
        for (
            device
        ) in written_by_torch:  # torch wrote these buffers on its own stream; ONNX Runtime reads them on another
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()
        in_torch = {}
        for name in self.output_names:
            tensor = self._bind_output(binding, name, feed)
            if tensor is not None:
                in_torch[name] = tensor
        self.session.run_with_iobinding(binding)
        return dict(zip(self.output_names, binding.get_outputs())) | in_torch

    def _bind_output(self, binding, name: str, feed: dict[str, Any]):
        """Where output `name` goes: a new value on the provider's device. On a GPU, a segment's new keys and values go
        into torch tensors (returned), which the KV cache copies into its buffers on the device (kvcache.append)
        instead of through the host."""
        spec = self._torch_outputs.get(name)
        tokens = spec and feed.get("inputs_embeds", feed.get("hidden_states"))
        if tokens is None or spec is None:
            binding.bind_output(name, self.device)
            return None
        import torch  # a GPU run: the caches are torch tensors on the device

        dtype, heads, head_dim = spec
        batch, q = (tokens.shape() if callable(tokens.shape) else tokens.shape)[:2]
        shape = (int(batch), heads, int(q), head_dim)
        tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
        binding.bind_output(
            name, tensor.device.type, tensor.device.index or 0, np.dtype(dtype).type, shape, tensor.data_ptr()
        )
        return tensor

    def to_numpy(self, value) -> np.ndarray:
        array = self.cache_read(value)
        if self.transfers is not None and isinstance(value, self._ort.OrtValue):
            self.transfers.append(("to_host", None, array.dtype, array.shape))
        return array

    def cache_read(self, value) -> np.ndarray:
        """A graph output as a host array, for the KV cache's host buffers (CPU provider: the value is in host memory
        already; on a GPU the caches take torch tensors on the device and never call this)."""
        return value.numpy() if isinstance(value, self._ort.OrtValue) else host_numpy(value)

    def nbytes(self, value) -> int:
        """Size without a copy to the host (the value may live on the GPU)."""
        if isinstance(value, self._ort.OrtValue):
            dtype = self._ort_dtypes[value.data_type()]
            return int(np.prod(value.shape(), dtype=np.int64)) * np.dtype(dtype).itemsize
        return host_nbytes(value)

    _ort_dtypes = {
        "tensor(float)": np.float32,
        "tensor(float16)": np.float16,
        "tensor(int64)": np.int64,
        "tensor(double)": np.float64,
    }


class LazyOrtGraph:
    """An ONNX Runtime graph whose session exists only while it runs: for engines whose graphs do not fit in memory
    together (a float16 7B engine on the CPU provider, which widens its weights to float32: ~13 GB per segment).
    Each call creates the session, runs it on numpy inputs and frees it, so only one graph is ever resident; the
    session is rebuilt at every call (seconds per GB), which only the validator's few steps can afford."""

    def __init__(
        self, path: str | Path, providers: Sequence[str] = ("CPUExecutionProvider",), arena: str | None = None
    ):
        import onnx

        self.path, self.providers, self.arena = Path(path), list(providers), arena
        graph = onnx.load(str(self.path), load_external_data=False).graph
        initializers = {i.name for i in graph.initializer}
        self.input_names = [i.name for i in graph.input if i.name not in initializers]
        self.output_names = [o.name for o in graph.output]
        self.provider, self.device = self.providers[0], "cpu"

    # Without constant folding. Folding replaces each float16 weight's Cast by a float32 copy while the file's float16
    # tensors are still held: segment 1 of a 7B float16 engine peaked at 19.16 GiB with it and 13.14 GiB without,
    # created in 33 s instead of 75, with bitwise-equal logits (measured on a 7B float16 engine; tests/test_streaming.py
    # checks the equality on every graph of a float16 engine).
    DISABLED_OPTIMIZERS = ("ConstantFolding",)

    def session(self):
        import onnxruntime as ort

        return ort.InferenceSession(
            str(self.path),
            sess_options=session_options(transient=True, arena=self.arena),
            providers=with_options(self.providers),
            disabled_optimizers=list(self.DISABLED_OPTIMIZERS),
        )

    def run(self, feed: dict[str, Any]) -> dict[str, Any]:
        import gc

        session = self.session()
        try:
            outputs = session.run(None, {n: np.ascontiguousarray(self.to_numpy(feed[n])) for n in self.input_names})
        finally:
            del session
            gc.collect()
        return dict(zip(self.output_names, outputs))

    @staticmethod
    def to_numpy(value) -> np.ndarray:
        return value.numpy() if hasattr(value, "numpy") and not isinstance(value, np.ndarray) else np.asarray(value)

    @staticmethod
    def nbytes(value) -> int:
        return np.asarray(value).nbytes
