"""ONNX export of the four graphs (vision, segment 0, pivot, segment 1).

Exporter: torch.onnx's dynamo exporter (`dynamo=True`). It writes TopK's K as an initializer, which is
the form TensorRT's parser requires (the legacy TorchScript exporter writes a Constant node
that needs folding and is deprecated), it takes `torch.export.Dim` dynamic shapes, and it writes
weights as external data (`<graph>.onnx.data`), needed past 2 GB.

Memory: graphs are traced on a weightless copy of the model (the `meta` device), then each initializer is
attached as a lazy tensor that reads the real parameter (memory-mapped from the checkpoint) and casts it to
the engine's dtype only while it is written. Exporting never holds more than one tensor in the engine's dtype,
whatever the checkpoint's size or dtype (a 7B float16 checkpoint exports to a float32 engine on 24 GB).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.export import Dim

from ..config import QUANTIZED_GRAPHS, StarSchedule, WeightScheme
from ..errors import user_error_from
from ..graphs.stages import graph_modules
from ..memory import release_pages
from ..models import TORCH_DTYPES, LoadedModel, cast_module
from .quantize import quantize_linears

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
        return args, {
            "hidden_states": dims,
            "stage2_scores": dims,
            "attention_mask": dims,
            "position_ids": dims,
            "image_start": {0: batch},
        }
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


def weightless(loaded: LoadedModel, dtype: torch.dtype) -> LoadedModel:
    """The model's architecture on the `meta` device in `dtype`: what the exporter traces (no weights)."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = cast_module(LlavaForConditionalGeneration(copy.deepcopy(loaded.model.config)), dtype)
    model.set_attn_implementation("eager")
    return LoadedModel(
        model.eval().requires_grad_(False), loaded.processor, loaded.spec, loaded.defaults, loaded.source
    )


def _lazy_weights(program, real: torch.nn.Module) -> None:
    """Point every initializer of the traced graph at the real module's tensor of the same name, cast on demand."""
    import onnx_ir as ir

    tensors = dict(real.named_parameters()) | dict(real.named_buffers())
    declared = {
        ir.DataType.FLOAT: torch.float32,
        ir.DataType.FLOAT16: torch.float16,
        ir.DataType.BFLOAT16: torch.bfloat16,
        ir.DataType.DOUBLE: torch.float64,
    }
    for name, value in program.model.graph.initializers.items():
        if name not in tensors:
            raise ExportError(
                f"the traced graph has an initializer {name!r} that the model does not: cannot attach weights"
            )
        source = tensors[name]

        def load(source=source, name=name, wanted=declared.get(value.dtype)):
            t = (
                source.detach()
            )  # cast to what the graph declares: `dtype`, or float32 for RoPE's frequencies (cast_module)
            t = t.to(wanted, copy=True) if t.is_floating_point() and wanted is not None else t.clone()
            release_pages(source)  # the checkpoint's mapped pages of this tensor: read once, handed back
            return ir.Tensor(t.contiguous().numpy(), name=name)

        value.const_value = ir.LazyTensor(load, dtype=value.dtype, shape=value.shape, name=name)


FOLD_LIMIT = 8192  # elements: the optimizer's own default input size limit


def fold_weight_transposes(model) -> int:
    """Store each weight that the graph transposes (the exporter writes a Linear as `MatMul(x, Transpose(W))`) already
    transposed, `[K, N]`, so ONNX Runtime does not fold the Transpose at every session creation: its constant folding
    of a real-width float32 segment's 14 weight transposes took 5.7 of the 8.1 s the session took to create. The new
    tensor is lazy like the one it replaces (transposed while the graph is saved, one at a time); the values are the
    same, so the graph computes exactly what it did. Run after `quantize_linears`, which reads the Transpose pattern.
    Returns the count."""
    import onnx_ir as ir

    graph = model.graph
    count = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        w, out = node.inputs[0], node.outputs[0]
        perm = node.attributes.get("perm")
        if w is None or w.const_value is None or w.name not in graph.initializers or len(w.shape) != 2:
            continue
        if (perm is not None and list(perm.value) != [1, 0]) or not out.uses() or out.is_graph_output():
            continue
        shape = ir.Shape((int(w.shape[1]), int(w.shape[0])))
        name = f"{w.name}.transposed"

        def load(source=w.const_value, name=name):
            return ir.Tensor(np.ascontiguousarray(source.numpy().T), name=name)

        value = ir.Value(
            name=name,
            shape=shape,
            type=ir.TensorType(w.dtype),
            const_value=ir.LazyTensor(load, dtype=w.dtype, shape=shape, name=name),
        )
        graph.register_initializer(value)
        out.replace_all_uses_with(value)
        graph.remove(node, safe=True)
        if not w.uses():
            graph.initializers.pop(w.name)
        count += 1
    return count


