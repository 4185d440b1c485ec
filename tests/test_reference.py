"""The eager reference (`star_export.validate.reference`) against independent paths.

Every expected value here is computed from the unmodified Hugging Face model and its public outputs
(`generate`, `output_attentions`, `output_hidden_states`, the decoder layers called one by one), never
from star_export's graph modules or selection functions. The scoring, top-k, merge, gather and causal
mask are written out again in this file on purpose.

Tolerances: token ids, stage-1 and stage-2 indices must be equal exactly. Per-step logits:
- against HF `generate`, cached reference vs from-scratch recompute, and batch vs batch-1 (the reference's
  attention reads its cache and the new tokens as two products, HF concatenates them; different shapes: all a
  different fp32 summation order): FP64_ATOL = 1e-6 absolute with the model and the reference run in
  float64 (the reference casts its logits to float32, so the floor is ~2.4e-7), and FP32_ATOL = 5e-5
  absolute in the shipped fp32. At fp32 each path alone is up to ~2.7e-5 away from the float64
  result on the `other` model (logits of magnitude ~6), so two fp32 paths cannot be held to 1e-5;
  the float64 tier is the one that would catch a systematic error.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from star_export.graphs import stages
from star_export.validate import reference
from star_export.config import StarSchedule
from star_export.runtime.generate import Sampling, StarPipeline
from star_export.runtime.inputs import prepare_inputs
from star_export.runtime.eager import TorchGraph

from conftest import QUESTIONS

LOGITS_ATOL = 1e-5  # fp32, absolute: reference vs HF generate
FP32_ATOL = 5e-5  # fp32, absolute: two computations with different shapes / summation order
FP64_ATOL = 1e-6  # float64 model and reference, absolute (reference output is cast to float32)
ATOL = {"fp32": FP32_ATOL, "fp64": FP64_ATOL}


# ---------------------------------------------------------------- helpers


def _schedule(loaded, keep, stage1_keep=None, pivot_layer=None):
    return StarSchedule.from_spec(loaded.spec, keep=keep, stage1_keep=stage1_keep, pivot_layer=pivot_layer, defaults=loaded.defaults)


def _dtype(loaded) -> torch.dtype:
    return next(loaded.model.parameters()).dtype


def _run_reference(loaded, schedule, images, questions, max_new_tokens):
    sampling = Sampling(max_new_tokens=max_new_tokens)
    if _dtype(loaded) == torch.float32:
        return reference.generate(loaded, schedule, images, questions, sampling)
    # float64: `reference.reference_pipeline` with the activation dtype set to float64.
    graphs = {name: TorchGraph(m, i, o) for name, (m, i, o) in stages.graph_modules(loaded, schedule).items()}
    embed = loaded.model.get_input_embeddings().weight.detach().numpy()
    pipe = StarPipeline(graphs, embed, schedule, stages.decoder_layout(loaded, "float64"))
    inp = prepare_inputs(loaded.processor, images, questions)
    return pipe.generate(inp["pixel_values"].astype(np.float64), inp["input_ids"], inp["attention_mask"], sampling)


@pytest.fixture(scope="module", params=["fp32", "fp64"])
def precision_model(request, any_model):
    """(precision, loaded): the session model as is, or a float64 copy of it that computes in float64 throughout (HF
    takes its softmax and RMSNorm statistics in float32 otherwise, whose rounding depends on the shapes reduced over)."""
    if request.param == "fp32":
        return request.param, any_model
    model = copy.deepcopy(any_model.model).double()
    reference.widen_numerics(model)
    return request.param, dataclasses.replace(any_model, model=model)


def _torch_inputs(loaded, images, questions):
    inp = prepare_inputs(loaded.processor, images, questions)
    out = {k: torch.from_numpy(v) for k, v in inp.items()}
    out["pixel_values"] = out["pixel_values"].to(_dtype(loaded))
    return out


def _hf_positions(mask: torch.Tensor) -> torch.Tensor:
    """HF generate's rule: cumsum(mask) - 1, padding positions set to 1."""
    pos = mask.long().cumsum(-1) - 1
    return pos.masked_fill(mask == 0, 1)


