"""The engine's graphs as torch modules with their input and output names, exactly what the exporter writes and what
the eager reference runs; and the decoder layout the generation loop needs."""

from __future__ import annotations

from typing import Any

from ..config import DecoderLayout, StarSchedule
from ..models import LoadedModel
from .decoder import Pivot, Segment0, Segment1
from .vision import VisionStage1

VISION_IO = (["pixel_values"], ["image_features", "stage1_indices"])
PIVOT_IO = (
    ["hidden_states", "stage2_scores", "attention_mask", "position_ids", "image_start"],
    ["pruned_hidden_states", "pruned_attention_mask", "pruned_position_ids", "stage2_indices"],
)


def kv_names(prefix: str, layers: range) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in layers for kind in ("key", "value")]


def segment0_io(schedule: StarSchedule) -> tuple[list[str], list[str]]:
    layers = range(0, schedule.pivot_layer + 1)
    return (
        ["inputs_embeds", "attention_mask", "position_ids", "suffix_rows", *kv_names("past_key_values", layers)],
        ["hidden_states", "stage2_scores", *kv_names("new_key_values", layers)],
    )


def segment1_io(schedule: StarSchedule) -> tuple[list[str], list[str]]:
    layers = range(schedule.pivot_layer + 1, schedule.num_layers)
    return (
        ["hidden_states", "attention_mask", "position_ids", *kv_names("past_key_values", layers)],
        ["logits", *kv_names("new_key_values", layers)],
    )


def graph_modules(loaded: LoadedModel, schedule: StarSchedule) -> dict[str, tuple[Any, list[str], list[str]]]:
    """name -> (nn.Module, input names, output names): exactly what the exporter writes."""
    model, P = loaded.model, schedule.pivot_layer
    return {
        "vision": (VisionStage1(model, loaded.spec, schedule.stage1_keep, schedule.stage1_scorer), *VISION_IO),
        "segment0": (Segment0(model, P), *segment0_io(schedule)),
        "pivot": (Pivot(schedule.stage1_keep, schedule.keep), *PIVOT_IO),
        "segment1": (Segment1(model, P), *segment1_io(schedule)),
    }


def decoder_layout(loaded: LoadedModel, dtype: str = "float32") -> DecoderLayout:
    spec, tok = loaded.spec, loaded.processor.tokenizer
    gen = loaded.model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else tok.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0]
    pad = gen.pad_token_id if gen.pad_token_id is not None else tok.pad_token_id
    return DecoderLayout(
        num_layers=spec.text_layers,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        image_token_id=loaded.model.config.image_token_index,
        num_vision_tokens=spec.num_vision_tokens,
        eos_token_id=eos,
        pad_token_id=pad if pad is not None else 0,
        dtype=dtype,
    )