def _small_inputs_only(node) -> bool | None:
    """The optimizer's `should_fold`: never fold a node that reads a large constant (None: its default rules)."""
    large = any(v is not None and v.const_value is not None and v.const_value.size > FOLD_LIMIT for v in node.inputs)
    return False if large else None


def export_graph(
    module,
    args,
    dynamic_shapes,
    input_names,
    output_names,
    path: Path,
    real: torch.nn.Module | None = None,
    dtype: torch.dtype | None = None,
    weights: WeightScheme = WeightScheme(),
) -> ExportedGraph:
    """Export `module`; with `real`, `module` is a weightless (meta) twin and the weights come from `real`;
    a quantized `weights` scheme turns its Linears into MatMulNBits."""
    import onnx
    import onnxscript.optimizer

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
            optimize=real is None,
            verbose=False,
        )
        if real is not None:
            _lazy_weights(program, real)
            if weights.quantized and not quantize_linears(program.model, weights, str(dtype).removeprefix("torch.")):
                raise ExportError(
                    f"{path.name}: no Linear found to quantize (the exporter's MatMul(x, Transpose(W)) pattern "
                    "changed?)"
                )
            fold_weight_transposes(program.model)
            # Fold small constants only: the optimizer folds some ops (Transpose) whatever their size, which would hold
            # every transposed weight in memory (measured: 21 GB at 7B); nodes reading a large initializer are kept.
            onnxscript.optimizer.optimize_ir(program.model, should_fold=_small_inputs_only)
        program.save(str(path), external_data=True)
    except ExportError:
        raise
    except Exception as e:  # the exporter raises many types; keep the cause, name the graph
        if user_error_from(e):
            raise user_error_from(e) from e
        raise ExportError(f"torch.onnx.export failed for {path.name}: {e.__class__.__name__}: {str(e)[:2000]}") from e
    onnx.checker.check_model(str(path), full_check=False)
    size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    return ExportedGraph(path.stem, path, time.perf_counter() - t, size)


def export_onnx(
    loaded: LoadedModel,
    schedule: StarSchedule,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    graphs=None,
    progress=None,
    weights: WeightScheme = WeightScheme(),
) -> dict[str, ExportedGraph]:
    """Export the engine's graphs as `<out_dir>/<name>.onnx` (+ `.onnx.data`). Returns name -> ExportedGraph.
    `weights`: a quantized scheme applies to the decoder segments (their Linears and lm_head); vision stays float."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch_dtype = TORCH_DTYPES[dtype]
    meta = weightless(loaded, torch_dtype)
    modules, real = graph_modules(meta, schedule), graph_modules(loaded, schedule)
    result = {}
    for name in graphs or modules:
        module, input_names, output_names = modules[name]
        args, shapes = _example_and_shapes(name, meta, schedule, torch_dtype)
        args = tuple(a.to("meta") for a in args)
        if progress:
            progress(f"export {name}")
        with torch.no_grad():
            result[name] = export_graph(
                module.eval(),
                args,
                shapes,
                input_names,
                output_names,
                out_dir / f"{name}.onnx",
                real[name][0],
                torch_dtype,
                weights if name in QUANTIZED_GRAPHS else WeightScheme(),
            )
    return result
