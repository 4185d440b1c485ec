"""A checkpoint in the published llava-hf/llava-1.5-7b-hf layout (star_export/checkpoints.py), exported
through the CLI: old tensor names, fp16 shards, sentencepiece tokenizer, processor and chat-template files."""

from __future__ import annotations

import json

import pytest

from star_export import checkpoints


def test_published_layout_files_and_names(tmp_path):
    """The layout itself, cheaply: tokenizer ids, config numbers, old tensor names (from the meta model)."""
    cfg = checkpoints.config(32, 24)
    assert (cfg["image_token_index"], cfg["pad_token_id"], cfg["vocab_size"], cfg["torch_dtype"]) == (32000, 32001, 32064, "float16")
    names = dict(checkpoints.tensor_shapes(checkpoints.config(2, 2)))
    assert names["language_model.lm_head.weight"] == (32064, 4096)
    assert names["language_model.model.layers.1.mlp.down_proj.weight"] == (4096, 11008)
    assert names["multi_modal_projector.linear_1.weight"] == (4096, 1024)
    assert "vision_tower.vision_model.post_layernorm.weight" in names
    checkpoints.train_tokenizer(tmp_path, seed=0)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001] and (tmp_path / "tokenizer.model").is_file()


@pytest.mark.slow
def test_real_width_published_layout_exports_through_the_cli(tmp_path, capsys):
    """2 decoder / 2 CLIP layers at real widths (1.45 GB fp16), float16 engine with its self-check, and an int4 one."""
    from star_export.cli import export_main, run_main
    from star_export.runtime.inputs import synthetic_image

    ckpt = checkpoints.make_checkpoint(tmp_path / "ckpt", text_layers=2, vision_layers=2, log=lambda s: None)
    shards = json.loads((ckpt / "model.safetensors.index.json").read_text())["weight_map"]
    assert "language_model.model.layers.0.self_attn.q_proj.weight" in shards
    assert export_main(["--model", str(ckpt), "--keep", "58", "--dtype", "float16", "--out", str(tmp_path / "e16")]) == 0
    assert export_main(["--model", str(ckpt), "--keep", "58", "--weights", "int4", "--out", str(tmp_path / "e4")]) == 0
    synthetic_image(0).save(tmp_path / "a.png")
    assert run_main([str(tmp_path / "e4"), "--image", str(tmp_path / "a.png"), "--prompt", "What is in the image?", "--max-new-tokens", "4"]) == 0
