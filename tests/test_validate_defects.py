"""The validator fails, naming the cause, on engines with planted defects.

Each defect is planted in the graph modules (or the weights) only while the engine is exported; the check
then runs against the correct eager reference, as a user's `star-validate` would.
"""

import copy

import pytest
import torch

import star_export.graphs.decoder as decoder
import star_export.graphs.vision as vision
from star_export.config import StarSchedule
from star_export.export.write import write_engine
from star_export.validate import validate_engine

LIMITS = {"max_batch_size": 4, "max_input_len": 2048, "max_new_tokens": 32}


def _perturbed_weight(tiny):
    """One decoder weight (layer 0's o_proj) off by 1e-3 relative: a conversion bug, same source fingerprint."""
    bad = copy.copy(tiny)
    bad.model, bad._casts = copy.deepcopy(tiny.model), {}
    with torch.no_grad():
        bad.model.model.language_model.layers[0].self_attn.o_proj.weight.mul_(1 + 1e-3)
    return bad


def _new_positions(m):
    """Kept tokens renumbered 0..n'-1 instead of keeping their original position ids."""
    forward = decoder.Pivot.forward

    def renumbered(self, hidden_states, stage2_scores, attention_mask, position_ids, image_start, stage2_indices=None):
        hidden, mask, positions, kept = forward(self, hidden_states, stage2_scores, attention_mask, position_ids, image_start, stage2_indices)
        return hidden, mask, torch.cumsum(torch.ones_like(positions), 1) - 1, kept

    m.setattr(decoder.Pivot, "forward", renumbered)


def _pivot_off_by_one(m):
    """Stage-2 scores taken at layer P - 1 while the split stays at P."""
    def forward(self, inputs_embeds, attention_mask, position_ids, suffix_rows, *past_key_values):
        hidden, scores, new = self._run(inputs_embeds, attention_mask, position_ids, past_key_values, self.pivot_layer - 1, suffix_rows)
        return (hidden, scores, *new)

    m.setattr(decoder.Segment0, "forward", forward)


def _cls_scored(m):
    """CLS not dropped before stage-1 scoring: the scores are read one column early."""
    scores = vision.STAGE1["star"]
    m.setitem(vision.STAGE1, "star", lambda probs, num_prefix: scores(probs, 0)[:, : probs.shape[-1] - num_prefix])


def _not_resorted(m):
    """Stage-2 kept indices left in score order instead of re-sorted ascending."""
    m.setattr(decoder, "keep_topk", lambda scores, k: torch.topk(scores, k, dim=-1).indices)


def _kv_swapped(m):
    """Segments hand back each layer's new cache entries as (value, key)."""
    attend = decoder.attend

    def swapped(*args):
        out, probs, key, value = attend(*args)
        return out, probs, value, key

    m.setattr(decoder, "attend", swapped)


def _suffix_unmasked(m):
    """Stage-2 scores averaged over every query row, not only the text after the image."""
    scores = decoder.stage2_scores
    m.setattr(decoder, "stage2_scores", lambda probs, rows: scores(probs, torch.ones_like(rows)))


def _fp16_overflow(m):
    """Queries pre-scaled by 1e5 in the model's dtype, the scale undone after q.k: harmless in float32, inf in
    float16. The scale is a full tensor: ONNX Runtime folds a scalar one into the MatMul (computed in float32)."""
    attend = decoder.attend

    class Scaled:  # the layer's attention with q_proj's output scaled up and the softmax scale down
        def __init__(self, attn):
            self.attn, self.scaling = attn, attn.scaling / 1e5

        def q_proj(self, x):
            q = self.attn.q_proj(x)
            return q * torch.full_like(q, 1e5)

        def __getattr__(self, name):
            return getattr(self.attn, name)

    m.setattr(decoder, "attend", lambda attn, *args: attend(Scaled(attn), *args))


# defect -> (dtype, plant, words in the name of a failing check, words in its cause)
DEFECTS = {
    "weight-1e-3": ("float32", None, "segment0[prefill] hidden_states", "> budget"),
    "new-positions": ("float32", _new_positions, "pruned_position_ids", "differs"),
    "pivot-off-by-one": ("float32", _pivot_off_by_one, "segment0[prefill] stage2_scores", "> budget"),
    "cls-scored": ("float32", _cls_scored, "stage1_indices", "different tokens kept"),
    "not-resorted": ("float32", _not_resorted, "stage2_indices", "ascending"),
    "kv-swapped": ("float32", _kv_swapped, "new_key_values.*", "> budget"),
    "suffix-unmasked": ("float32", _suffix_unmasked, "stage2_scores", "> budget"),
    "fp16-overflow": ("float16", _fp16_overflow, "segment", "non-finite"),
}


def test_every_defect_has_a_case():
    assert len(DEFECTS) >= 8


@pytest.mark.parametrize("defect", sorted(DEFECTS))
def test_planted_defect_is_caught_and_named(defect, tiny, tmp_path, monkeypatch):
    dtype, plant, name_words, cause_words = DEFECTS[defect]
    schedule = StarSchedule.from_spec(tiny.spec, keep=58, defaults=tiny.defaults)
    source = _perturbed_weight(tiny) if plant is None else tiny
    with monkeypatch.context() as m:
        if plant is not None:
            plant(m)
        write_engine(source, schedule, tmp_path, dtype=dtype, backend="onnx", limits=LIMITS)
    report = validate_engine(tmp_path, loaded=tiny, max_new_tokens=4)
    failed = [c for c in report.checks if not c.ok]
    assert failed, f"{defect} passed:\n{report.table()}"
    assert any(name_words in c.name and cause_words in c.cause for c in failed), report.table()
    assert "FAILED" in report.table() and all(f"cause: {c.name}" in report.table() for c in failed)
