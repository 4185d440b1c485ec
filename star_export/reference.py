"""The eager PyTorch reference: STAR exactly as STAR.md states it, on the unmodified HF weights.

It runs the same graph modules that get exported (`graphs/`), eagerly in PyTorch, through the same
generation loop as the engine. Its correctness is tested against independent paths (HF `generate`
with pruning off, HF `output_attentions` for both stages' scores, a from-scratch pruned forward).
"""

from __future__ import annotations

from typing import Any, Sequence

from .config import StarSchedule
from .graphs.decoder import Pivot, Segment0, Segment1
from .graphs.vision import VisionStage1
from .models import LoadedModel
from .runtime.generate import DecoderLayout, Generation, Sampling, StarPipeline
from .runtime.inputs import prepare_inputs
from .runtime.sessions import TorchGraph

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
        ["hidden_states", "stage2_scores", *kv_names("present", layers)],
    )


def segment1_io(schedule: StarSchedule) -> tuple[list[str], list[str]]:
    layers = range(schedule.pivot_layer + 1, schedule.num_layers)
    return (
        ["hidden_states", "attention_mask", "position_ids", *kv_names("past_key_values", layers)],
        ["logits", *kv_names("present", layers)],
    )


def graph_modules(loaded: LoadedModel, schedule: StarSchedule) -> dict[str, tuple[Any, list[str], list[str]]]:
    """name -> (nn.Module, input names, output names): exactly what the exporter writes."""
    model, P = loaded.model, schedule.pivot_layer
    return {
        "vision": (VisionStage1(model, loaded.spec, schedule.stage1_keep), *VISION_IO),
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


def reference_pipeline(loaded: LoadedModel, schedule: StarSchedule, device: str = "cpu") -> StarPipeline:
    """The eager reference in float32 on `device` ("cpu" or "cuda")."""
    loaded.model.to(device)
    graphs = {name: TorchGraph(module, i, o, device) for name, (module, i, o) in graph_modules(loaded, schedule).items()}
    embed = loaded.model.get_input_embeddings().weight.detach().cpu().numpy()
    return StarPipeline(graphs, embed, schedule, decoder_layout(loaded))


def generate(
    loaded: LoadedModel,
    schedule: StarSchedule,
    images: Sequence[Any],
    prompts: Sequence[str],
    sampling: Sampling = Sampling(),
) -> Generation:
    """Eager STAR generation: token ids, per-step logits, stage-1 and stage-2 kept indices."""
    inputs = prepare_inputs(loaded.processor, images, prompts)
    return reference_pipeline(loaded, schedule).generate(inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], sampling)
