"""TensorRT 10 ONNX-parser rule checks on tiny hand-built graphs, and on a real dynamo export."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from star_export.export.trt_rules import (
    SUPPORTED_OPS,
    TensorRTCompatError,
    Violation,
    assert_tensorrt_rules,
    check_tensorrt_rules,
)

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def _model(nodes, inputs, outputs, inits=(), opset: int = 18, domains=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    model = helper.make_model(graph, opset_imports=opsets)
    onnx.checker.check_model(model)
    return model


def _i64(name: str, values) -> TensorProto:
    return numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _vi(name: str, dtype: int, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, dtype, shape)


def _topk_model(k_init: int | None = 5, sorted_: int = 1) -> onnx.ModelProto:
    """x (2, 4096) -> TopK(K) named "topk"; K is an initializer, or a graph input when k_init is None."""
    inputs = [_vi("x", F, [2, 4096])]
    if k_init is None:
        inputs.append(_vi("k", I64, [1]))
    node = helper.make_node("TopK", ["x", "k"], ["v", "i"], name="topk", axis=-1, sorted=sorted_)
    inits = [] if k_init is None else [_i64("k", [k_init])]
    return _model([node], inputs, [_vi("v", F, [2, None]), _vi("i", I64, [2, None])], inits)


def _rules(violations: list[Violation]) -> list[tuple[str, str]]:
    return [(v.node, v.rule) for v in violations]


def test_supported_ops_sanity():
    assert {"MatMul", "Softmax", "TopK", "Gather", "ReduceMean", "If", "ScatterND"} <= SUPPORTED_OPS
    assert not {"StringNormalizer", "Unique", "SequenceAt", "BitShift", "MatMulInteger"} & SUPPORTED_OPS


def test_clean_graph_has_no_violations():
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"),
        helper.make_node("Softmax", ["h"], ["p"], name="softmax", axis=-1),
        helper.make_node("ReduceMean", ["p", "axes"], ["m"], name="mean", keepdims=0),
        helper.make_node("Constant", [], ["k"], name="k_const", value=_i64("kv", [5])),
        helper.make_node("TopK", ["m", "k5"], ["v", "idx"], name="topk", axis=-1, sorted=1),
        helper.make_node("TopK", ["m", "k"], ["v2", "idx2"], name="topk_const_node", axis=-1),
        helper.make_node("Gather", ["x", "idx"], ["g"], name="gather", axis=1),
        helper.make_node("Unsqueeze", ["g", "axes"], ["u"], name="unsqueeze"),
    ]
    inits = [numpy_helper.from_array(np.ones((8, 8), np.float32), "w"), _i64("axes", [1]), _i64("k5", [5])]
    model = _model(nodes, [_vi("x", F, [2, 8, 8])], [_vi("u", F, [2, 1, 5, 8]), _vi("v2", F, [2, 5])], inits)
    assert check_tensorrt_rules(model) == []
    assert_tensorrt_rules(model, "clean")  # does not raise


def test_topk_k_from_graph_input():
    violations = check_tensorrt_rules(_topk_model(k_init=None))
    assert _rules(violations) == [("topk", "topk-dynamic-k")]
    assert violations[0].op_type == "TopK" and "initializer" in violations[0].message


def test_topk_k_too_large():
    assert _rules(check_tensorrt_rules(_topk_model(k_init=3840))) == [("topk", "topk-k-too-large")]
    assert check_tensorrt_rules(_topk_model(k_init=3839)) == []


def test_topk_unsorted():
    assert _rules(check_tensorrt_rules(_topk_model(sorted_=0))) == [("topk", "topk-unsorted")]


def test_topk_k_computed_from_shape():
    nodes = [
        helper.make_node("Shape", ["x"], ["s"], name="shape", start=-1),
        helper.make_node("TopK", ["x", "s"], ["v", "i"], name="sort_as_topk", largest=0),
    ]
    model = _model(nodes, [_vi("x", F, ["B", 4])], [_vi("v", F, ["B", 4]), _vi("i", I64, ["B", 4])])
    assert _rules(check_tensorrt_rules(model)) == [("sort_as_topk", "topk-dynamic-k")]


@pytest.mark.parametrize(
    "node, domains",
    [
        (helper.make_node("StringNormalizer", ["s"], ["y"], name="normalize"), ()),
        (helper.make_node("Frobnicate", ["s"], ["y"], name="normalize", domain="com.example"), ("com.example",)),
    ],
)
def test_unsupported_op(node, domains):
    model = _model([node], [_vi("s", TensorProto.STRING, [3])], [_vi("y", TensorProto.STRING, [3])],
                   domains=domains)
    violations = check_tensorrt_rules(model)
    assert _rules(violations) == [("normalize", "unsupported-op")]


def test_model_local_function_body_is_checked():
    body = [helper.make_node("Unique", ["a"], ["b"], name="inner_unique")]
    fn = helper.make_function("com.example", "MyFn", ["a"], ["b"], body, [helper.make_opsetid("", 18)])
    call = helper.make_node("MyFn", ["x"], ["y"], name="call", domain="com.example")
    graph = helper.make_graph([call], "g", [_vi("x", F, [4])], [_vi("y", F, [None])])
    model = helper.make_model(graph, functions=[fn], opset_imports=[helper.make_opsetid("", 18),
                                                                    helper.make_opsetid("com.example", 1)])
    onnx.checker.check_model(model)
    violations = check_tensorrt_rules(model)
    assert [v.rule for v in violations] == ["unsupported-op"]
    assert "inner_unique" in violations[0].node and violations[0].op_type == "Unique"


def test_reduce_axes_from_graph_input():
    node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean")
    model = _model([node], [_vi("x", F, [2, 3]), _vi("axes", I64, [1])], [_vi("y", F, [None])], opset=18)
    assert _rules(check_tensorrt_rules(model)) == [("mean", "axes-not-constant")]


def test_scatternd_reduction():
    node = helper.make_node("ScatterND", ["x", "idx", "u"], ["y"], name="scatter", reduction="add")
    model = _model([node], [_vi("x", F, [4]), _vi("idx", I64, [2, 1]), _vi("u", F, [2])], [_vi("y", F, [4])])
    assert _rules(check_tensorrt_rules(model)) == [("scatter", "scatternd-reduction")]


def test_several_violations_all_reported_and_raised():
    nodes = [
        helper.make_node("TopK", ["x", "k"], ["v", "i"], name="bad_topk", sorted=0),
        helper.make_node("ReduceSum", ["v", "axes"], ["r"], name="bad_reduce"),
        helper.make_node("Squeeze", ["r", "axes"], ["s"], name="bad_squeeze"),
        helper.make_node("Custom", ["s"], ["y"], name="bad_custom", domain="com.example"),
        helper.make_node("Relu", ["x"], ["ok"], name="fine_relu"),
    ]
    inputs = [_vi("x", F, [2, 8]), _vi("k", I64, [1]), _vi("axes", I64, [1])]
    model = _model(nodes, inputs, [_vi("y", F, [None]), _vi("ok", F, [2, 8])], domains=("com.example",))
    assert sorted(_rules(check_tensorrt_rules(model))) == [
        ("bad_custom", "unsupported-op"), ("bad_reduce", "axes-not-constant"),
        ("bad_squeeze", "axes-not-constant"), ("bad_topk", "topk-dynamic-k"), ("bad_topk", "topk-unsorted"),
    ]
    with pytest.raises(TensorRTCompatError) as excinfo:
        assert_tensorrt_rules(model, "segment0")
    message = str(excinfo.value)
    assert "segment0" in message and "fine_relu" not in message
    for name in ("bad_topk", "bad_reduce", "bad_squeeze", "bad_custom"):
        assert name in message
    assert len(message.splitlines()) == 1 + 5  # header + one line per violation


def test_if_branches_with_different_ranks():
    then_g = helper.make_graph([helper.make_node("Identity", ["a"], ["t_out"], name="t_id")], "then", [],
                               [_vi("t_out", F, [4])])
    else_g = helper.make_graph([helper.make_node("Identity", ["b"], ["e_out"], name="e_id")], "else", [],
                               [_vi("e_out", F, [2, 2])])
    node = helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)
    model = _model([node], [_vi("cond", TensorProto.BOOL, []), _vi("a", F, [4]), _vi("b", F, [2, 2])],
                   [_vi("y", F, [None])])
    assert _rules(check_tensorrt_rules(model)) == [("branch", "if-branch-rank")]


def test_subgraph_nodes_are_checked():
    then_g = helper.make_graph([helper.make_node("TopK", ["a", "k"], ["t_v", "t_i"], name="inner_topk",
                                                 sorted=0)], "then", [], [_vi("t_v", F, [2])])
    else_g = helper.make_graph([helper.make_node("Identity", ["a"], ["e_out"], name="e_id")], "else", [],
                               [_vi("e_out", F, [4])])
    node = helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)
    model = _model([node], [_vi("cond", TensorProto.BOOL, []), _vi("a", F, [4])], [_vi("y", F, [None])],
                   [_i64("k", [2])])
    assert _rules(check_tensorrt_rules(model)) == [("branch/then_branch/inner_topk", "topk-unsorted")]


@pytest.mark.parametrize("k", [5, 3840])
def test_load_from_path_with_external_data(tmp_path, k):
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="matmul"),
        helper.make_node("TopK", ["h", "k"], ["v", "i"], name="topk", axis=-1),
    ]
    inits = [numpy_helper.from_array(np.ones((4096, 4096), np.float32), "w"), _i64("k", [k])]
    model = _model(nodes, [_vi("x", F, [2, 4096])], [_vi("v", F, [2, k]), _vi("i", I64, [2, k])], inits)
    path = tmp_path / "graph.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="graph.onnx.data", size_threshold=0)  # K too goes to the data file
    assert (tmp_path / "graph.onnx.data").stat().st_size > 4096 * 4096 * 4
    expected = [] if k < 3840 else [("topk", "topk-k-too-large")]
    assert _rules(check_tensorrt_rules(path)) == expected
    assert _rules(check_tensorrt_rules(str(path))) == expected


# --- a real dynamo export: topk(sorted=True) then an ascending sort, as STAR's keep_topk does ----------


class _TopkThenSort(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = torch.topk(x, 3, dim=-1, sorted=True).indices
        return torch.sort(top, dim=-1).values


class _TopkThenAscendingTopk(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top = torch.topk(x, 3, dim=-1, sorted=True).indices
        return torch.topk(top, 3, dim=-1, largest=False, sorted=True).values


def _export(module: torch.nn.Module, dynamic_batch: bool) -> onnx.ModelProto:
    shapes = {"x": {0: torch.export.Dim("B", min=1, max=16)}} if dynamic_batch else None
    program = torch.onnx.export(module.eval(), (torch.randn(2, 8),), dynamo=True, opset_version=18,
                                dynamic_shapes=shapes, verbose=False)
    model = program.model_proto
    onnx.checker.check_model(model)
    return model


def test_dynamo_export_topk_then_sort_static_shapes_passes():
    model = _export(_TopkThenSort(), dynamic_batch=False)
    assert [n.op_type for n in model.graph.node].count("TopK") == 2
    assert check_tensorrt_rules(model) == []


def test_dynamo_export_ascending_topk_with_dynamic_batch_passes():
    model = _export(_TopkThenAscendingTopk(), dynamic_batch=True)
    assert check_tensorrt_rules(model) == []


def test_dynamo_export_sort_with_dynamic_batch_computes_k():
    """Finding: with a dynamic batch dim, torch.sort over a *static* last dim exports as
    TopK(largest=0) whose K is Reshape(Gather(Shape(x), -1)): computed, not an initializer.
    Shape folding (onnx-graphsurgeon fold_constants) turns it back into a constant."""
    model = _export(_TopkThenSort(), dynamic_batch=True)
    violations = check_tensorrt_rules(model)
    assert all(v.rule == "topk-dynamic-k" and v.op_type == "TopK" for v in violations)
    gs = pytest.importorskip("onnx_graphsurgeon")
    graph = gs.import_onnx(model)
    graph.fold_constants().cleanup()
    assert check_tensorrt_rules(gs.export_onnx(graph)) == []
