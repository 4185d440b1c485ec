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

Key/value caches are plain tensors named `past_key_values.{i}.key` with the absolute layer index `i`; a graph
reads them and returns only this call's keys and values (`new_key_values.{i}.key`), which the runtime writes into
its cache buffers in place (runtime/kvcache.py). The caches are never copied inside a graph.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from .select import attention_bias, keep_topk, pruned_positions, stage2_scores

WIDE_ATTENTION = "star_eager_wide"  # the float64 reference's attention implementation (reference.py registers it)


def attend(attn, hidden, cos_sin, bias, past_key, past_value):
    """One layer's self-attention over `[cache | this call's tokens]` without joining the two: the cache is only read.

    A decode step then costs the weight reads and one query row over the cache, not a copy of every layer's cache
    (`concat(past, new)` wrote the whole cache again at every step). The cache may be a buffer longer than the
    tokens it holds: its free slots are zeros and masked out by `bias`.

    hidden (B, q, d); bias (B, 1, q, past + q); past_key/value (B, kv_heads, past, head_dim).
    Returns the attention output (B, q, d), the probabilities (B, heads, q, past + q) and this call's key and
    value (B, kv_heads, q, head_dim), RoPE applied: what the caller appends to the cache.
    """
    batch, q, _ = hidden.shape
    head_dim, groups = attn.head_dim, attn.num_key_value_groups
    query = attn.q_proj(hidden).view(batch, q, -1, head_dim).transpose(1, 2)  # (B, heads, q, hd)
    key = attn.k_proj(hidden).view(batch, q, -1, head_dim).transpose(1, 2)  # (B, kv_heads, q, hd)
    value = attn.v_proj(hidden).view(batch, q, -1, head_dim).transpose(1, 2)
    query, key = apply_rotary_pos_emb(query, key, *cos_sin)
    kv_heads = key.shape[1]
    # The query heads sharing one key/value head, stacked as rows (head h = kv * groups + g, HF `repeat_kv`): grouped
    # query attention without repeating the cache.
    grouped = query.reshape(batch, kv_heads, groups * q, head_dim)

    def per_head(scores):  # (B, kv_heads, groups * q, k) -> (B, heads, q, k)
        return scores.reshape(batch, kv_heads * groups, q, scores.shape[-1])

    scores = (
        torch.cat(
            [
                per_head(torch.matmul(grouped, past_key.transpose(-1, -2))),
                per_head(torch.matmul(grouped, key.transpose(-1, -2))),
            ],
            dim=-1,
        )
        * attn.scaling
        + bias
    )  # (B, heads, q, past + q)
    # HF's eager softmax is float32 whatever the model's dtype; the float64 reference widens it (reference.py).
    wide = getattr(attn.config, "_attn_implementation", None) == WIDE_ATTENTION
    probs = torch.softmax(
        scores, dim=-1, dtype=torch.promote_types(query.dtype, torch.float32) if wide else torch.float32
    ).to(query.dtype)
    past_len = past_key.shape[2]

    def grouped_rows(p):  # (B, heads, q, k) -> (B, kv_heads, groups * q, k)
        return p.reshape(batch, kv_heads, groups * q, p.shape[-1])

    out = torch.matmul(grouped_rows(probs[..., :past_len]), past_value) + torch.matmul(
        grouped_rows(probs[..., past_len:]), value
    )
    out = out.reshape(batch, kv_heads * groups, q, head_dim).transpose(1, 2).reshape(batch, q, -1)  # (B, q, heads * hd)
    return attn.o_proj(out), probs, key, value


class _Segment(nn.Module):
    """Decoder layers `start .. stop-1` of a LLaVA language model with explicit KV tensors."""

    def __init__(self, llava, start: int, stop: int):
        super().__init__()
        lm = llava.model.language_model
        self.start, self.stop = start, stop
        self.layers = nn.ModuleList(lm.layers[start:stop])
        self.rotary_emb = lm.rotary_emb

    def _run(self, hidden, attention_mask, position_ids, past, score_layer: int | None = None, suffix_rows=None):
        """`past`: per layer a key and a value cache (B, kv_heads, past, head_dim); `attention_mask` (B, past + q)
        marks the real tokens of `[cache | this call's tokens]`. Returns hidden, stage-2 scores (at `score_layer`) and
        per layer this call's key and value."""
        bias = attention_bias(attention_mask, hidden.shape[1], hidden.dtype)  # (B, 1, q, past + q)
        cos_sin = self.rotary_emb(hidden, position_ids)  # RoPE at each token's own position id
        scores, new = None, []
        for i, layer in enumerate(self.layers):  # LlamaDecoderLayer, its attention through `attend`
            attn_out, probs, key, value = attend(
                layer.self_attn, layer.input_layernorm(hidden), cos_sin, bias, past[2 * i], past[2 * i + 1]
            )
            hidden = hidden + attn_out
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
            if self.start + i == score_layer:
                scores = stage2_scores(probs, suffix_rows)  # (B, past + q)
            new.extend((key, value))
        return hidden, scores, new


class Segment0(_Segment):
    """Layers 0..P over the stage-1 sequence; layer P also emits the stage-2 scores."""

    def __init__(self, llava, pivot_layer: int):
        super().__init__(llava, 0, pivot_layer + 1)
        self.pivot_layer = pivot_layer

    def forward(self, inputs_embeds, attention_mask, position_ids, suffix_rows, *past_key_values):
        hidden, scores, new = self._run(
            inputs_embeds, attention_mask, position_ids, past_key_values, self.pivot_layer, suffix_rows
        )
        return (hidden, scores, *new)


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
            stage2_indices = keep_topk(
                self.visual_scores(stage2_scores, image_start), self.keep
            )  # (B, keep), offsets into the visual span
        index = pruned_positions(image_start, stage2_indices, seq_len, self.stage1_keep)  # (B, n')
        hidden = torch.gather(
            hidden_states, 1, index.unsqueeze(-1).expand(-1, -1, hidden_states.shape[-1])
        )  # (B, n', d)
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
        hidden, _, new = self._run(hidden_states, attention_mask, position_ids, past_key_values)
        logits = self.lm_head(self.norm(hidden[:, -1:]))  # (B, 1, vocab)
        return (logits, *new)
