"""ONNX export of the four graphs (vision, segment 0, pivot, segment 1).

Exporter: torch.onnx's dynamo exporter (`dynamo=True`). It writes TopK's K as an initializer, which is
the form TensorRT's parser requires (FIELD_NOTES; the legacy TorchScript exporter writes a Constant node
that needs folding and is deprecated), it takes `torch.export.Dim` dynamic shapes, and it writes
weights as external data (`<graph>.onnx.data`), needed past 2 GB.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.export import Dim

from ..config import StarSchedule
from ..models import TORCH_DTYPES, LoadedModel
from ..reference import graph_modules

OPSET = 18


class ExportError(RuntimeError):
    pass


@dataclass
class ExportedGraph:
    name: str
    path: Path
    seconds: float
    bytes: int


def _example_and_shapes(name: str, loaded: LoadedModel, schedule: StarSchedule, dtype: torch.dtype):
    """Example inputs (distinct sizes, so no two dynamic axes get unified) and their dynamic shapes."""
    spec = loaded.spec
    batch = Dim("batch_size", min=1, max=1024)
    seq, past = Dim("sequence_length", min=1, max=1 << 20), Dim("past_sequence_length", min=0, max=1 << 20)
    B, S, Pn = 2, 7, 3
    kv = lambda: torch.randn(B, spec.num_key_value_heads, Pn, spec.head_dim, dtype=dtype)  # noqa: E731
    kv_shape = {0: batch, 2: past}
    if name == "vision":
        pv = torch.randn(B, 3, spec.image_size, spec.image_size, dtype=dtype)
        return (pv,), {"pixel_values": {0: batch}}
    if name == "pivot":
        n = schedule.stage1_keep + 9
        args = (
            torch.randn(B, n, spec.hidden_size, dtype=dtype),
            torch.rand(B, n, dtype=dtype),
            torch.ones(B, n, dtype=torch.int64),
            torch.arange(n).repeat(B, 1),
            torch.tensor([2, 5][:B], dtype=torch.int64),
        )
        dims = {0: batch, 1: seq}
        return args, {"hidden_states": dims, "stage2_scores": dims, "attention_mask": dims, "position_ids": dims, "image_start": {0: batch}}
    if name == "segment0":
        layers = schedule.pivot_layer + 1
        args = (
            torch.randn(B, S, spec.hidden_size, dtype=dtype),
            torch.ones(B, Pn + S, dtype=torch.int64),
            torch.arange(Pn, Pn + S).repeat(B, 1),
            torch.ones(B, S, dtype=torch.int64),
            *[kv() for _ in range(2 * layers)],
        )
        shapes = {
            "inputs_embeds": {0: batch, 1: seq},
            "attention_mask": {0: batch, 1: Dim.AUTO},
            "position_ids": {0: batch, 1: seq},
            "suffix_rows": {0: batch, 1: seq},
            "past_key_values": (kv_shape,) * (2 * layers),
        }
        return args, shapes
    if name == "segment1":
        layers = schedule.num_layers - schedule.pivot_layer - 1
        args = (
            torch.randn(B, S, spec.hidden_size, dtype=dtype),
            torch.ones(B, Pn + S, dtype=torch.int64),
            torch.arange(Pn, Pn + S).repeat(B, 1),
            *[kv() for _ in range(2 * layers)],
        )
        shapes = {
            "hidden_states": {0: batch, 1: seq},
            "attention_mask": {0: batch, 1: Dim.AUTO},
            "position_ids": {0: batch, 1: seq},
            "past_key_values": (kv_shape,) * (2 * layers),
        }
        return args, shapes
    raise KeyError(name)


def export_graph(module, args, dynamic_shapes, input_names, output_names, path: Path) -> ExportedGraph:
    import onnx

    t = time.perf_counter()
    try:
        program = torch.onnx.export(
            module,
            args,
            dynamic_shapes=dynamic_shapes,
            input_names=input_names,
            output_names=output_names,
            opset_version=OPSET,
            dynamo=True,
            external_data=True,
            optimize=True,
            verbose=False,
        )
        program.save(str(path), external_data=True)
    except Exception as e:  # the exporter raises many types; keep the cause, name the graph
        raise ExportError(f"torch.onnx.export failed for {path.name}: {e.__class__.__name__}: {str(e)[:2000]}") from e
    onnx.checker.check_model(str(path), full_check=False)
    size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    return ExportedGraph(path.stem, path, time.perf_counter() - t, size)


def export_onnx(loaded: LoadedModel, schedule: StarSchedule, out_dir: str | Path, *, dtype: str = "float32", graphs=None, progress=None) -> dict[str, ExportedGraph]:
    """Export the engine's graphs as `<out_dir>/<name>.onnx` (+ `.onnx.data`). Returns name -> ExportedGraph."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cast = loaded.cast(dtype)
    modules = graph_modules(cast, schedule)
    result = {}
    for name in graphs or modules:
        module, input_names, output_names = modules[name]
        args, shapes = _example_and_shapes(name, cast, schedule, TORCH_DTYPES[dtype])
        if progress:
            progress(f"export {name}")
        with torch.no_grad():
            result[name] = export_graph(module.eval(), args, shapes, input_names, output_names, out_dir / f"{name}.onnx")
    return result
