"""STAR's scoring and selection math (STAR.md), written once and traced into the graphs.

Every function is shape-static in its budget (`k` is a Python int, so TopK gets a constant K) and
dynamic in batch and sequence length.
"""

from __future__ import annotations

import torch


def stage1_scores(attn_probs: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """s1[j] = mean_h mean_i A[h, i, j] over the patch columns (STAR.md, stage 1).

    attn_probs: (B, heads, T, T) softmax probabilities of the CLIP feature layer, T = prefix + patches.
    num_prefix: 1 when CLS is dropped (`default` strategy), 0 when it is a visual token (`full`).
    Returns (B, T - num_prefix).
    """
    received = attn_probs.mean(dim=1).mean(dim=1)  # (B, T): attention each key column receives
    return received[:, num_prefix:]


def cls_scores(attn_probs: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """FasterVLM's stage 1: s1[j] = mean_h A[h, CLS, j], the [CLS] query's attention over the patch columns.

    attn_probs as `stage1_scores`; the [CLS] token is query row 0. Returns (B, T - num_prefix).
    """
    return attn_probs.mean(dim=1)[:, 0, num_prefix:]


# What stage 1 ranks by (config.StarSchedule.stage1_scorer). "none" keeps every visual token: its TopK keeps them all,
# whatever it ranks.
STAGE1 = {"star": stage1_scores, "cls": cls_scores, "none": stage1_scores}


def keep_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the `k` largest scores, re-sorted ascending so the kept tokens stay in order.

    TopK with a static K and sorted=1 (TensorRT's parser needs both), then the ascending sort as a second
    static-K TopK (largest=0): `torch.sort` exports as a TopK whose K is read from a Shape at run time,
    which TensorRT rejects. The indices are sorted as float32 (exact below 2**24) because TensorRT's TopK
    takes floating-point input.
    """
    top = torch.topk(scores, k, dim=-1, largest=True, sorted=True).indices  # (B, k)
    ascending = torch.topk(top.to(torch.float32), k, dim=-1, largest=False, sorted=True).values  # (B, k)
    return ascending.to(torch.int64)


def stage2_scores(attn_probs: torch.Tensor, suffix_rows: torch.Tensor) -> torch.Tensor:
    """s2[v] = mean_h mean_{t in suffix text} A[h, t, v] (STAR.md, stage 2), for every key column.

    attn_probs: (B, heads, q, kv) causal attention probabilities of the pivot layer.
    suffix_rows: (B, q), 1 on the text query rows after the image span, else 0.
    Returns (B, kv); the caller reads the visual columns. Rows with no suffix text score 0.
    """
    head_mean = attn_probs.mean(dim=1)  # (B, q, kv)
    w = suffix_rows.to(head_mean.dtype)
    w = w / w.sum(dim=-1, keepdim=True).clamp(min=1.0)  # (B, q), weights of a mean over suffix rows
    return torch.matmul(w.unsqueeze(1), head_mean).squeeze(1)  # (B, kv)


def pruned_positions(image_start: torch.Tensor, kept: torch.Tensor, seq_len: int, num_visual: int) -> torch.Tensor:
    """Sequence indices of `[prefix | kept visual | suffix]` in the stage-1 sequence, per row.

    image_start: (B,) index of the first visual token; kept: (B, keep) ascending offsets into the
    visual span; seq_len: n; num_visual: k1. Returns (B, n - k1 + keep).

        stage-1 sequence   [ p p p | v0 v1 v2 v3 v4 v5 | s s ]      n = 11, k1 = 6
        kept = [1, 4]                 ^        ^
        pruned sequence    [ p p p | v1 v4 | s s ]                  n - k1 + keep = 7
        index              [ 0 1 2 | 4  7  | 9 10 ]
    """
    keep = kept.shape[-1]
    out = torch.arange(seq_len - num_visual + keep, device=kept.device).unsqueeze(0)  # (1, n')
    start = image_start.unsqueeze(-1)  # (B, 1)
    offset = (out - start).clamp(0, keep - 1)  # (B, n'), valid inside the kept span
    visual = start + torch.gather(kept, 1, offset)  # (B, n')
    after = out + (num_visual - keep)  # (1, n'), suffix shifted past the dropped tokens
    return torch.where(out < start, out, torch.where(out < start + keep, visual, after))


def attention_bias(attention_mask: torch.Tensor, q_len: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive causal + padding bias (B, 1, q, kv) for queries at the last `q_len` of `kv` positions.

    A query may see key j when j is not after it and j is a real token. A padding query also sees
    itself, so no softmax row is fully masked (an all-masked row gives NaN, and 0 * NaN in the value
    product would leak into real rows).
    """
    kv_len = attention_mask.shape[-1]
    q_idx = torch.arange(q_len, device=attention_mask.device).unsqueeze(-1) + (kv_len - q_len)  # (q, 1)
    k_idx = torch.arange(kv_len, device=attention_mask.device).unsqueeze(0)  # (1, kv)
    causal = k_idx <= q_idx  # (q, kv)
    allowed = causal & ((attention_mask.unsqueeze(1) > 0) | (k_idx == q_idx))  # (B, q, kv)
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, neg).unsqueeze(1)  # (B, 1, q, kv)
