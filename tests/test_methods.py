"""FastV and FasterVLM as schedules of the same engine (config.METHODS): each method's kept indices equal an independent
computation from the unmodified HF model's attentions (`output_attentions`), on tiny-llava and on a model unlike it
(grouped-query attention, other widths and depth), in a left-padded batch of two prompt lengths; and engines of each
method export, run and pass star-validate.
"""

import json
from pathlib import Path

import numpy as np
import pytest

import star_export
from conftest import QUESTIONS
from star_export.config import ScheduleError, StarSchedule
from test_reference import (
    _feature_layer_indices,
    _hf_language_model,
    _hf_stage1_sequence,
    _run_reference,
    _topk_ascending,
    _torch_inputs,
    _vision_outputs,
)

ROWS = [0, 1]  # two prompt lengths: left padding


def test_methods_set_their_scorers_and_budgets(tiny):
    spec = tiny.spec
    fastv = StarSchedule.from_spec(spec, keep=58, method="fastv")
    assert (fastv.stage1_scorer, fastv.stage2_scorer, fastv.stage1_keep, fastv.pivot_layer) == ("none", "last", 576, 1)
    faster = StarSchedule.from_spec(spec, keep=58, method="fastervlm")
    assert (faster.stage1_scorer, faster.stage2_scorer, faster.stage1_keep, faster.keep) == ("cls", "none", 58, 58)
    assert StarSchedule.from_spec(spec, keep=58, method="fastv", pivot_layer=2).pivot_layer == 2  # flags override
    assert fastv.method == "fastv" and faster.method == "fastervlm"
    assert StarSchedule.from_spec(spec, keep=58).method == "star"
    with pytest.raises(ScheduleError, match="stage 2 prunes nothing"):
        StarSchedule.from_spec(spec, keep=29, stage1_keep=58, method="fastervlm")
    with pytest.raises(ScheduleError, match="stage 1 prunes nothing"):
        StarSchedule.from_spec(spec, keep=58, stage1_keep=490, method="fastv")
    with pytest.raises(ScheduleError, match="--method"):
        StarSchedule.from_spec(spec, keep=58, method="sparsevlm")


def test_fastervlm_keeps_the_top_cls_attention_patches(any_model, images):
    """Stage 1 keeps the `keep` patches the [CLS] query attends to most (head mean) at the feature layer of HF's vision
    tower; stage 2 keeps them all."""
    loaded, keep = any_model, 58
    schedule = StarSchedule.from_spec(loaded.spec, keep=keep, method="fastervlm", defaults=loaded.defaults)
    imgs, qs = [images[i] for i in ROWS], [QUESTIONS[i] for i in ROWS]
    gen = _run_reference(loaded, schedule, imgs, qs, 1)
    _, a_idx = _feature_layer_indices(loaded)
    attn = _vision_outputs(loaded, _torch_inputs(loaded, imgs, qs)["pixel_values"]).attentions[a_idx]  # (B, h, T, T)
    cls_row = attn.mean(dim=1)[:, 0, 1:]  # (B, patches): the [CLS] query over the patch columns
    np.testing.assert_array_equal(gen.stage1_indices, _topk_ascending(cls_row, keep))
    np.testing.assert_array_equal(gen.stage2_indices, np.tile(np.arange(keep), (len(ROWS), 1)))


def test_fastv_keeps_the_image_tokens_the_last_prompt_token_attends_to(any_model, images):
    """Nothing pruned in the vision tower; at layer P = 1 of a full, uncached HF language-model forward over the unpruned
    sequence, the last prompt token's head-mean attention over the image tokens picks the `keep` kept."""
    loaded, keep = any_model, 58
    schedule = StarSchedule.from_spec(loaded.spec, keep=keep, method="fastv", defaults=loaded.defaults)
    n_visual = loaded.spec.num_vision_tokens
    imgs, qs = [images[i] for i in ROWS], [QUESTIONS[i] for i in ROWS]
    gen = _run_reference(loaded, schedule, imgs, qs, 1)
    np.testing.assert_array_equal(gen.stage1_indices, np.tile(np.arange(n_visual), (len(ROWS), 1)))
    embeds, mask, positions, starts, k1 = _hf_stage1_sequence(loaded, _torch_inputs(loaded, imgs, qs), gen.stage1_indices)
    assert k1 == n_visual
    attn = _hf_language_model(loaded, embeds, mask, positions, output_attentions=True).attentions[1]  # (B, h, n, n)
    expected = []
    for b, s in enumerate(starts):
        last = embeds.shape[1] - 1  # left padded: every row's last token is the last column
        assert mask[b, last] == 1
        scores = attn[b, :, last, s : s + k1].mean(dim=0)  # (k1,)
        expected.append(_topk_ascending(scores[None], keep)[0])
    np.testing.assert_array_equal(gen.stage2_indices, np.stack(expected))


@pytest.mark.parametrize("method", ["fastv", "fastervlm"])
def test_engines_of_each_method_export_run_and_validate(method, tmp_path, images, capsys):
    """star-export --method M self-checks the engine against the float64 reference (exit 0); star.json records the
    scorers; star-run runs it."""
    from star_export.cli import export_main, run_main

    out = tmp_path / method
    assert export_main(["--out", str(out), "--method", method, "--keep", "29", "--quiet", "--max-new-tokens", "4"]) == 0
    schedule = json.loads((out / "star.json").read_text())["schedule"]
    want = {"fastv": ("none", "last"), "fastervlm": ("cls", "none")}[method]
    assert (schedule["stage1_scorer"], schedule["stage2_scorer"]) == want
    capsys.readouterr()
    image = str(Path(star_export.__file__).parent / "assets" / "example.png")
    assert run_main([str(out), "--image", image, "--prompt", QUESTIONS[0], "--max-new-tokens", "3", "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert len(result["token_ids"]) == 3 and len(result["stage2_indices"]) == 29
    if method == "fastervlm":
        assert result["stage2_indices"] == list(range(29))
    else:
        assert result["stage1_indices"] == list(range(576))
