#!/usr/bin/env python
"""One decode step's attention in ONNX Runtime's `GroupQueryAttention` over a float32, float16 or int8 KV cache.

A measurement for the next step of issue 13, not a path of the product: the KV-cache reads are ~11 % of the weight
reads in a decode step at keep 58 (`decode_split.py`, `kv_reads_over_floor`), and the engine's cache is float32. This
times the same attention (GQA as in `attention_ab.gqa_model`: RoPE inside, the cache buffer written in place, only the
filled slots read) with the cache held in each type, alternately, each over enough distinct buffers (400 MB of float32
by default) that none is cache-resident, as a decode step finds them.

The data are N(0, 1) keys and values (random weights give nothing better; a real model's outliers would make a per-tensor
int8 scale coarser, so how much accuracy an int8 cache costs is not measured here). int8 is symmetric with one scale per
tensor, `amax / 127` over the cache and the new (rotated) token. Checks, per type: the output equals a float64 attention over what
the kernel holds after the step (its buffers' filled slots, dequantized, the new token included) within
attention_ab's float32 rounding bound (for float16, widened by float16 roundings of the operands: `rounding_bound`),
which a wrong scale convention or slot would exceed; the new token was written
within half a quantization step (int8: scale / 2; float16: 2^-11 relative) of its rotated key / value. Also reported:
each output's difference from the float32 cache's (what the cache type changes, on this data).

    python scripts/kv_cache_ab.py [--engine ENGINE | --heads 32 --kv-heads 32 --head-dim 128] [--lengths 556,124] [--rounds 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from attention_ab import gqa_model, rounding_bound
from star_export.export.decode_graphs import max_positions, rope_caches
from bench import emit, summary

NUMPY = {"float32": np.float32, "float16": np.float16, "int8": np.int8}


def encode(x: np.ndarray, cache: str, scale: float) -> np.ndarray:
    """`x` as the cache holds it (int8: round(x / scale), clipped to +-127)."""
    if cache == "int8":
        return np.clip(np.rint(x / scale), -127, 127).astype(np.int8)
    return x.astype(NUMPY[cache])


def decode(x: np.ndarray, scale: float) -> np.ndarray:
    return x.astype(np.float64) * (scale if x.dtype == np.int8 else 1.0)


def half_step(cache: str, scale: float, x: np.ndarray) -> float:
    """The largest error of `x` as the cache holds it, rounded to nearest: int8 half its scale, float16 2^-11 of |x|."""
    return {"int8": scale / 2, "float16": 2.0**-11 * float(np.abs(x).max()), "float32": 0.0}[cache]


def measure(heads: int, kv_heads: int, head_dim: int, max_pos: int, length: int, caches: list[str], rounds: int, cache_mb: float = 400,
            seed: int = 0) -> dict:
    """Times of each cache type at `length` filled slots, and their outputs' differences from the float32 cache's
    (`caches` starts with float32: the reference and the base of the ratios)."""
    if caches[0] != "float32":
        raise ValueError(f"caches {caches}: the first must be float32")
    import onnxruntime as ort

    from star_export.runtime.sessions import session_options

    capacity = length + 32
    rng = np.random.default_rng(seed)
    copies = max(4, int(cache_mb * 1e6 // (2 * kv_heads * capacity * head_dim * 4)))
    floats = {kv: [rng.standard_normal((1, kv_heads, capacity, head_dim), dtype=np.float32) for _ in range(copies)] for kv in ("key", "value")}
    for a in floats["key"] + floats["value"]:
        a[:, :, length:] = 0  # free slots are zeros, as in kvcache.KVCache
    q = rng.standard_normal((1, 1, heads * head_dim), dtype=np.float32)
    new = {kv: rng.standard_normal((1, 1, kv_heads * head_dim), dtype=np.float32) for kv in ("key", "value")}
    cos_cache, sin_cache = rope_caches(10000.0 ** (-np.arange(0, head_dim, 2) / head_dim), max_pos)  # LLaMA's RoPE base
    position = length + 70  # a pruned segment's positions run ahead of its slots
    half = head_dim // 2
    cos, sin = cos_cache[position].astype(np.float64), sin_cache[position].astype(np.float64)

    def rope(x: np.ndarray) -> np.ndarray:  # (..., head_dim), GQA's non-interleaved rotation at `position`
        x1, x2 = x[..., :half].astype(np.float64), x[..., half:].astype(np.float64)
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

    q_heads = rope(q.reshape(heads, head_dim))
    k_new = rope(new["key"].reshape(kv_heads, head_dim))  # the key the kernel writes
    v_new = new["value"].reshape(kv_heads, head_dim).astype(np.float64)
    scale = {kv: max(float(np.abs(floats[kv][0]).max()), float(np.abs(x).max())) / 127 for kv, x in (("key", k_new), ("value", v_new))}

    sessions, buffers = {}, {}
    for cache in caches:
        sessions[cache] = ort.InferenceSession(gqa_model(heads, kv_heads, head_dim, capacity, max_pos, cache), session_options(), providers=["CPUExecutionProvider"])
        buffers[cache] = {kv: [encode(a, cache, scale[kv]) for a in floats[kv]] for kv in ("key", "value")}

    def run(cache: str, i: int) -> np.ndarray:
        binding = sessions[cache].io_binding()
        feed = {"query": q, "key": new["key"], "value": new["value"], "seqlens_k": np.array([length], np.int32),
                "total_sequence_length": np.array(length + 1, np.int32), "cos_cache": cos_cache, "sin_cache": sin_cache,
                "position_ids": np.array([[position]], np.int64), "attention_bias": np.zeros((1, 1, 1, length + 1), np.float32)}
        if cache == "int8":
            feed |= {"k_scale": np.array([scale["key"]], np.float32), "v_scale": np.array([scale["value"]], np.float32)}
        for name, value in feed.items():
            binding.bind_cpu_input(name, value)
        binding.bind_cpu_input("past_key", buffers[cache]["key"][i])
        binding.bind_cpu_input("past_value", buffers[cache]["value"][i])
        binding.bind_output("output")
        for name, buffer in (("present_key", buffers[cache]["key"][i]), ("present_value", buffers[cache]["value"][i])):  # written in place
            binding.bind_output(name, "cpu", 0, buffer.dtype, buffer.shape, buffer.ctypes.data)
        sessions[cache].run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy().reshape(-1)

    u = float(np.finfo(np.float32).eps) / 2
    q_norm, group = float(np.linalg.norm(q_heads, axis=-1).max()), heads // kv_heads
    checks, reference = {}, None
    for cache in caches:
        output = run(cache, 0).astype(np.float64)
        reference = output if reference is None else reference
        # what the kernel now holds: slots 0..length of the buffers it wrote in place, dequantized
        keys = decode(buffers[cache]["key"][0][0, :, : length + 1], scale["key"])  # (kv_heads, length + 1, head_dim)
        values = decode(buffers[cache]["value"][0][0, :, : length + 1], scale["value"])
        scores = np.einsum("hd,hnd->hn", q_heads, np.repeat(keys, group, 0)) / np.sqrt(head_dim)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        expected = np.einsum("hn,hnd->hd", weights / weights.sum(-1, keepdims=True), np.repeat(values, group, 0)).reshape(-1)
        bound = rounding_bound(q_norm, float(np.linalg.norm(keys, axis=-1).max()), float(np.abs(values).max()), head_dim, length,
                               2.0**-11 if cache == "float16" else 0.0)
        # the new token as written: within half a step of its rotated key / value, plus float32 rounding of the rotation
        written = {"key": (keys[:, length], k_new), "value": (values[:, length], v_new)}
        write = {kv: {"max_abs_difference": float(np.abs(got - want).max()),
                      "bound": half_step(cache, scale[kv], want) * (1 + 1e-3) + 8 * u * float(np.abs(want).max())}
                 for kv, (got, want) in written.items()}
        checks[cache] = {"max_abs_difference": float(np.abs(output - expected).max()), "rounding_bound": bound, "new_token_written": write,
                         "difference_from_float32_cache": float(np.abs(output - reference).max())}

    times: dict[str, list[float]] = {cache: [] for cache in caches}
    for r in range(rounds):
        for cache in caches if r % 2 == 0 else caches[::-1]:
            t = time.perf_counter()
            for i in range(copies):
                run(cache, i)
            times[cache].append((time.perf_counter() - t) / copies * 1e3)
    base = caches[0]
    return {"length": length, "capacity": capacity, "copies": copies, "max_abs_output": float(np.abs(reference).max()),
            "ms": {c: summary(times[c]) for c in caches},
            f"{base}_over": {c: summary([a / b for a, b in zip(times[base], times[c])]) for c in caches[1:]},
            "kv_bytes_read": {c: 2 * kv_heads * (length + 1) * head_dim * np.dtype(NUMPY[c]).itemsize for c in caches},
            "checks": checks}


def main(argv=None) -> int:
    import onnxruntime as ort

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", default=None, help="take the attention shape and position limit from this engine's star.json")
    p.add_argument("--heads", type=int, default=32, help="default: LLaVA-1.5-7B's")
    p.add_argument("--kv-heads", type=int, default=32)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--max-positions", type=int, default=2305)
    p.add_argument("--lengths", default="556,124", help="filled cache slots (default: decode_split's prompt after 20 steps, segment 0 and 1)")
    p.add_argument("--caches", default="float32,float16,int8", help="float32 first (the reference)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--cache-mb", type=float, default=400)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    heads, kv_heads, head_dim, max_pos = a.heads, a.kv_heads, a.head_dim, a.max_positions
    if a.engine:
        manifest = json.loads((Path(a.engine) / "star.json").read_text())
        model = manifest["model"]
        heads, kv_heads, head_dim, max_pos = model["num_attention_heads"], model["num_key_value_heads"], model["head_dim"], max_positions(manifest)
    caches = a.caches.split(",")
    result = {"heads": heads, "kv_heads": kv_heads, "head_dim": head_dim, "ort": ort.__version__,
              "runs": [measure(heads, kv_heads, head_dim, max_pos, int(n), caches, a.rounds, a.cache_mb) for n in a.lengths.split(",")]}
    return emit(result, a.json)


if __name__ == "__main__":
    sys.exit(main())
