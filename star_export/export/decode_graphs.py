"""ONNX Runtime decode graphs: each decoder segment rewritten for one-token steps around `GroupQueryAttention`.

Why (docs/performance.md): an int4 / int8 engine's decode step is bound by its weight reads, and what the exported
attention adds on top is a read of every cache slot (free ones included) and a dozen small kernels per layer. A copy of
each segment whose attention blocks are ONNX Runtime's `com.microsoft.GroupQueryAttention` (RoPE inside, the cache
buffer shared as past and present, only the filled slots read), then fused by onnxscript's `optimize_for_ort`, decoded
full-size int4 steps 1.04-1.14x faster than the segment graphs (docs/performance.md).

These graphs are an ONNX Runtime (CPU provider) path beside the portable one: the segment graphs stay as they are (the
prefill and every other provider run them), and the decode graphs read the same weight files (no second copy on disk).

- The block of each layer is found by the graph's structure around its cache inputs (`attention_blocks`, every layer on
  one loaded graph; the exporter's intermediate names are not stable): q: the projection behind the query that
  multiplies the past key; k, v: the projections behind `new_key_values.{i}.*`; the block ends at the input of o_proj.
- GQA replaces the block: inputs the projections, `past_key_values.{i}.*` (the buffer, also bound as `present.{i}.*`:
  the new key and value are written at slot `gqa_seqlens_k`), `position_ids` (RoPE from `gqa_cos_cache` /
  `gqa_sin_cache`, built from the graph's `inv_freq` in float64), `gqa_bias` (the filled slots' mask: left padding).
- Segment 0's stage-2 scores are dropped (only a prefill reads them), as are the `new_key_values.*` outputs.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np

from ..manifest import DECODE_GRAPHS, PREFILL_GRAPHS  # segment graph -> its decode / prefill graph

WEIGHT_OPS = ("MatMul", "MatMulNBits")
BLOCK_INPUTS = ("q", "k", "v", "cos", "sin", "bias", "past_key", "past_value")  # a block's inputs (attention_blocks)


class DecodeGraphError(ValueError):
    """A segment graph whose attention blocks are not where this release's exporter puts them."""


