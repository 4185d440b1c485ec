#!/usr/bin/env python
"""One decoder layer's decode-step attention as the engine runs it, against ONNX Runtime's `GroupQueryAttention`.

A measurement for choosing the next step of issue 13 (an ORT-specific decode graph, which star-export now writes). From a
segment graph of an engine it cuts out one layer's attention block (found by `decode_graphs.attention_block`: this call's
q/k/v projections in; RoPE, the two-part score and value matmuls over `[cache | new]`, softmax; out: the input of
o_proj and the new key/value) with
`onnx.utils.Extractor`, and builds one `com.microsoft.GroupQueryAttention` node that computes the same from the same
q/k/v: RoPE inside (cos/sin cache from the graph's `inv_freq`, at the token's position id), the cache buffer shared as
past and present (the new key/value written in place at slot `length`), only the `length` filled slots read, the mask
as `attention_bias`. For each cache length: the two outputs' difference, against what float32 rounding allows two
implementations of the same attention (`rounding_bound`): a check that both compute the same; then
the two timed alternately, each over enough distinct cache buffers (400 MB by default) that none is cache-resident, as a decode
step finds them. The block reads the whole buffer, `length + 32` slots (half of `kvcache.GROWTH` free, on average).

    python scripts/attention_ab.py --engine ENGINE [--segment segment1] [--lengths 556,124] [--rounds 15] [--cache-mb 400] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from bench import emit, summary
from star_export.export.decode_graphs import attention_block, max_positions, rope_caches


CACHE_TYPES = {"float32": "FLOAT", "float16": "FLOAT16", "int8": "INT8"}


def gqa_model(heads: int, kv_heads: int, head_dim: int, capacity: int, max_pos: int, cache: str = "float32") -> bytes:
    """One decode step's `GroupQueryAttention` (float32 activations) over a cache of `cache` type: int8 is ONNX
    Runtime's quantized cache (`kv_cache_bit_width` 8, one float32 scale per tensor: `k_scale`, `v_scale` inputs)."""
    from onnx import TensorProto as T
    from onnx import helper

    cache_type = getattr(T, CACHE_TYPES[cache])
    inputs = [("query", T.FLOAT, [1, 1, heads * head_dim]), ("key", T.FLOAT, [1, 1, kv_heads * head_dim]), ("value", T.FLOAT, [1, 1, kv_heads * head_dim]),
              ("past_key", cache_type, [1, kv_heads, capacity, head_dim]), ("past_value", cache_type, [1, kv_heads, capacity, head_dim]),
              ("seqlens_k", T.INT32, [1]), ("total_sequence_length", T.INT32, []),
              ("cos_cache", T.FLOAT, [max_pos, head_dim // 2]), ("sin_cache", T.FLOAT, [max_pos, head_dim // 2]),
              ("position_ids", T.INT64, [1, 1]), ("attention_bias", T.FLOAT, [1, 1, 1, "total"])]
    names, attributes = [n for n, _, _ in inputs], {}
    if cache == "int8":
        inputs += [("k_scale", T.FLOAT, [1]), ("v_scale", T.FLOAT, [1])]
        names += ["", "k_scale", "v_scale"]  # no head_sink
        attributes = {"kv_cache_bit_width": 8, "k_quant_type": "PER_TENSOR", "v_quant_type": "PER_TENSOR"}
    node = helper.make_node("GroupQueryAttention", names, ["output", "present_key", "present_value"], domain="com.microsoft",
                            num_heads=heads, kv_num_heads=kv_heads, do_rotary=1, **attributes)
    outputs = [helper.make_tensor_value_info("output", T.FLOAT, None)] + [helper.make_tensor_value_info(n, cache_type, None) for n in node.output[1:]]
    graph = helper.make_graph([node], "gqa", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs], outputs)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=10).SerializeToString()


def rounding_bound(q_norm: float, k_norm: float, v_max: float, head_dim: int, length: int, u_low: float = 0.0) -> float:
    """What two float32 evaluations of the same attention over `length` + 1 slots may differ by, to first order in the
    unit roundoff u: each score q.k / sqrt(d) within (d + 4) u |q| |k| / sqrt(d) (a d-term dot product after RoPE,
    which keeps norms), each probability within 2 that + (2 n + 3) u relatively (exp, the n-term sum, the division),
    so the output within that times max |v|; twice, for two implementations. `u_low`: the unit roundoff of a lower
    precision that a kernel may round q, k, the probabilities and v to (ONNX Runtime's CPU kernel over a float16 cache
    differs from float32 arithmetic by more than float32 rounding): each score then moves by
    `(2 u_low + (d + 4) u) |q| |k| / sqrt(d)`, each probability by `2 u_low` more, each value by `u_low`."""
    u = float(np.finfo(np.float32).eps) / 2
    score_error = (2 * u_low + (head_dim + 4) * u) * q_norm * k_norm / np.sqrt(head_dim)
    return 2 * (2 * score_error + (2 * (length + 1) + 3) * u + 3 * u_low) * v_max


