"""The two-segment decoder: segment 0 (layers 0..P, scoring at P), the pivot graph, segment 1 (P+1..L-1).

    prefill                                                       decode (one token)
    [prefix | k1 visual | suffix]  n tokens                       new token, position = last + 1
        -> Segment0: layers 0..P, KV cache of n                   -> Segment0 (cache n + t)
           layer P also returns s2 (B, n)                         -> Segment1 (cache n' + t)
        -> Pivot: TopK(keep, static) over the visual columns,     -> logits
           ascending sort, gather hidden / positions / mask
           down to [prefix | keep visual | suffix], n' = n - k1 + keep
        -> Segment1: layers P+1..L-1, KV cache of n', norm, lm_head on the last position -> logits

Why the pivot is a graph of its own: segment 0 runs at every decode step, where no pruning happens,
so putting the TopK + gather inside it would need a second copy of layers 0..P's weights (a prefill
variant) or an If node; instead segment 0 always emits the stage-2 scores (a (B, kv) reduction of
the attention probabilities that layer P computes anyway) and the small pivot graph, run once at
prefill, does the static-k TopK and gathers. Nothing between the graphs is computed on the host.

Key/value caches are plain tensors named `past_key_values.{i}.key` / `present.{i}.key` with the
absolute layer index `i`; each present is the past plus this call's positions.
"""

from __future__ import annotations

import torch
from torch import nn

from .select import attention_bias, keep_topk, pruned_positions, stage2_scores


class _SegmentCache:
    """The minimal `Cache` protocol HF attention calls: `update(k, v, layer_idx)` -> full k, v."""

    def __init__(self, past: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        self.past = past
        self.present: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key, value, layer_idx, *args, **kwargs):
        past_key, past_value = self.past[layer_idx]
        key = torch.cat([past_key, key], dim=2)  # (B, kv_heads, past + q, head_dim)
        value = torch.cat([past_value, value], dim=2)
        self.present[layer_idx] = (key, value)
        return key, value


class _Segment(nn.Module):
    """Decoder layers `start .. stop-1` of a LLaVA language model with explicit KV tensors."""

    def __init__(self, llava, start: int, stop: int):
        super().__init__()
        lm = llava.model.language_model
        self.start, self.stop = start, stop
        self.layers = nn.ModuleList(lm.layers[start:stop])
        self.rotary_emb = lm.rotary_emb

    def _run(self, hidden, attention_mask, position_ids, past, score_layer: int | None = None, suffix_rows=None):
        bias = attention_bias(attention_mask, hidden.shape[1], hidden.dtype)  # (B, 1, q, kv)
        cos_sin = self.rotary_emb(hidden, position_ids)  # RoPE at each token's own position id
        cache = _SegmentCache({self.start + i: (past[2 * i], past[2 * i + 1]) for i in range(len(self.layers))})
        scores = None
        for i, layer in enumerate(self.layers):
            if self.start + i != score_layer:
                hidden = layer(hidden, attention_mask=bias, position_embeddings=cos_sin, past_key_values=cache)
                continue
            # LlamaDecoderLayer written out to keep the attention probabilities of the pivot layer.
            attn_out, probs = layer.self_attn(
                hidden_states=layer.input_layernorm(hidden),
                position_embeddings=cos_sin,
                attention_mask=bias,
                past_key_values=cache,
            )  # probs (B, heads, q, kv)
            hidden = hidden + attn_out
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            scores = stage2_scores(probs, suffix_rows)  # (B, kv)
        present = []
        for i in range(len(self.layers)):
            present.extend(cache.present[self.start + i])
        return hidden, scores, present


class Segment0(_Segment):
    """Layers 0..P over the stage-1 sequence; layer P also emits the stage-2 scores."""

    def __init__(self, llava, pivot_layer: int):
        super().__init__(llava, 0, pivot_layer + 1)
        self.pivot_layer = pivot_layer

    def forward(self, inputs_embeds, attention_mask, position_ids, suffix_rows, *past_key_values):
        hidden, scores, present = self._run(
            inputs_embeds, attention_mask, position_ids, past_key_values, self.pivot_layer, suffix_rows
        )
        return (hidden, scores, *present)


class Pivot(nn.Module):
    """Stage 2 selection at prefill: TopK(keep) over the k1 visual columns, ascending, then gather."""

    def __init__(self, stage1_keep: int, keep: int):
        super().__init__()
        self.stage1_keep, self.keep = stage1_keep, keep

    def visual_scores(self, stage2_scores, image_start):
        """s2 of the k1 visual tokens (B, k1): the columns `image_start .. image_start + k1 - 1`."""
        visual = image_start.unsqueeze(-1) + torch.arange(self.stage1_keep, device=image_start.device)  # (B, k1)
        return torch.gather(stage2_scores, 1, visual)

    def forward(self, hidden_states, stage2_scores, attention_mask, position_ids, image_start, stage2_indices=None):
        """`stage2_indices`: reference only, never exported (the validator forces the engine's selection)."""
        seq_len = hidden_states.shape[1]
        if stage2_indices is None:
            stage2_indices = keep_topk(self.visual_scores(stage2_scores, image_start), self.keep)  # (B, keep), offsets into the visual span
        index = pruned_positions(image_start, stage2_indices, seq_len, self.stage1_keep)  # (B, n')
        hidden = torch.gather(hidden_states, 1, index.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1]))  # (B, n', d)
        return (
            hidden,
            torch.gather(attention_mask, 1, index),  # (B, n')
            torch.gather(position_ids, 1, index),  # (B, n'): kept tokens keep their positions
            stage2_indices,
        )


class Segment1(_Segment):
    """Layers P+1..L-1 over the pruned sequence, final norm and lm_head on the last position only."""

    def __init__(self, llava, pivot_layer: int):
        super().__init__(llava, pivot_layer + 1, llava.config.text_config.num_hidden_layers)
        self.norm = llava.model.language_model.norm
        self.lm_head = llava.lm_head

    def forward(self, hidden_states, attention_mask, position_ids, *past_key_values):
        hidden, _, present = self._run(hidden_states, attention_mask, position_ids, past_key_values)
        logits = self.lm_head(self.norm(hidden[:, -1:]))  # (B, 1, vocab)
        return (logits, *present)
