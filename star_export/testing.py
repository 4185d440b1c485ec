"""Random LLaVA models for tests and benchmarks (real transformers classes, fixed seeds)."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from pathlib import Path

from .config import ModelSpec
from .models import build_random_llava

# Unlike tiny-llava in every dimension: widths, depths, heads, grouped-query attention.
OTHER_SPEC = ModelSpec(
    vision_layers=4,
    vision_hidden=96,
    vision_heads=6,
    vision_intermediate=192,
    image_size=336,
    patch_size=14,
    vision_feature_layer=-2,
    vision_feature_select_strategy="default",
    text_layers=6,
    hidden_size=96,
    intermediate_size=256,
    num_attention_heads=6,
    num_key_value_heads=3,
)


# Real LLaVA-1.5-7B widths (CLIP-L/14-336, Vicuna-7B), reduced depth.
def real_width_spec(vision_layers: int = 3, text_layers: int = 4) -> ModelSpec:
    return ModelSpec(
        vision_layers=vision_layers,
        vision_hidden=1024,
        vision_heads=16,
        vision_intermediate=4096,
        image_size=336,
        patch_size=14,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        text_layers=text_layers,
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
    )


def save_random_llava(spec: ModelSpec, directory: str | Path, *, seed: int = 0, **init) -> Path:
    """Save a random model + processor as a local Hugging Face directory (safetensors). `init`: see
    build_random_llava."""
    directory = Path(directory)
    model, processor = build_random_llava(spec, seed=seed, **init)
    model.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)
    return directory


@dataclass(frozen=True, kw_only=True)
class SweepCase:
    """One random model of the validation sweep, and the engine to build from it."""

    spec: ModelSpec
    seed: int
    text_init_std: float
    qk_scale: float  # CLIP q/k
    text_qk_scale: float  # decoder q/k
    dtype: str
    keep: int

    @property
    def init(self) -> dict[str, float]:
        return {"text_init_std": self.text_init_std, "qk_scale": self.qk_scale, "text_qk_scale": self.text_qk_scale}

    @property
    def name(self) -> str:
        s = self.spec
        attn = (
            "mha" if s.num_key_value_heads == s.num_attention_heads else "mqa" if s.num_key_value_heads == 1 else "gqa"
        )
        return (
            f"d{s.hidden_size}x{s.text_layers}-{attn}-std{self.text_init_std:g}"
            f"-qk{self.qk_scale:g}/{self.text_qk_scale:g}-f{s.vision_feature_layer}-{self.dtype}-keep{self.keep}"
        )


# (text width, heads, vision width, vision heads): tiny to mid; real 7B widths come from real_width_spec.
_WIDTHS = ((64, 4, 64, 4), (96, 6, 96, 6), (128, 8, 96, 4), (256, 8, 128, 8), (512, 16, 128, 4))


def validation_sweep(n: int = 24, seed: int = 0) -> list[SweepCase]:
    """`n` models spread over every axis of the issue's ranges: each axis is its values repeated to `n` and
    shuffled with its own seeded generator, so every value occurs about equally often and combinations fall
    where they fall (generated, not chosen): widths, depths 2-8, MHA / GQA / MQA, decoder init std 0.02-0.3,
    CLIP and decoder q/k x1-x8, feature layer -1 / -2, float32 / float16, keep 576 / 288 / 58 / 29."""
    axes = {
        "width": _WIDTHS,
        "depth": tuple(range(2, 9)),
        "kv": ("mha", "gqa", "mqa"),
        "std": (0.02, 0.05, 0.1, 0.2, 0.3),
        "clip_qk": (1, 2, 4, 8),
        "text_qk": (1, 2, 4, 8),
        "feature_layer": (-2, -1),
        "dtype": ("float32", "float16"),
        "keep": (576, 288, 58, 29),
    }
    columns = {}
    for j, (axis, values) in enumerate(axes.items()):
        column = [values[i % len(values)] for i in range(n)]
        random.Random(seed * 1000 + j).shuffle(column)
        columns[axis] = column
    cases = []
    for i in range(n):
        a = {axis: column[i] for axis, column in columns.items()}
        width, heads, vwidth, vheads = a["width"]
        kv = {"mha": heads, "gqa": heads // 2, "mqa": 1}[a["kv"]]
        spec = ModelSpec(
            vision_layers=3,
            vision_hidden=vwidth,
            vision_heads=vheads,
            vision_intermediate=2 * vwidth,
            image_size=336,
            patch_size=14,
            vision_feature_layer=a["feature_layer"],
            vision_feature_select_strategy="default",
            text_layers=a["depth"],
            hidden_size=width,
            intermediate_size=width * 11 // 4,
            num_attention_heads=heads,
            num_key_value_heads=kv,
        )
        cases.append(
            SweepCase(
                spec=spec,
                seed=100 + i,
                text_init_std=a["std"],
                qk_scale=a["clip_qk"],
                text_qk_scale=a["text_qk"],
                dtype=a["dtype"],
                keep=a["keep"],
            )
        )
    return cases


def real_width_case(dtype: str = "float32", keep: int = 58, **init) -> SweepCase:
    """Real LLaVA-1.5-7B widths at 2 decoder / 3 CLIP layers, plain-scale init (std 0.02: gain ~1.3 per layer)."""
    init = {"text_init_std": 0.02, "qk_scale": 1.0, "text_qk_scale": 1.0} | init
    spec = dataclasses.replace(real_width_spec(vision_layers=3, text_layers=2))
    return SweepCase(spec=spec, seed=7, dtype=dtype, keep=keep, **init)