def compare(block_session, names: dict, manifest: dict, inv_freq: np.ndarray, length: int, rounds: int, cache_mb: float = 400, seed: int = 0) -> dict:
    import onnxruntime as ort

    from star_export.runtime.sessions import session_options

    model = manifest["model"]
    heads, kv_heads, head_dim = model["num_attention_heads"], model["num_key_value_heads"], model["head_dim"]
    capacity = length + 32
    max_pos = max_positions(manifest)
    gqa = ort.InferenceSession(gqa_model(heads, kv_heads, head_dim, capacity, max_pos), session_options(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    copies = max(4, int(cache_mb * 1e6 // (2 * kv_heads * capacity * head_dim * 4)))
    keys = [rng.standard_normal((1, kv_heads, capacity, head_dim), dtype=np.float32) for _ in range(copies)]
    values = [rng.standard_normal((1, kv_heads, capacity, head_dim), dtype=np.float32) for _ in range(copies)]

    def clear():  # the free slots are zeros, as in kvcache.KVCache
        for a in keys + values:
            a[:, :, length:] = 0

    clear()
    q = rng.standard_normal((1, 1, heads * head_dim), dtype=np.float32)
    k, v = (rng.standard_normal((1, 1, kv_heads * head_dim), dtype=np.float32) for _ in range(2))
    position = length + 70  # a pruned segment's positions run ahead of its slots
    cos_cache, sin_cache = rope_caches(inv_freq, max_pos)
    cos = np.concatenate([cos_cache[position]] * 2)[None, None]
    sin = np.concatenate([sin_cache[position]] * 2)[None, None]
    mask = np.concatenate([np.ones(length), np.zeros(capacity - length), np.ones(1)])
    bias = np.where(mask > 0, 0.0, np.finfo(np.float32).min).astype(np.float32)[None, None, None]
    fixed = {names["q"]: q, names["k"]: k, names["v"]: v, names["cos"]: cos, names["sin"]: sin, names["bias"]: bias}
    graph_inputs = {i.name: i for i in block_session.get_inputs()}

    def block_feed(i):
        feed = {}
        for name, info in graph_inputs.items():
            if name in fixed:
                feed[name] = fixed[name]
            elif name == names["past_key"]:
                feed[name] = keys[i]
            elif name == names["past_value"] or name.startswith("past_key_values."):
                feed[name] = values[i]
            elif name == "attention_mask":
                feed[name] = mask[None].astype(np.int64)
            elif name == "position_ids":
                feed[name] = np.array([[position]], np.int64)
            elif info.type == "tensor(int64)":  # segment 0's suffix rows: not read by the block
                feed[name] = np.zeros((1, 1), np.int64)
            else:  # the hidden input: only its shape is read
                feed[name] = np.zeros((1, 1, model["hidden_size"]), np.float32)
        return feed

    def run_block(i):
        return block_session.run(None, block_feed(i))[0]

    def run_gqa(i):
        binding = gqa.io_binding()
        for name, value in (("query", q), ("key", k), ("value", v), ("past_key", keys[i]), ("past_value", values[i]),
                            ("seqlens_k", np.array([length], np.int32)), ("total_sequence_length", np.array(length + 1, np.int32)),
                            ("cos_cache", cos_cache), ("sin_cache", sin_cache), ("position_ids", np.array([[position]], np.int64)),
                            ("attention_bias", np.zeros((1, 1, 1, length + 1), np.float32))):
            binding.bind_cpu_input(name, value)
        binding.bind_output("output")
        for name, buffer in (("present_key", keys[i]), ("present_value", values[i])):  # the same buffer: written in place
            binding.bind_output(name, "cpu", 0, np.float32, buffer.shape, buffer.ctypes.data)
        gqa.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    q_norm = float(np.linalg.norm(q.reshape(heads, head_dim), axis=-1).max())
    k_norm = max(float(np.linalg.norm(keys[0][:, :, :length], axis=-1).max()), float(np.linalg.norm(k.reshape(kv_heads, head_dim), axis=-1).max()))
    v_max = max(float(np.abs(values[0][:, :, :length]).max()), float(np.abs(v).max()))
    bound = rounding_bound(q_norm, k_norm, v_max, head_dim, length)
    reference = run_block(0).reshape(-1)
    difference = float(np.abs(reference - run_gqa(0).reshape(-1)).max())
    clear()
    block_ms, gqa_ms = [], []
    for _ in range(rounds):
        for runs, run in ((block_ms, run_block), (gqa_ms, run_gqa)):
            t = time.perf_counter()
            for i in range(copies):
                run(i)
            runs.append((time.perf_counter() - t) / copies * 1e3)
        clear()
    ratios = [a / b for a, b in zip(block_ms, gqa_ms)]

    return {"length": length, "capacity": capacity, "max_abs_difference": difference, "rounding_bound": bound, "max_abs_output": float(np.abs(reference).max()),
            "block_ms": summary(block_ms), "gqa_ms": summary(gqa_ms), "block_over_gqa": summary(ratios),
            "kv_bytes_read": {"block": 2 * kv_heads * capacity * head_dim * 4, "gqa": 2 * kv_heads * (length + 1) * head_dim * 4}}


def main(argv=None) -> int:
    import onnxruntime as ort

    from star_export.runtime.sessions import session_options

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", required=True, help="an engine directory (float32 activations)")
    p.add_argument("--segment", default="segment1", choices=["segment0", "segment1"])
    p.add_argument("--layer", type=int, default=0, help="the layer within the segment")
    p.add_argument("--lengths", default="556,124", help="filled cache slots to time (default: segment 0 and 1 of decode_split's prompt after 20 steps)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--cache-mb", type=float, default=400, help="MB of distinct cache buffers cycled through (above the CPU's caches)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    engine = Path(a.engine)
    manifest = json.loads((engine / "star.json").read_text())
    block, names, absolute, inv_freq = attention_block(engine / manifest["graphs"][a.segment]["file"], a.layer)
    session = ort.InferenceSession(block.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    result = {"engine": str(engine), "segment": a.segment, "layer": absolute, "block_nodes": len(block.graph.node),
              "block_ops": sorted({n.op_type for n in block.graph.node}), "ort": ort.__version__,
              "runs": [compare(session, names, manifest, inv_freq, int(n), a.rounds, a.cache_mb) for n in a.lengths.split(",")]}
    return emit(result, a.json)


if __name__ == "__main__":
    sys.exit(main())
