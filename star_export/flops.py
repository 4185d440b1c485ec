"""Plans without weights: tokens per stage, decoder FLOPs (STAR.md §FLOPs) and KV-cache bytes.

FLOPs follow the paper's count, one FLOP per multiply-accumulate, per decoder layer with n tokens:
    F(n) = 4 n d^2 + 2 n^2 d + 2 n d m
baseline L F(t + V), STAR (P + 1) F(t + k1) + (L - P - 1) F(t + keep), t = text tokens, V = visual tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from .config import ModelSpec, StarSchedule
from .models import spec_from_name

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1, "fp8": 1}


def layer_flops(n: int, d: int, m: int) -> int:
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def kv_bytes(layers_and_lengths: list[tuple[int, int]], kv_width: int, dtype_bytes: int) -> int:
    """Keys and values: sum over (layer count, cached tokens) of 2 x tokens x kv width x bytes."""
    return sum(2 * count * tokens * kv_width * dtype_bytes for count, tokens in layers_and_lengths)


@dataclass(frozen=True, kw_only=True)
class Plan:
    schedule: dict
    text_tokens: int
    visual_tokens: dict  # per stage
    sequence_lengths: dict  # per decoder segment
    flops: dict
    kv_cache_bytes_per_sequence: dict  # dtype -> {baseline, star, ratio}

    def asdict(self) -> dict:
        return asdict(self)


def plan(spec: ModelSpec, schedule: StarSchedule, text_tokens: int) -> Plan:
    if text_tokens < 1:
        raise ValueError(f"text_tokens={text_tokens}: allowed >= 1")
    L, P, d, m = spec.text_layers, schedule.pivot_layer, spec.hidden_size, spec.intermediate_size
    V, k1, keep, t = spec.num_vision_tokens, schedule.stage1_keep, schedule.keep, text_tokens
    n0, n1, n2 = t + V, t + k1, t + keep
    base = L * layer_flops(n0, d, m)
    star = (P + 1) * layer_flops(n1, d, m) + (L - P - 1) * layer_flops(n2, d, m)
    kv = {}
    for dtype, nbytes in DTYPE_BYTES.items():
        b = kv_bytes([(L, n0)], spec.kv_width, nbytes)
        s = kv_bytes([(P + 1, n1), (L - P - 1, n2)], spec.kv_width, nbytes)
        kv[dtype] = {"baseline": b, "star": s, "ratio": s / b}
    return Plan(
        schedule=schedule.asdict(),
        text_tokens=t,
        visual_tokens={"vision_tower": V, "after_stage1": k1, "after_stage2": keep},
        sequence_lengths={
            "baseline": n0,
            "segment0": n1,
            "segment1": n2,
            "segment0_layers": P + 1,
            "segment1_layers": L - P - 1,
        },
        flops={
            "baseline": base,
            "star": star,
            "ratio": star / base,
            "baseline_tflops": base / 1e12,
            "star_tflops": star / 1e12,
        },
        kv_cache_bytes_per_sequence=kv,
    )


def format_plan(p: Plan, model: str) -> str:
    s, f = p.schedule, p.flops
    lines = [
        f"model {model}: {StarSchedule(**s).method or 'custom'} schedule keep={s['keep']} stage1_keep="
        f"{s['stage1_keep']} pivot_layer={s['pivot_layer']} (decoder layers 0..{s['pivot_layer']} | "
        f"{s['pivot_layer'] + 1}..{s['num_layers'] - 1}; scorers: stage 1 {s['stage1_scorer']}, stage 2 "
        f"{s['stage2_scorer']})",
        f"visual tokens: {p.visual_tokens['vision_tower']} -> stage 1 -> {p.visual_tokens['after_stage1']} -> stage 2 "
        f"-> {p.visual_tokens['after_stage2']}",
        f"decoder tokens ({p.text_tokens} text): baseline {p.sequence_lengths['baseline']}, "
        f"segment 0 {p.sequence_lengths['segment0']} x {p.sequence_lengths['segment0_layers']} layers, "
        f"segment 1 {p.sequence_lengths['segment1']} x {p.sequence_lengths['segment1_layers']} layers",
        f"decoder prefill FLOPs (MAC): baseline {f['baseline_tflops']:.3f} T, STAR {f['star_tflops']:.3f} T, ratio "
        f"{f['ratio']:.3f}",
        "KV cache per sequence after prefill:",
    ]
    for dtype, kv in p.kv_cache_bytes_per_sequence.items():
        lines.append(
            f"  {dtype:9s} baseline {kv['baseline'] / 2**20:10.2f} MiB   STAR {kv['star'] / 2**20:10.2f} MiB   ratio "
            f"{kv['ratio']:.3f}"
        )
    return "\n".join(lines)


def dry_run(
    *,
    model: str,
    keep: int,
    stage1_keep: int | None = None,
    pivot_layer: int | None = None,
    text_tokens: int = 52,
    full: bool = False,
    method: str = "star",
):
    """The plan for `model` (alias or local directory) from its architecture numbers alone: no weights.
    `full`: also return the spec and schedule (for the memory plan)."""
    spec, defaults = spec_from_name(model)
    schedule = StarSchedule.from_spec(
        spec, keep=keep, stage1_keep=stage1_keep, pivot_layer=pivot_layer, defaults=defaults, method=method
    )
    result = plan(spec, schedule, text_tokens)
    return (result, spec, schedule) if full else result
