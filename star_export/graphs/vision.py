"""The vision graph: CLIP tower up to the feature layer, STAR stage 1, projector (exactly what is exported).

    pixel_values (B, 3, H, W)
        -> patch + position embeddings, pre-LayerNorm          (B, T, c)    T = 1 + patches
        -> CLIP layers 0 .. f-2                                 (B, T, c)
        -> CLIP layer f-1, keeping its attention probabilities  A: (B, heads, T, T)
        -> s1 = mean_h mean_i A[:, :, i, patches]               (B, patches)   (FasterVLM: A[:, :, CLS, patches])
        -> TopK(k1, static) -> sort ascending                   stage1_indices (B, k1)
        -> gather patch features                                (B, k1, c)
        -> projector Linear-GELU-Linear                         image_features (B, k1, d)

`f` is the number of layers behind `hidden_states[vision_feature_layer]` (23 of 24 for LLaVA-1.5):
layers after it are never computed.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModelSpec
from .select import STAGE1, keep_topk


class VisionStage1(nn.Module):
    def __init__(self, llava, spec: ModelSpec, stage1_keep: int, scorer: str = "star"):
        super().__init__()
        tower = llava.model.vision_tower
        self.embeddings = tower.embeddings
        self.pre_layrnorm = tower.pre_layrnorm
        self.layers = nn.ModuleList(tower.encoder.layers[: spec.vision_layers_run])
        self.projector = llava.model.multi_modal_projector
        self.num_prefix = 1 if spec.vision_feature_select_strategy == "default" else 0
        self.stage1_keep = stage1_keep
        self.stage1_scores = STAGE1[scorer]  # STAR's column mean, or FasterVLM's [CLS] row

    def select_layer(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Hidden states of the feature layer and that layer's attention probabilities."""
        h = self.pre_layrnorm(self.embeddings(pixel_values))  # (B, T, c)
        for layer in self.layers[:-1]:
            h = layer(h, None)
        last = self.layers[-1]  # CLIPEncoderLayer, written out to keep its attention probabilities
        attn_out, probs = last.self_attn(
            hidden_states=last.layer_norm1(h), attention_mask=None
        )  # probs (B, heads, T, T)
        h = h + attn_out
        h = h + last.mlp(last.layer_norm2(h))
        return h, probs

    def scores(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """s1 (B, patches): what the TopK ranks (the validator reads it to tell a tie from a wrong selection)."""
        _, probs = self.select_layer(pixel_values)
        return self.stage1_scores(probs, self.num_prefix)

    def forward(
        self, pixel_values: torch.Tensor, stage1_indices: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`stage1_indices`: reference only, never exported. The validator forces the engine's selection
        onto the eager reference so that values are compared between the same computations."""
        hidden, probs = self.select_layer(pixel_values)
        if stage1_indices is None:
            scores = self.stage1_scores(probs, self.num_prefix)  # (B, patches)
            stage1_indices = keep_topk(scores, self.stage1_keep)  # (B, k1), ascending
        patches = hidden[:, self.num_prefix :]  # (B, patches, c)
        index = stage1_indices.unsqueeze(-1).expand(-1, -1, patches.shape[-1])  # (B, k1, c)
        kept = torch.gather(patches, 1, index)  # (B, k1, c)
        image_features = self.projector(kept)  # (B, k1, d)
        return image_features, stage1_indices
