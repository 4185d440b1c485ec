"""Backend registry: what each `--backend` builds and which dtypes it can run."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import UserError
from .onnx_export import export_onnx
from ..config import QUANTIZED_GRAPHS, WeightScheme
from .trt_rules import assert_tensorrt_rules


class BackendError(UserError, ValueError):
    """A backend that cannot build what was asked; the message names the alternative."""


@dataclass(frozen=True)
class Backend:
    name: str
    dtypes: tuple[str, ...]
    build: Callable  # (loaded, schedule, out_dir, dtype=, progress=) -> {graph: ExportedGraph}
    why_not: dict[str, str]
    unavailable: Callable[[], None] | None = None  # raises BackendError when the backend cannot build here

    def check_available(self) -> None:
        """Raise BackendError now, before any model loads, if this backend cannot build here."""
        if self.unavailable is not None:
            self.unavailable()

    def check_dtype(self, dtype: str) -> None:
        if dtype not in self.dtypes:
            raise BackendError(
                f"--dtype {dtype} is not supported by --backend {self.name}: {self.why_not.get(dtype, '')} "
                f"allowed: {', '.join(self.dtypes)}"
            )


def build_onnx(loaded, schedule, out_dir, *, dtype, progress=None, weights=WeightScheme()):
    graphs = export_onnx(loaded, schedule, out_dir, dtype=dtype, progress=progress, weights=weights)
    if progress:
        progress("check TensorRT parser rules")
    quantized = frozenset({"MatMulNBits"}) if weights.quantized else frozenset()
    for g in graphs.values():
        assert_tensorrt_rules(
            g.path, graph_name=g.name, allow_ops=quantized if g.name in QUANTIZED_GRAPHS else frozenset()
        )
    return graphs


def tensorrt_unavailable() -> None:
    try:
        import tensorrt  # noqa: F401  (lazy: never needed for the ONNX path)
    except ImportError as e:
        raise BackendError(
            "--backend tensorrt needs TensorRT, which is not installed: install it from NVIDIA's index "
            "(`pip install --extra-index-url https://pypi.nvidia.com 'star-export[tensorrt]'`) on a GPU machine, "
            "or use --backend onnx"
        ) from e
    raise BackendError(
        "--backend tensorrt: building TensorRT plans is not implemented in this release (it was never run here: "
        "no TensorRT on the development machines). Use --backend onnx; its graphs pass TensorRT's ONNX parser rules "
        "and can be built with `trtexec --onnx=DIR/<graph>.onnx` and one optimization profile per dynamic input"
    )


def build_tensorrt(loaded, schedule, out_dir, *, dtype, progress=None, weights=WeightScheme()):
    tensorrt_unavailable()


BACKENDS: dict[str, Backend] = {
    "onnx": Backend(
        "onnx",
        ("float32", "float16"),
        build_onnx,
        {"bfloat16": "ONNX Runtime's CPU and CUDA providers lack bfloat16 kernels for these graphs (MatMul, Softmax);"},
    ),
    "tensorrt": Backend("tensorrt", ("float32", "float16", "bfloat16"), build_tensorrt, {}, tensorrt_unavailable),
}


def backend_from_name(name: str) -> Backend:
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}: allowed {', '.join(BACKENDS)}")
    return BACKENDS[name]
