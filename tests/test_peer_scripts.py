"""scripts/gguf_peer.py's tower split (what llama.cpp's legacy converter reads): the CLIP vision weights it writes load
as transformers' CLIPVisionModel and compute the LLaVA model's own vision hidden states; the projector keeps its four
tensors. Both tensor namings: transformers 5's (`vision_tower.embeddings...`) and the published llava-hf one
(`vision_tower.vision_model.embeddings...`)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from star_export.testing import OTHER_SPEC, save_random_llava
from tests.helpers import script


@pytest.mark.parametrize("naming", ["transformers", "published"])
def test_tower_split_loads_as_clip_and_matches_the_llava_tower(tmp_path, naming):
    from transformers import CLIPVisionModel, LlavaForConditionalGeneration

    gguf_peer = script("gguf_peer")
    model_dir = save_random_llava(OTHER_SPEC, tmp_path / "llava", seed=3)
    llava = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    path = next(model_dir.glob("*.safetensors"))
    tensors = load_file(path)
    assert any(k.startswith("vision_tower.embeddings.") for k in tensors)  # as transformers 5 saves it
    if naming == "published":  # the names llava-hf's repositories hold
        tensors = {k.replace("vision_tower.", "vision_tower.vision_model."): v for k, v in tensors.items()}
        save_file(tensors, str(path), metadata={"format": "pt"})
    # the published config lists only what differs from CLIP's defaults
    config = json.loads((model_dir / "config.json").read_text())
    config["vision_config"].pop("layer_norm_eps", None)
    (model_dir / "config.json").write_text(json.dumps(config))

    out = tmp_path / "vit"
    gguf_peer.split_tower(model_dir, out)
    written = json.loads((out / "config.json").read_text())
    assert written["layer_norm_eps"] == 1e-5 and written["vision_feature_layer"] == OTHER_SPEC.vision_feature_layer
    # transformers 4 (which llama.cpp's converters pin) loads CLIPVisionModel from `vision_model.*` names only
    assert all(k.startswith("vision_model.") for k in load_file(out / "model.safetensors"))
    clip = CLIPVisionModel.from_pretrained(out).eval()
    pixels = torch.randn(2, 3, OTHER_SPEC.image_size, OTHER_SPEC.image_size)
    with torch.no_grad():
        ours = clip(pixel_values=pixels, output_hidden_states=True).hidden_states
        theirs = llava.model.vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert len(ours) == len(theirs) == OTHER_SPEC.vision_layers + 1
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    projector = torch.load(out / "llava.projector")
    assert sorted(projector) == [f"multi_modal_projector.linear_{i}.{p}" for i in (1, 2) for p in ("bias", "weight")]
    torch.testing.assert_close(projector["multi_modal_projector.linear_1.weight"],
                               llava.model.multi_modal_projector.linear_1.weight.detach(), rtol=0, atol=0)


def test_tower_split_refuses_a_checkpoint_without_a_tower(tmp_path):
    gguf_peer = script("gguf_peer")
    (tmp_path / "m").mkdir()
    save_file({"lm_head.weight": torch.zeros(2, 2)}, str(tmp_path / "m/model.safetensors"))
    (tmp_path / "m/config.json").write_text(json.dumps({"vision_config": {}}))
    with pytest.raises(SystemExit, match="no LLaVA vision tower"):
        gguf_peer.split_tower(tmp_path / "m", tmp_path / "vit")
