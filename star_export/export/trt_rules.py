"""Static check of an ONNX model against TensorRT 10's ONNX parser rules, before any engine build.

Reports every violation (with the node's name) instead of stopping at the first, so one pass over an
exported graph lists everything that `trtexec` would reject one error at a time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import onnx
from onnx import numpy_helper
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

# Operators marked "Y" in onnx-tensorrt's docs/operators.md, "TensorRT 10.15 supports operators in the
# inclusive range of opset 9 to opset 24" (https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md,
# the TensorRT 10.15 release). Attention, RMSNormalization, RotaryEmbedding and TensorScatter were added in
# 10.15 (onnx-tensorrt CHANGELOG): an engine built with an earlier 10.x needs them decomposed.
SUPPORTED_OPS: frozenset[str] = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh Attention AveragePool BatchNormalization
    BlackmanWindow Cast CastLike Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh
    CumSum DeformConv DepthToSpace DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike
    Flatten Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool
    Greater GreaterOrEqual GridSample GroupNormalization GRU HammingWindow HannWindow HardSigmoid HardSwish
    Hardmax Identity If ImageScaler InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less
    LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
    MeanVarianceNormalization Min Mish Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
    ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform RandomUniformLike
    Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd
    ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RMSNormalization RNN RoiAlign RotaryEmbedding
    Round STFT ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size
    Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh TensorScatter
    ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split()
)

MIN_OPSET, MAX_OPSET = 9, 24  # default-domain opsets the TensorRT 10.15 parser accepts (same source)
TOPK_MAX_K = 3840  # exclusive: TopK's K must be < 3840 (same source)
DEFAULT_DOMAINS = ("", "ai.onnx")
AXES_INPUT_OPS = frozenset({op for op in SUPPORTED_OPS if op.startswith("Reduce")} | {"Squeeze", "Unsqueeze"})
SCATTER_OPS = frozenset({"ScatterND", "ScatterElements"})
ModelLike = Union[onnx.ModelProto, str, "os.PathLike[str]"]


@dataclass(frozen=True)
class Violation:
    node: str  # node name (path-prefixed inside subgraphs / functions), or "<graph>"
    op_type: str
    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.node} ({self.op_type}) [{self.rule}]: {self.message}"


class TensorRTCompatError(ValueError):
    def __init__(self, violations: list[Violation], graph_name: str = "") -> None:
        self.violations = violations
        head = f"{graph_name or 'ONNX model'}: {len(violations)} TensorRT 10 parser rule violation(s)"
        super().__init__("\n".join([head, *(f"  {v}" for v in violations)]))


@dataclass
class _Scope:
    """Names visible as build-time constants in a graph, their values (read lazily), and known ranks."""

    consts: set[str]
    values: dict[str, onnx.TensorProto | np.ndarray]
    ranks: dict[str, int]


class _Checker:
    def __init__(self, model: onnx.ModelProto, base_dir: Path | None) -> None:
        self.model = model
        self.base_dir = base_dir
        self.functions = {(f.domain, f.name): f for f in model.functions}
        self.checked_functions: set[tuple[str, str]] = set()
        self.out: list[Violation] = []

    def add(self, where: str, node: onnx.NodeProto, rule: str, message: str) -> None:
        self.out.append(Violation(where, node.op_type, rule, message))

    def value_of(self, scope: _Scope, name: str) -> np.ndarray | None:
        t = scope.values.get(name)
        if t is None or isinstance(t, np.ndarray):
            return t
        if uses_external_data(t):
            if self.base_dir is None:
                return None
            t = onnx.TensorProto.FromString(t.SerializeToString())
            try:
                load_external_data_for_tensor(t, str(self.base_dir))
            except (OSError, ValueError):
                return None
        return numpy_helper.to_array(t)

    def scope_for(self, graph: onnx.GraphProto | onnx.FunctionProto, outer: _Scope) -> _Scope:
        is_graph = isinstance(graph, onnx.GraphProto)
        shadowed = {i.name for i in graph.input} if is_graph else set(graph.input)
        values = {k: v for k, v in outer.values.items() if k not in shadowed}
        scope = _Scope(outer.consts - shadowed, values, dict(outer.ranks))
        if is_graph:
            for vi in [*graph.input, *graph.value_info, *graph.output]:
                if vi.type.tensor_type.HasField("shape"):
                    scope.ranks[vi.name] = len(vi.type.tensor_type.shape.dim)
            for init in graph.initializer:
                scope.consts.add(init.name)
                scope.ranks[init.name] = len(init.dims)
                scope.values[init.name] = init  # converted only if a rule needs the value (TopK's K)
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS and node.output:
                scope.consts.add(node.output[0])
                value = _constant_value(node)
                if value is not None:
                    scope.values[node.output[0]] = value
        return scope

    def check_graph(self, graph: onnx.GraphProto | onnx.FunctionProto, outer: _Scope, prefix: str) -> None:
        scope = self.scope_for(graph, outer)
        for index, node in enumerate(graph.node):
            where = prefix + (node.name or f"<{node.op_type} #{index}>")
            self.check_node(node, where, scope)
            for attr in node.attribute:
                subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                for sub in subgraphs:
                    self.check_graph(sub, scope, f"{where}/{attr.name}/")
            if node.op_type == "If" and node.domain in DEFAULT_DOMAINS:
                self.check_if_ranks(node, where, scope)

    def check_node(self, node: onnx.NodeProto, where: str, scope: _Scope) -> None:
        if node.domain not in DEFAULT_DOMAINS:
            key = (node.domain, node.op_type)
            if key in self.functions:
                if key not in self.checked_functions:
                    self.checked_functions.add(key)
                    fn_scope = _Scope(set(), {}, {})
                    self.check_graph(self.functions[key], fn_scope, f"{where}/{node.domain}.{node.op_type}/")
                return
            self.add(
                where,
                node,
                "unsupported-op",
                f"custom-domain op {node.domain}::{node.op_type} has no "
                "TensorRT importer; rewrite it with standard ONNX ops, or ship a TensorRT plugin for it.",
            )
            return
        if node.op_type not in SUPPORTED_OPS:
            self.add(
                where,
                node,
                "unsupported-op",
                f"{node.op_type} is not supported by TensorRT 10's ONNX "
                "parser; rewrite it with supported ops (or implement a plugin).",
            )
            return
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "TopK":
            self.check_topk(node, where, scope, attrs)
        elif node.op_type in AXES_INPUT_OPS and len(node.input) > 1 and node.input[1]:
            if node.input[1] not in scope.consts:
                self.add(
                    where,
                    node,
                    "axes-not-constant",
                    f"`axes` input {node.input[1]!r} is computed at run "
                    "time; TensorRT needs it as an initializer or Constant: use static axes in the model "
                    "(e.g. dim=-1 rather than a tensor-derived dim) or constant-fold the graph.",
                )
        elif node.op_type in SCATTER_OPS:
            reduction = attrs.get("reduction", b"none")
            reduction = reduction.decode() if isinstance(reduction, bytes) else str(reduction)
            if reduction != "none":
                self.add(
                    where,
                    node,
                    "scatternd-reduction",
                    f"reduction={reduction!r} is unsupported; use "
                    "reduction='none' (e.g. index_put without accumulate, or gather-add-scatter).",
                )

    def check_topk(self, node: onnx.NodeProto, where: str, scope: _Scope, attrs: dict[str, object]) -> None:
        k_name = node.input[1] if len(node.input) > 1 else ""
        if k_name and k_name not in scope.consts:
            self.add(
                where,
                node,
                "topk-dynamic-k",
                f"K {k_name!r} is computed at run time (graph input or "
                "computed tensor); TensorRT needs a build-time constant K (an initializer; TensorRT older "
                "than 10 accepts only an initializer, not a Constant node): pass a Python int k (torch.sort "
                "exports K from Shape() when any dim is dynamic; use torch.topk(x, k, largest=False) "
                "instead), or fold shapes (onnx-graphsurgeon fold_constants / polygraphy).",
            )
        k = self.value_of(scope, k_name)
        if k is not None and k.size == 1 and int(k.reshape(-1)[0]) >= TOPK_MAX_K:
            self.add(
                where,
                node,
                "topk-k-too-large",
                f"K={int(k.reshape(-1)[0])} but TensorRT's TopK needs "
                f"K < {TOPK_MAX_K}; reduce K, or split the selection (e.g. TopK per chunk then merge).",
            )
        if attrs.get("sorted", 1) != 1:
            self.add(
                where,
                node,
                "topk-unsorted",
                "sorted=0 is unsupported by TensorRT; export with "
                "sorted=True (sort the indices afterwards if another order is needed).",
            )

    def check_if_ranks(self, node: onnx.NodeProto, where: str, scope: _Scope) -> None:
        branches = {a.name: a.g for a in node.attribute if a.name in ("then_branch", "else_branch")}
        if len(branches) != 2:
            return
        then_g, else_g = branches["then_branch"], branches["else_branch"]
        then_ranks = self.scope_for(then_g, scope).ranks
        else_ranks = self.scope_for(else_g, scope).ranks
        for i, (t, e) in enumerate(zip(then_g.output, else_g.output)):
            rt, re = then_ranks.get(t.name), else_ranks.get(e.name)
            if rt is not None and re is not None and rt != re:
                self.add(
                    where,
                    node,
                    "if-branch-rank",
                    f"output {i} has rank {rt} in then_branch but {re} in "
                    "else_branch; TensorRT needs equal ranks: reshape/unsqueeze one branch to match.",
                )


def _constant_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t) if not uses_external_data(attr.t) else None
        if attr.name in ("value_int", "value_float", "value_ints", "value_floats"):
            return np.asarray(onnx.helper.get_attribute_value(attr))
    return None


def _load(model_or_path: ModelLike) -> tuple[onnx.ModelProto, Path | None]:
    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path, None
    path = Path(model_or_path)
    return onnx.load(str(path), load_external_data=False), path.parent


def check_tensorrt_rules(model_or_path: ModelLike) -> list[Violation]:
    """Every TensorRT 10 ONNX-parser rule violation in the model (empty list: the model passes)."""
    model, base_dir = _load(model_or_path)
    try:  # fills in ranks for the If check; weights are not needed
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - shape inference is a best-effort aid only
        inferred = model
    checker = _Checker(inferred, base_dir)
    for opset in model.opset_import:
        if opset.domain in DEFAULT_DOMAINS and not MIN_OPSET <= opset.version <= MAX_OPSET:
            checker.out.append(
                Violation(
                    "<graph>",
                    "",
                    "opset-range",
                    f"default-domain opset {opset.version} "
                    f"is outside TensorRT 10's {MIN_OPSET}..{MAX_OPSET}; re-export with an "
                    "opset in range (e.g. opset_version=18).",
                )
            )
    checker.check_graph(inferred.graph, _Scope(set(), {}, {}), "")
    return checker.out


def assert_tensorrt_rules(model_or_path: ModelLike, graph_name: str = "", allow_ops: frozenset = frozenset()) -> None:
    """Raise TensorRTCompatError listing every violation, one per line, if the model breaks any rule.
    `allow_ops`: custom ops known not to parse and accepted by design (int8 / int4 `MatMulNBits`, ONNX Runtime only)."""
    violations = [
        v for v in check_tensorrt_rules(model_or_path) if not (v.rule == "unsupported-op" and v.op_type in allow_ops)
    ]
    if violations:
        raise TensorRTCompatError(violations, graph_name)
