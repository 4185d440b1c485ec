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

from ..manifest import DECODE_GRAPHS  # segment graph -> its decode graph

WEIGHT_OPS = ("MatMul", "MatMulNBits")


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
        names = dict(
            zip(
                ("q", "k", "v", "cos", "sin", "bias", "past_key", "past_value"),
                (q, k, v, cos, sin, bias, past_k, past_v),
            )
        )
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
    block = Extractor(model).extract_model(list(names.values()) + graph_inputs, outputs)
    return block, names, absolute, inv_freq


def max_positions(manifest: dict) -> int:
    """Rows of GQA's cos/sin caches an engine needs: every position a request may reach."""
    return manifest["limits"]["max_input_len"] + manifest["limits"]["max_new_tokens"] + 1


def rope_caches(inv_freq: np.ndarray, max_pos: int) -> tuple[np.ndarray, np.ndarray]:
    """GQA's `cos_cache`, `sin_cache` (max_pos, head_dim / 2) float32, angles in float64."""
    angles = np.arange(max_pos)[:, None] * inv_freq[None].astype(np.float64)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rewrite_segment(path: Path, out: Path, manifest: dict, layers: str = "all") -> list[int]:
    """Write segment graph `path` with GQA in place of its attention blocks as `out` (whose weights stay in the files
    `path`'s refer to: `out` must lie in the same directory, or beside copies of them). `layers`: "all" (a decode
    graph: the stage-2 scores dropped too), or "not-pivot" (the pivot's attention probabilities kept for the scores).
    Returns the absolute layer indices rewritten."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = manifest["model"]
    pivot = manifest["schedule"]["pivot_layer"]
    proto = onnx.load(str(path), load_external_data=False)
    graph = proto.graph
    blocks, inv_freq = attention_blocks(graph, path)  # all of them, before the graph changes
    if not blocks:
        raise DecodeGraphError(f"{path.name}: no decoder layers")
    done = []
    for names, absolute, output in blocks:
        if absolute == pivot and layers != "all":
            continue
        index, node = next((i, n) for i, n in enumerate(graph.node) if output in n.output)
        graph.node.remove(node)
        graph.node.insert(
            index,
            helper.make_node(
                "GroupQueryAttention",
                [
                    names["q"],
                    names["k"],
                    names["v"],
                    names["past_key"],
                    names["past_value"],
                    "gqa_seqlens_k",
                    "gqa_total",
                    "gqa_cos_cache",
                    "gqa_sin_cache",
                    "position_ids",
                    "gqa_bias",
                ],
                [output, f"present.{absolute}.key", f"present.{absolute}.value"],
                domain="com.microsoft",
                name=f"gqa_{absolute}",
                num_heads=model["num_attention_heads"],
                kv_num_heads=model["num_key_value_heads"],
                do_rotary=1,
            ),
        )
        for o in [
            o for o in graph.output if o.name in (f"new_key_values.{absolute}.key", f"new_key_values.{absolute}.value")
        ]:
            graph.output.remove(o)
        graph.output.extend(
            helper.make_tensor_value_info(f"present.{absolute}.{kv}", TensorProto.FLOAT, None)
            for kv in ("key", "value")
        )
        done.append(absolute)
    if layers == "all":
        for o in [o for o in graph.output if o.name.startswith("stage2")]:
            graph.output.remove(o)
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
    `manifest`): GQA in every layer, then ORT's fusions; the weights stay in the segments' data files. Returns, per
    decode graph, its file, the layers rewritten and the ops the fusions introduced. Raises DecodeGraphError where a
    segment's attention blocks are not found (the caller then leaves the engine without decode graphs)."""
    written = {}
    for segment, name in DECODE_GRAPHS.items():
        source = directory / manifest["graphs"][segment]["file"]
        unfused, target = directory / f"{name}.unfused.onnx", directory / f"{name}.onnx"
        try:
            layers = rewrite_segment(source, unfused, manifest)
            fusions = ort_fusions(unfused, target, external_data=None)
        except BaseException:  # both or none: a decode graph already written goes too
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
            "provider": "CPUExecutionProvider",
            "gqa_layers": layers,
            "fusions": fusions,
        }
    return written