def _topk_ascending(scores: torch.Tensor, k: int) -> np.ndarray:
    """Indices of the k largest scores per row, sorted ascending (written out independently)."""
    order = torch.argsort(scores, dim=-1, descending=True, stable=True)[:, :k]
    return np.sort(order.numpy(), axis=-1)


def _vision_outputs(loaded, pixel_values):
    with torch.no_grad():
        return loaded.model.model.vision_tower(pixel_values, output_attentions=True, output_hidden_states=True)


def _feature_layer_indices(loaded):
    """(index into hidden_states, index into attentions) of the layer LLaVA takes features from."""
    f = loaded.model.config.vision_feature_layer
    n_layers = loaded.model.config.vision_config.num_hidden_layers
    h = f % (n_layers + 1)  # hidden_states has n_layers + 1 entries (entry 0 = embeddings)
    return h, h - 1  # hidden_states[h] is the output of layer h - 1, whose attention is attentions[h - 1]


def _hf_stage1_scores(loaded, pixel_values) -> torch.Tensor:
    """s1[j] = mean_h mean_i A[h, i, j] over the patch columns, from HF `output_attentions`."""
    assert loaded.model.config.vision_feature_select_strategy == "default"
    _, a_idx = _feature_layer_indices(loaded)
    attn = _vision_outputs(loaded, pixel_values).attentions[a_idx]  # (B, heads, T, T)
    assert attn.shape[-1] == loaded.spec.num_patches + 1
    return attn.mean(dim=1).mean(dim=1)[:, 1:]  # drop the CLS column


def _hf_stage1_sequence(loaded, inputs, stage1_indices: np.ndarray):
    """The decoder input after stage 1, built from HF pieces: `[prefix | k1 visual | suffix]`.

    Returns embeds (B, n, d), mask (B, n), positions (B, n), image_start (list), k1.
    """
    model = loaded.model
    h_idx, _ = _feature_layer_indices(loaded)
    feats = _vision_outputs(loaded, inputs["pixel_values"]).hidden_states[h_idx][:, 1:]  # (B, 576, c)
    idx = torch.from_numpy(np.asarray(stage1_indices)).long()
    k1 = idx.shape[1]
    kept = torch.stack([feats[b, idx[b]] for b in range(len(idx))])  # (B, k1, c)
    with torch.no_grad():
        projected = model.model.multi_modal_projector(kept)  # (B, k1, d)
    image_id = model.config.image_token_index
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    new_ids, new_mask, starts = [], [], []
    for b in range(ids.shape[0]):
        where = torch.nonzero(ids[b] == image_id).flatten()
        assert len(where) == loaded.spec.num_vision_tokens
        s, e = int(where[0]), int(where[-1]) + 1
        assert e - s == loaded.spec.num_vision_tokens  # one contiguous span
        new_ids.append(torch.cat([ids[b, :s], torch.full((k1,), image_id), ids[b, e:]]))
        new_mask.append(torch.cat([mask[b, :s], torch.ones(k1, dtype=mask.dtype), mask[b, e:]]))
        starts.append(s)
    new_ids, new_mask = torch.stack(new_ids), torch.stack(new_mask)
    with torch.no_grad():
        embeds = model.get_input_embeddings()(new_ids).clone()
    for b, s in enumerate(starts):
        embeds[b, s : s + k1] = projected[b]
    return embeds, new_mask, _hf_positions(new_mask), starts, k1


def _hf_language_model(loaded, embeds, mask, positions, **kwargs):
    with torch.no_grad():
        return loaded.model.model.language_model(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False, **kwargs
        )


