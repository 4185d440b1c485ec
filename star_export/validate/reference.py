"""The eager PyTorch reference: STAR exactly as STAR.md states it, on the unmodified HF weights.

It runs the same graph modules that get exported (`graphs/`), eagerly in PyTorch, through the same
generation loop as the engine. Its correctness is tested against independent paths (HF `generate`
with pruning off, HF `output_attentions` for both stages' scores, a from-scratch pruned forward).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from ..config import StarSchedule
from ..graphs.decoder import WIDE_ATTENTION
from ..graphs.stages import decoder_layout, graph_modules
from ..models import LoadedModel
from ..runtime.generate import Generation, Sampling, StarPipeline
from ..runtime.inputs import prepare_inputs
from ..runtime.eager import TorchGraph

# ---------------------------------------------------------------- float64 that is float64
# HF computes some steps in float32 whatever the model's dtype: LlamaRMSNorm casts its input to float32,
# and the eager attentions of Llama and CLIP take the softmax in float32. A float64 model would then carry
# float32 rounding in every layer and be no truth to measure float32 errors against. The float64 reference
# takes those steps in the model's own dtype (never narrower than float32, so float16 / float32 runs are
# HF's own numerics). RoPE's cos/sin tables stay float32 as HF defines them for every dtype: the engine
# computes the very same tables, so that is part of the model, not an error of either side.


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def wide_eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """HF's eager attention (Llama's and CLIP's alike) with the softmax in the query's dtype when wider than float32."""
    groups = getattr(module, "num_key_value_groups", 1)
    key = key.repeat_interleave(groups, dim=1)  # (B, heads, kv, head_dim), HF `repeat_kv`
    value = value.repeat_interleave(groups, dim=1)
    weights = torch.matmul(query, key.transpose(-1, -2)) * scaling  # (B, heads, q, kv)
    if attention_mask is not None:
        weights = weights + attention_mask
    weights = torch.softmax(weights, dim=-1, dtype=_wide(query.dtype)).to(query.dtype)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()  # (B, q, heads, head_dim)
    return output, weights


class WideRMSNorm(LlamaRMSNorm):
    """LlamaRMSNorm with its statistics in the input's dtype when wider than float32."""

    def forward(self, hidden_states):
        dtype = hidden_states.dtype
        x = hidden_states.to(_wide(dtype))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


AttentionInterface.register(WIDE_ATTENTION, wide_eager_attention)
# HF builds the masks it passes to an attention function by that function's name; a registered name gets boolean
# (sdpa) masks unless told otherwise, and the function above adds the mask: it needs eager's additive one.
AttentionMaskInterface.register(WIDE_ATTENTION, eager_mask)


def widen_numerics(model) -> None:
    """Make a float64 model compute in float64 throughout (see above). Idempotent."""
    model.set_attn_implementation(WIDE_ATTENTION)
    for module in model.modules():
        if type(module) is LlamaRMSNorm:
            module.__class__ = WideRMSNorm


def reference_pipeline(
    loaded: LoadedModel, schedule: StarSchedule, device: str = "cpu", dtype: str = "float32"
) -> StarPipeline:
    """The eager reference in `dtype` on `device` ("cpu" or "cuda"). float64 is the truth the validator
    measures errors against; the engine's own dtype gives the error an eager run of that dtype makes."""
    variant = loaded.cast(dtype)
    if dtype == "float64":
        widen_numerics(variant.model)
    variant.model.to(device)
    graphs = {
        name: TorchGraph(module, i, o, device) for name, (module, i, o) in graph_modules(variant, schedule).items()
    }
    embed = TorchGraph.to_numpy(variant.model.get_input_embeddings().weight)  # bfloat16 held as float32
    return StarPipeline(graphs, embed, schedule, decoder_layout(variant, dtype))


def generate(
    loaded: LoadedModel,
    schedule: StarSchedule,
    images: Sequence[Any],
    prompts: Sequence[str],
    sampling: Sampling = Sampling(),
) -> Generation:
    """Eager STAR generation: token ids, per-step logits, stage-1 and stage-2 kept indices."""
    inputs = prepare_inputs(loaded.processor, images, prompts)
    return reference_pipeline(loaded, schedule).generate(
        inputs["pixel_values"], inputs["input_ids"], inputs["attention_mask"], sampling
    )