def attention_blocks(graph, path: Path) -> tuple[list[tuple[dict[str, str], int, str]], np.ndarray | None]:
    """Every decoder layer's attention block in segment graph `graph` (an `onnx.GraphProto`, read from `path`), found by
    structure on the one graph: per layer (in the order of the past inputs), the names of its q, k, v, cos, sin, bias,
    past key and value inputs, its absolute index and its output; and RoPE's inv_freq (None without layers).
      q: the projection behind the query that multiplies the transposed past key; k, v: the projections behind
      `new_key_values.{i}.*`; the block's output: the first tensor after the past value's matmul that a weight matmul
      reads (o_proj); bias: the Add input before the layer's Softmax that does not come from the scores."""
    import onnx

    weights = {t.name for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def is_weight(name):  # an initializer, or one the exporter left behind a Transpose (it folds only small ones)
        node = producers.get(name)
        return name in weights or (node is not None and node.op_type == "Transpose" and node.input[0] in weights)

    def is_weight_matmul(node):
        return node.op_type in WEIGHT_OPS and is_weight(node.input[1])

    def projection(tensor):  # the nearest weight matmul upstream of `tensor`, breadth first
        queue, seen = [tensor], set()
        while queue:
            name = queue.pop(0)
            node = producers.get(name)
            if node is None or node.name in seen:
                continue
            seen.add(node.name)
            if is_weight_matmul(node):
                return node.output[0]
            queue.extend(node.input)
        raise DecodeGraphError(
            f"{path.name}: no weight matmul upstream of {tensor}: not a segment graph of this release"
        )

    def downstream(tensor, found):  # breadth first from `tensor` to the first (node, input) with found(node, input)
        queue, seen = [tensor], set()
        while queue:
            name = queue.pop(0)
            for node in consumers.get(name, []):
                if found(node, name):
                    return node, name
                if node.name not in seen:
                    seen.add(node.name)
                    queue.extend(node.output)
        raise DecodeGraphError(
            f"{path.name}: nothing found downstream of {tensor}: not a segment graph of this release"
        )

    def first(op_type):
        node = next((n for n in graph.node if n.op_type == op_type), None)
        if node is None:
            raise DecodeGraphError(f"{path.name}: no {op_type} node (RoPE): not a segment graph of this release")
        return node.output[0]

    pasts = [i.name for i in graph.input if i.name.startswith("past_key_values.")]
    if not pasts:  # no decoder layer: nothing to find (the caller says so), and no RoPE to look for
        return [], None
    inv_freq = next((onnx.numpy_helper.to_array(t) for t in graph.initializer if t.name.endswith("inv_freq")), None)
    if inv_freq is None:
        raise DecodeGraphError(f"{path.name}: no inv_freq initializer (RoPE): not a segment graph of this release")
    cos, sin = first("Cos"), first("Sin")
    blocks = []
    for layer in range(len(pasts) // 2):
        absolute = int(pasts[2 * layer].split(".")[1])
        past_k, past_v = f"past_key_values.{absolute}.key", f"past_key_values.{absolute}.value"
        scores, _ = downstream(past_k, lambda node, _: node.op_type in ("MatMul", "FusedMatMul"))
        transposed = producers.get(scores.input[1])
        q_rope = (
            scores.input[0]
            if transposed is not None and past_k in transposed.input or scores.input[1] == past_k
            else scores.input[1]
        )
        q = projection(q_rope)
        k, v = projection(f"new_key_values.{absolute}.key"), projection(f"new_key_values.{absolute}.value")
        value_mm, _ = downstream(past_v, lambda node, _: node.op_type == "MatMul")
        _, out = downstream(value_mm.output[0], lambda node, name: is_weight_matmul(node) and node.input[0] == name)
        softmax, _ = downstream(scores.output[0], lambda node, _: node.op_type == "Softmax")
        add = producers[softmax.input[0]]
        bias = next((i for i in add.input if producers.get(i) is not None and producers[i].op_type != "Mul"), None)
        if bias is None:
            raise DecodeGraphError(
                f"{path.name}: no attention mask before layer {absolute}'s Softmax: not a segment graph of this release"
            )
        names = dict(zip(BLOCK_INPUTS, (q, k, v, cos, sin, bias, past_k, past_v))) | {"q_rope": q_rope}
        blocks.append((names, absolute, out))
    return blocks, inv_freq


def attention_block(path: Path, layer: int):
    """(the extracted block as an ONNX model, the names of its q, k, v, cos, sin, bias, past key and value inputs, the
    layer's absolute index, RoPE's inv_freq) for the `layer`-th layer of segment graph `path` (`attention_blocks`): what
    tests/test_decode_graphs.py checks on its own."""
    import onnx
    from onnx.utils import Extractor

    model = onnx.load(str(path), load_external_data=False)
    blocks, inv_freq = attention_blocks(model.graph, path)
    if layer >= len(blocks):
        raise DecodeGraphError(f"{path.name}: has {len(blocks)} layers, asked for layer {layer}")
    names, absolute, out = blocks[layer]
    graph_inputs = [i.name for i in model.graph.input if i.name not in (names["past_key"], names["past_value"])]
    outputs = [out, f"new_key_values.{absolute}.key", f"new_key_values.{absolute}.value"]
    block = Extractor(model).extract_model([names[k] for k in BLOCK_INPUTS] + graph_inputs, outputs)
    return block, names, absolute, inv_freq


def max_positions(manifest: dict) -> int:
    """Rows of GQA's cos/sin caches an engine needs: every position a request may reach."""
    return manifest["limits"]["max_input_len"] + manifest["limits"]["max_new_tokens"] + 1


def rope_caches(inv_freq: np.ndarray, max_pos: int) -> tuple[np.ndarray, np.ndarray]:
    """GQA's `cos_cache`, `sin_cache` (max_pos, head_dim / 2) float32, angles in float64."""
    angles = np.arange(max_pos)[:, None] * inv_freq[None].astype(np.float64)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def _prefill_lengths(graph, helper, names: dict[str, str]) -> None:
    """Nodes computing GQA's `gqa_seqlens_k` (B,) and `gqa_total` () in a prefill graph from the shapes of the call:
    every row spans the whole `past + q` (a row's padding is masked by the bias the segment graph computes)."""
    nodes = list(graph.node)
    at = next(i for i, node in enumerate(nodes) if names["q"] in node.output) + 1
    nodes[at:at] = [
        helper.make_node("Shape", [names["q"]], ["gqa_q_shape"]),
        helper.make_node("Shape", [names["past_key"]], ["gqa_past_shape"]),
        helper.make_node("Gather", ["gqa_q_shape", "gqa_i1"], ["gqa_q_len"], axis=0),
        helper.make_node("Gather", ["gqa_past_shape", "gqa_i2"], ["gqa_past_len"], axis=0),
        helper.make_node("Add", ["gqa_q_len", "gqa_past_len"], ["gqa_total64"]),
        helper.make_node("Cast", ["gqa_total64"], ["gqa_total"], to=6),  # int32
        helper.make_node("Sub", ["gqa_total64", "gqa_one"], ["gqa_last64"]),
        helper.make_node("Slice", ["gqa_q_shape", "gqa_i0_1", "gqa_i1_1"], ["gqa_batch"]),
        helper.make_node("Expand", ["gqa_last64", "gqa_batch"], ["gqa_last_rows"]),
        helper.make_node("Cast", ["gqa_last_rows"], ["gqa_seqlens_k"], to=6),
        helper.make_node("Slice", ["gqa_past_shape", "gqa_i2_1", "gqa_i3_1"], ["gqa_past_len_1d"]),
    ]
    del graph.node[:]
    graph.node.extend(nodes)


def _packed(names: dict[str, str], layer: int, heads: int, helper) -> tuple[str, list]:
    """The layer's rotated query as GQA reads it, (B, q, heads * head_dim): the grouped query the scores multiply,
    (B, kv_heads, groups * q, head_dim) in head order, reshaped to (B, heads, q, head_dim) and transposed; with the
    nodes that make it."""
    per_head = f"gqa_{layer}_q_heads"
    nodes = [
        helper.make_node("Constant", [], [f"{per_head}_shape"], value_ints=[0, heads, -1, 0]),
        helper.make_node("Reshape", [names["q_rope"], f"{per_head}_shape"], [per_head]),
    ]
    out, packing = _pack(per_head, f"gqa_{layer}_q_packed", helper)
    return out, nodes + packing


def _pack(tensor: str, out: str, helper) -> tuple[str, list]:
    """(B, heads, q, head_dim) -> (B, q, heads * head_dim), with the nodes that make it."""
    return out, [
        helper.make_node("Transpose", [tensor], [f"{out}_t"], perm=[0, 2, 1, 3]),
        helper.make_node("Constant", [], [f"{out}_shape"], value_ints=[0, 0, -1]),
        helper.make_node("Reshape", [f"{out}_t", f"{out}_shape"], [out]),
    ]


def _prefill_constants(numpy_helper) -> list:
    return [
        numpy_helper.from_array(np.array(v, np.int64), name)
        for name, v in (
            ("gqa_i0_1", [0]),
            ("gqa_i1_1", [1]),
            ("gqa_i2_1", [2]),
            ("gqa_i3_1", [3]),
            ("gqa_end", [np.iinfo(np.int64).max]),
            ("gqa_i1", 1),
            ("gqa_i2", 2),
            ("gqa_one", 1),
        )
    ]


def rewrite_segment(path: Path, out: Path, manifest: dict, layers: str = "all", io: str = "decode") -> list[int]:
    """Write segment graph `path` with GQA in place of its attention blocks as `out` (whose weights stay in the files
    `path`'s refer to: `out` must lie in the same directory, or beside copies of them). `layers`: "all" (a decode
    graph: the stage-2 scores dropped too), or "not-pivot" (the pivot's attention probabilities kept for the scores).
    `io`: "decode" (the caches bound as past and present, `gqa_*` fed by runtime/decode.py), or "segment" (a prefill
    graph with the segment's inputs and outputs: past caches empty, each layer's present is its `new_key_values`, GQA's
    lengths and mask computed in the graph). Returns the absolute layer indices rewritten."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = manifest["model"]
    pivot = manifest["schedule"]["pivot_layer"]
    proto = onnx.load(str(path), load_external_data=False)
    graph = proto.graph
    blocks, inv_freq = attention_blocks(graph, path)  # all of them, before the graph changes
    if not blocks:
        raise DecodeGraphError(f"{path.name}: no decoder layers")
    done, segment_io = [], io == "segment"
    if segment_io:
        _prefill_lengths(graph, helper, blocks[0][0])
    for names, absolute, output in blocks:
        if absolute == pivot and layers != "all":
            continue
        present = [f"present.{absolute}.{kv}" for kv in ("key", "value")]
        new = [f"new_key_values.{absolute}.{kv}" for kv in ("key", "value")]
        if segment_io:  # GQA produces the layer's new keys and values now: the old block's copies become dead
            for node in graph.node:
                for slots in (node.input, node.output):
                    for j, name in enumerate(slots):
                        if name in new:
                            slots[j] = f"{name}.replaced"
        index, node = next((i, n) for i, n in enumerate(graph.node) if output in n.output)
        graph.node.remove(node)
        if segment_io:  # RoPE as the segment graph applies it (GQA's own ignores position_ids in a prompt, ORT 1.32)
            q, packing = _packed(names, absolute, model["num_attention_heads"], helper)
            k, key_packing = _pack(f"new_key_values.{absolute}.key.replaced", f"gqa_{absolute}_k_packed", helper)
            for extra in packing + key_packing:
                graph.node.insert(index, extra)
                index += 1
            inputs = [q, k, names["v"], names["past_key"], names["past_value"], "gqa_seqlens_k", "gqa_total"]
            inputs += ["", "", "", names["bias"]]
        else:
            inputs = [names["q"], names["k"], names["v"], names["past_key"], names["past_value"], "gqa_seqlens_k"]
            inputs += ["gqa_total", "gqa_cos_cache", "gqa_sin_cache", "position_ids", "gqa_bias"]
        graph.node.insert(
            index,
            helper.make_node(
                "GroupQueryAttention",
                inputs,
                [output, *present],
                domain="com.microsoft",
                name=f"gqa_{absolute}",
                num_heads=model["num_attention_heads"],
                kv_num_heads=model["num_key_value_heads"],
                do_rotary=0 if segment_io else 1,
            ),
        )
        if segment_io:  # this call's keys and values: present = [past | new], the slots past the past's
            for at, (whole, part) in enumerate(zip(present, new), start=index + 1):
                graph.node.insert(
                    at, helper.make_node("Slice", [whole, "gqa_past_len_1d", "gqa_end", "gqa_i2_1"], [part])
                )
        else:
            for o in [
                o
                for o in graph.output
                if o.name in (f"new_key_values.{absolute}.key", f"new_key_values.{absolute}.value")
            ]:
                graph.output.remove(o)
            graph.output.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in present)
        done.append(absolute)
    if layers == "all" and not segment_io:
        for o in [o for o in graph.output if o.name.startswith("stage2")]:
            graph.output.remove(o)
    if segment_io:
        graph.initializer.extend(_prefill_constants(numpy_helper))
    else:  # GQA applies RoPE itself from these tables
        cos_cache, sin_cache = rope_caches(inv_freq, max_positions(manifest))
        graph.initializer.extend(
            [numpy_helper.from_array(cos_cache, "gqa_cos_cache"), numpy_helper.from_array(sin_cache, "gqa_sin_cache")]
        )
        graph.input.extend(
            [
                helper.make_tensor_value_info("gqa_seqlens_k", TensorProto.INT32, ["batch"]),
                helper.make_tensor_value_info("gqa_total", TensorProto.INT32, []),
                helper.make_tensor_value_info("gqa_bias", TensorProto.FLOAT, ["batch", 1, "q", "total"]),
            ]
        )
    needed, live = {o.name for o in graph.output}, []
    for node in reversed(list(graph.node)):  # dead nodes: the replaced blocks
        if any(o in needed for o in node.output):
            live.append(node)
            needed.update(node.input)
    del graph.node[:]
    graph.node.extend(reversed(live))
    used = needed | {o.name for o in graph.output}
    for unused in [i for i in graph.input if i.name not in used]:  # e.g. suffix_rows: read by the stage-2 scores only
        graph.input.remove(unused)
    if not any(o.domain == "com.microsoft" for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(proto, str(out))
    return done


def ort_fusions(source: Path, target: Path, external_data: str | None = "") -> dict[str, int]:
    """Write graph `source` through onnxscript's `optimize_for_ort` as `target`; returns the ops it introduced,
    counted in the graph written (its own counts include rules a later stage undid: it reported "rotary_embedding: 4"
    for a graph with no RotaryEmbedding node, onnxscript 0.7.2). `external_data`: the file for the weights ("":
    `{target}.data`); None keeps the weights in the files `source` refers to (`target` beside `source`)."""
    import logging

    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.load(str(source))
    before = {node.op_type for node in model.graph}
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:  # their INFO lines (hundreds per graph, with stacks) are not warnings, even under --verbose
        logger.setLevel(max(logger.getEffectiveLevel(), logging.WARNING))
    try:
        model, _ = optimize_for_ort(model)
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    ir.save(model, str(target), external_data=f"{target.name}.data" if external_data == "" else external_data)
    return dict(Counter(node.op_type for node in model.graph if node.op_type not in before))


def write_decode_graphs(directory: Path, manifest: dict) -> dict[str, dict]:
    """`decode0.onnx`, `decode1.onnx` beside the segment graphs of the engine in `directory` (whose manifest body is
    `manifest`): GQA in every layer, then ORT's fusions; and `prefill0.onnx`, `prefill1.onnx`: each segment with the
    same inputs and outputs, GQA in every layer but the pivot (whose probabilities the stage-2 scores read), fused
    likewise. The weights stay in the segments' data files. Returns, per graph, its file, its role, the layers rewritten
    and the ops the fusions introduced. Raises DecodeGraphError where a segment's attention blocks are not found (the
    caller then leaves the engine without these graphs)."""
    written = {}
    jobs = [(segment, name, "decode", "all", "decode") for segment, name in DECODE_GRAPHS.items()]
    jobs += [(segment, name, "prefill", "not-pivot", "segment") for segment, name in PREFILL_GRAPHS.items()]
    for segment, name, role, layers, io in jobs:
        source = directory / manifest["graphs"][segment]["file"]
        unfused, target = directory / f"{name}.unfused.onnx", directory / f"{name}.onnx"
        try:
            rewritten = rewrite_segment(source, unfused, manifest, layers=layers, io=io)
            fusions = ort_fusions(unfused, target, external_data=None)
        except BaseException:  # all or none: a graph already written goes too
            for done in [target, *(directory / entry["file"] for entry in written.values())]:
                done.unlink(missing_ok=True)
            raise
        finally:
            unfused.unlink(missing_ok=True)
        # ONNX Runtime's contrib ops (GroupQueryAttention, the fused norms): neither TensorRT's parser nor another
        # runtime reads these graphs; the segment graphs stay the portable path
        written[name] = {
            "file": target.name,
            "segment": segment,
            "role": role,
            "provider": "CPUExecutionProvider",
            "gqa_layers": rewritten,
            "fusions": fusions,
        }
    return written