def _causal_bias(q: int, dtype: torch.dtype) -> torch.Tensor:
    bias = torch.full((q, q), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return bias[None, None]  # (1, 1, q, q)


def _assert_logits_close(actual, expected, what, atol=LOGITS_ATOL):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, what
    err = float(np.abs(actual - expected).max())
    assert err <= atol, f"{what}: max |logits diff| {err:.3g} > {atol}"
    return err


def _truncate_at_eos(tokens, eos):
    out = []
    for t in tokens:
        out.append(int(t))
        if t == eos:
            break
    return out


# ---------------------------------------------------------------- 1. identity schedule == HF generate


@pytest.mark.parametrize("rows", [[0], [0, 1]], ids=["batch1", "batch2"])
def test_identity_schedule_matches_hf_generate(precision_model, images, rows):
    """keep = k1 = 576: tokens equal HF greedy `generate`; per-step logits within ATOL (fp64: 1e-6, fp32: 5e-5 abs)."""
    (precision, loaded), steps = precision_model, 16
    schedule = _schedule(loaded, keep=576, stage1_keep=576)
    assert schedule.is_identity
    imgs, qs = [images[i] for i in rows], [QUESTIONS[i] for i in rows]
    gen = _run_reference(loaded, schedule, imgs, qs, steps)

    inputs = _torch_inputs(loaded, imgs, qs)
    if len(rows) > 1:  # the batch case really has different prompt lengths (left padding)
        assert len(set(inputs["attention_mask"].sum(-1).tolist())) == len(rows)
    with torch.no_grad():
        out = loaded.model.generate(
            **inputs, max_new_tokens=steps, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
    prompt_len = inputs["input_ids"].shape[1]
    eos = loaded.model.generation_config.eos_token_id
    hf_logits = torch.stack(out.logits, 1).float().numpy()  # (B, steps_hf, vocab)
    for b in range(len(rows)):
        hf_tokens = _truncate_at_eos(out.sequences[b, prompt_len:].tolist(), eos)
        ours = gen.token_ids[b]
        common = min(len(ours), len(hf_tokens))
        assert common >= 1
        assert ours[:common] == hf_tokens[:common], f"row {b}"
        # Lengths agree: both stop at the same EOS, or both run the full budget.
        assert len(ours) == len(hf_tokens), f"row {b}: reference {len(ours)} tokens, HF {len(hf_tokens)}"
        for s in range(common):
            _assert_logits_close(gen.logits[s][b], hf_logits[b, s], f"row {b} step {s}", ATOL[precision])
    assert len(gen.logits) == max(len(t) for t in gen.token_ids)


# ---------------------------------------------------------------- 2. stage 1 == HF CLIP attentions


@pytest.mark.parametrize("k1", [490, 200])
def test_stage1_indices_match_hf_attentions(any_model, images, k1):
    """Stage-1 indices equal top-k1 (ascending) of column means of HF CLIP attentions (exact)."""
    loaded = any_model
    rows = [0, 1]
    imgs, qs = [images[i] for i in rows], [QUESTIONS[i] for i in rows]
    gen = _run_reference(loaded, _schedule(loaded, keep=58, stage1_keep=k1), imgs, qs, 1)
    scores = _hf_stage1_scores(loaded, _torch_inputs(loaded, imgs, qs)["pixel_values"])
    assert scores.shape == (len(rows), loaded.spec.num_patches)
    expected = _topk_ascending(scores, k1)
    assert gen.stage1_indices.shape == (len(rows), k1)
    np.testing.assert_array_equal(gen.stage1_indices, expected)


# ---------------------------------------------------------------- 3. stage 2 == HF decoder attentions


@pytest.mark.parametrize("pivot", ["default", 0, "last"])
def test_stage2_indices_match_hf_attentions(any_model, images, pivot):
    """Stage-2 indices equal top-keep (ascending) of the suffix-text rows' head-mean attention at
    layer P of a full, uncached HF language-model forward over the stage-1 sequence (exact)."""
    loaded, keep, k1 = any_model, 58, 490
    L = loaded.spec.text_layers
    P = {"default": None, "last": L - 2}.get(pivot, pivot)
    schedule = _schedule(loaded, keep=keep, stage1_keep=k1, pivot_layer=P)
    P = schedule.pivot_layer
    rows = [0, 1]  # two prompt lengths: left padding in the batch
    imgs, qs = [images[i] for i in rows], [QUESTIONS[i] for i in rows]
    gen = _run_reference(loaded, schedule, imgs, qs, 1)

    embeds, mask, positions, starts, k1 = _hf_stage1_sequence(loaded, _torch_inputs(loaded, imgs, qs), gen.stage1_indices)
    assert gen.seq_lens["segment0"] == embeds.shape[1]
    out = _hf_language_model(loaded, embeds, mask, positions, output_attentions=True)
    attn = out.attentions[P]  # (B, heads, n, n)
    assert len(out.attentions) == L and attn.shape[-1] == embeds.shape[1]
    expected = []
    for b, s in enumerate(starts):
        suffix = torch.arange(s + k1, embeds.shape[1])
        suffix = suffix[mask[b, suffix] > 0]
        assert len(suffix) > 0
        s2 = attn[b][:, suffix][:, :, s : s + k1].mean(dim=0).mean(dim=0)  # (k1,): mean_h mean_t A[h, t, v]
        expected.append(_topk_ascending(s2[None], keep)[0])
    assert gen.stage2_indices.shape == (len(rows), keep)
    np.testing.assert_array_equal(gen.stage2_indices, np.stack(expected))


# ---------------------------------------------------------------- 4. cached generation == from-scratch pruned forward


def test_cached_generation_matches_recompute_from_scratch(precision_model, images):
    """Each step's logits (fp64: 1e-6 abs, fp32: 5e-5 abs) and greedy token (exact) equal a
    from-scratch pruned forward: HF layers 0..P over stage-1 sequence + generated tokens (no cache),
    gather at [prefix | kept visual | suffix | generated] with original positions, layers P+1..L-1,
    final norm, lm_head."""
    precision, loaded = precision_model
    keep, k1, steps = 58, 490, 8
    model = loaded.model
    lm = model.model.language_model
    L = loaded.spec.text_layers
    schedule = _schedule(loaded, keep=keep, stage1_keep=k1)
    P = schedule.pivot_layer
    imgs, qs = [images[2]], [QUESTIONS[2]]
    gen = _run_reference(loaded, schedule, imgs, qs, steps)
    tokens = gen.token_ids[0]
    assert len(tokens) >= 2

    embeds0, mask0, pos0, (start,), k1 = _hf_stage1_sequence(loaded, _torch_inputs(loaded, imgs, qs), gen.stage1_indices)
    n = embeds0.shape[1]
    assert bool((mask0 == 1).all())  # batch 1: no padding, positions 0..n-1
    kept = torch.from_numpy(np.asarray(gen.stage2_indices[0])).long()
    for s, expected_token in enumerate(tokens):
        with torch.no_grad():
            new = model.get_input_embeddings()(torch.tensor([tokens[:s]], dtype=torch.long))  # (1, s, d)
        embeds = torch.cat([embeds0, new], 1)
        total = n + s
        mask = torch.ones(1, total, dtype=torch.long)
        positions = torch.arange(total)[None]
        hidden = _hf_language_model(loaded, embeds, mask, positions, output_hidden_states=True).hidden_states
        assert len(hidden) == L + 1
        h = hidden[P + 1]  # output of layer P, before the final norm (P + 1 < L)
        index = torch.cat([torch.arange(start), start + kept, torch.arange(start + k1, total)])
        h, pos = h[:, index], positions[:, index]
        assert h.shape[1] == n - k1 + keep + s
        with torch.no_grad():
            cos_sin = lm.rotary_emb(h, pos)
            bias = _causal_bias(h.shape[1], h.dtype)
            for i in range(P + 1, L):
                h = lm.layers[i](h, attention_mask=bias, position_embeddings=cos_sin)
            logits = model.lm_head(lm.norm(h[:, -1]))[0].numpy()
        _assert_logits_close(gen.logits[s][0], logits, f"step {s}", ATOL[precision])
        assert int(logits.argmax()) == expected_token, f"step {s}"


# ---------------------------------------------------------------- 5. batch == batch-1 runs


def test_batch_rows_match_single_runs(precision_model, images):
    """A batch of 3 prompts of different lengths: per row, the same stage-1/stage-2 indices and
    tokens (exact) and logits (fp64: 1e-6 abs, fp32: 5e-5 abs) as three batch-1 runs."""
    precision, loaded = precision_model
    steps = 8
    schedule = _schedule(loaded, keep=58)
    rows = [0, 1, 2]
    imgs, qs = [images[i] for i in rows], [QUESTIONS[i] for i in rows]
    lengths = prepare_inputs(loaded.processor, imgs, qs)["attention_mask"].sum(-1)
    assert len(set(lengths.tolist())) == len(rows)
    batch = _run_reference(loaded, schedule, imgs, qs, steps)
    for b in rows:
        single = _run_reference(loaded, schedule, [imgs[b]], [qs[b]], steps)
        np.testing.assert_array_equal(batch.stage1_indices[b], single.stage1_indices[0])
        np.testing.assert_array_equal(batch.stage2_indices[b], single.stage2_indices[0])
        assert batch.token_ids[b] == single.token_ids[0], f"row {b}"
        assert len(single.logits) == len(single.token_ids[0])
        for s in range(len(single.token_ids[0])):
            _assert_logits_close(batch.logits[s][b], single.logits[s][0], f"row {b} step {s}", ATOL[precision])


# ---------------------------------------------------------------- the validator's float64 truth


def test_wide_attention_is_float64_attention():
    """`reference.wide_eager_attention` in float64 against torch's own SDPA (another implementation), with GQA."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 7, 8, dtype=torch.float64, generator=g) * 3 for h in (4, 2, 2))
    mask = torch.zeros(2, 1, 7, 7, dtype=torch.float64).masked_fill(torch.ones(7, 7).triu(1).bool(), torch.finfo(torch.float64).min)
    module = type("Attn", (), {"num_key_value_groups": 2})()
    out, probs = reference.wide_eager_attention(module, q, k, v, mask, 8**-0.5)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=8**-0.5, enable_gqa=True)
    assert probs.dtype == torch.float64
    assert (out - sdpa.transpose(1, 2)).abs().max() < 1e-12


def test_wide_rmsnorm_is_float64_and_hf_is_not():
    """Against an 80-bit (long double) computation: the widened norm is float64-accurate, HF's own is float32-accurate."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    x = torch.randn(3, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 5
    hf = LlamaRMSNorm(64).double()
    wide = copy.deepcopy(hf)
    wide.__class__ = reference.WideRMSNorm
    xl = x.numpy().astype(np.longdouble)
    exact = xl / np.sqrt((xl**2).mean(-1, keepdims=True) + np.longdouble(hf.variance_epsilon))
    err = lambda y: float(np.abs(y.detach().numpy().astype(np.longdouble) - exact).max())  # noqa: E731
    assert err(wide(x)) < 1e-14 < 1e-9 < err(hf(x))


def test_float64_truth_computes_hf_float64(tiny, images):
    """The validator's truth (`reference_pipeline(dtype="float64")`, identity schedule) against HF's own model in
    float64 (`generate`), whose softmax and RMSNorm run in float32: same tokens, logits within float32 accuracy.
    One unpadded row: HF's float64 mask minimum becomes -inf in its float32 softmax, so a padded row gives NaN."""
    schedule = _schedule(tiny, keep=576, stage1_keep=576)
    inp = prepare_inputs(tiny.processor, images[:1], QUESTIONS[:1])
    truth = reference.reference_pipeline(tiny, schedule, dtype="float64").generate(
        inp["pixel_values"], inp["input_ids"], inp["attention_mask"], Sampling(max_new_tokens=6)
    )
    hf = tiny.cast("float64").model
    hf_copy = copy.deepcopy(hf)
    hf_copy.set_attn_implementation("eager")
    for module in hf_copy.modules():  # undo the widening: HF's own numerics
        if type(module) is reference.WideRMSNorm:
            module.__class__ = reference.LlamaRMSNorm
    inputs = {k: torch.from_numpy(v) for k, v in inp.items()}
    inputs["pixel_values"] = inputs["pixel_values"].double()
    with torch.no_grad():
        out = hf_copy.generate(**inputs, max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True)
    for b in range(1):
        for s in range(len(truth.token_ids[b])):
            ours, theirs = truth.logits[s][b], out.logits[s][b].numpy()
            assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 1e-5, f"row {b} step {s}"
        assert truth.token_ids[b] == _truncate_at_eos(out.sequences[b, inp["input_ids"].shape[1]:].tolist(), hf_copy.generation_config.eos_token_id)[: len(truth.token_ids[b])]
