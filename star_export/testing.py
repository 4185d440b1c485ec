"""Random LLaVA models for tests and benchmarks (real transformers classes, fixed seeds)."""

from __future__ import annotations

from pathlib import Path

from .config import ModelSpec
from .models import build_random_llava

# Unlike tiny-llava in every dimension: widths, depths, heads, grouped-query attention.
OTHER_SPEC = ModelSpec(
    vision_layers=4, vision_hidden=96, vision_heads=6, vision_intermediate=192,
    image_size=336, patch_size=14, vision_feature_layer=-2, vision_feature_select_strategy="default",
    text_layers=6, hidden_size=96, intermediate_size=256, num_attention_heads=6, num_key_value_heads=3,
)

# Real LLaVA-1.5-7B widths (CLIP-L/14-336, Vicuna-7B), reduced depth.
def real_width_spec(vision_layers: int = 3, text_layers: int = 4) -> ModelSpec:
    return ModelSpec(
        vision_layers=vision_layers, vision_hidden=1024, vision_heads=16, vision_intermediate=4096,
        image_size=336, patch_size=14, vision_feature_layer=-2, vision_feature_select_strategy="default",
        text_layers=text_layers, hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
    )


def save_random_llava(spec: ModelSpec, directory: str | Path, *, seed: int = 0) -> Path:
    """Save a random model + processor as a local Hugging Face directory (safetensors)."""
    directory = Path(directory)
    model, processor = build_random_llava(spec, seed=seed)
    model.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)
    return directory
