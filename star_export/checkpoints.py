"""Write a random LLaVA-1.5 checkpoint laid out like the published `llava-hf/llava-1.5-7b-hf` repository.

    python -m star_export.checkpoints OUT [--text-layers 32] [--vision-layers 24] [--std 0.02] [--seed 0]

What it writes, as the published repository holds it: `config.json` (`image_token_index` 32000, `pad_token_id`
32001, vocab 32064, `torch_dtype` float16), fp16 safetensors shards of at most 5 GB with the OLD tensor names
(`language_model.model.layers.N...`, `language_model.lm_head.weight`, `vision_tower.vision_model...`,
`multi_modal_projector.linear_{1,2}`) and `model.safetensors.index.json`, all CLIP layers and
`post_layernorm`, a sentencepiece Llama tokenizer (32000 pieces, byte fallback, trained offline here) with
`<image>` / `<pad>` added (`tokenizer.model`, `tokenizer.json`, `tokenizer_config.json`),
`preprocessor_config.json`, `processor_config.json`, `chat_template.json`, `generation_config.json`.

Memory: tensors are generated and written one at a time (the largest, lm_head / embed_tokens in float32
while drawn, is 0.5 GB), so the full 7B layout (14 GB) is written on a small machine. The directory
appears only when complete (built in `OUT.tmp-<pid>`, then renamed).
Random weights: Linear / Embedding ~ N(0, std), norm weights 1, biases 0; CLIP q/k projections x4 so that
stage-1 rankings are not near-ties.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import struct
import sys
import time
from pathlib import Path

import torch

SHARD_BYTES = 5_000_000_000  # "5GB", as the published shards
IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"

CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}{% "
    "endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{% generation %}"
    "{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
PREPROCESSOR = {
    "crop_size": {"height": 336, "width": 336},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_processor_type": "CLIPImageProcessor",
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "processor_class": "LlavaProcessor",
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 336},
}
PROCESSOR = {
    "image_token": IMAGE_TOKEN,
    "num_additional_image_tokens": 1,
    "patch_size": 14,
    "processor_class": "LlavaProcessor",
    "vision_feature_select_strategy": "default",
}


def config(text_layers: int, vision_layers: int) -> dict:
    """The published config.json (Llama and CLIP widths are their classes' defaults there, as here)."""
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "ignore_index": -100,
        "image_token_index": 32000,
        "model_type": "llava",
        "pad_token_id": 32001,
        "projector_hidden_act": "gelu",
        "text_config": {
            "_name_or_path": "lmsys/vicuna-7b-v1.5",
            "architectures": ["LlamaForCausalLM"],
            "max_position_embeddings": 4096,
            "model_type": "llama",
            "rms_norm_eps": 1e-05,
            "torch_dtype": "float16",
            "vocab_size": 32064,
            "num_hidden_layers": text_layers,
        },
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.36.0.dev0",
        "vision_config": {
            "hidden_size": 1024,
            "image_size": 336,
            "intermediate_size": 4096,
            "model_type": "clip_vision_model",
            "num_attention_heads": 16,
            "num_hidden_layers": vision_layers,
            "patch_size": 14,
            "projection_dim": 768,
            "vocab_size": 32000,
        },
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "vocab_size": 32064,
    }


def old_name(name: str) -> str:
    """transformers 5 parameter name -> the name in the published (transformers 4.36) checkpoint."""
    for new, old in (
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ):
        if name.startswith(new):
            return old + name[len(new) :]
    raise KeyError(name)


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(old name, shape) of every persistent tensor, from the real class built on the meta device (no memory)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(LlavaConfig(**cfg))
    return [(old_name(k), tuple(v.shape)) for k, v in model.state_dict().items()]


def draw(name: str, shape: tuple[int, ...], std: float, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + int(hashlib.sha256(name.encode()).hexdigest()[:12], 16))
    if name.endswith(("norm.weight", "layrnorm.weight", "layer_norm1.weight", "layer_norm2.weight")):
        return torch.ones(shape, dtype=torch.float16)
    if name.endswith(".bias"):
        return torch.zeros(shape, dtype=torch.float16)
    t = torch.randn(shape, generator=gen) * std
    if "vision_tower" in name and (".q_proj." in name or ".k_proj." in name):
        t *= 4
    return t.to(torch.float16)


def write_shards(directory: Path, shapes, std: float, seed: int, log) -> dict:
    """Stream the tensors into safetensors shards (header first, then each tensor as drawn); returns the index."""
    nbytes = lambda shape: 2 * int(torch.Size(shape).numel())  # noqa: E731  (float16)
    shards, current, size = [], [], 0
    for name, shape in shapes:
        if current and size + nbytes(shape) > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes(shape)
    shards.append(current)
    weight_map, total, t0 = {}, 0, time.perf_counter()
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape in shard:
            header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + nbytes(shape)]}
            offset += nbytes(shape)
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(directory / file, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)) + raw)
            for name, shape in shard:
                fh.write(draw(name, shape, std, seed).numpy().tobytes())
                weight_map[name] = file
        total += offset
        log(f"{file}: {len(shard)} tensors, {offset / 1e9:.2f} GB ({time.perf_counter() - t0:.0f} s)")
    return {"metadata": {"total_size": total}, "weight_map": weight_map}


def train_tokenizer(directory: Path, seed: int) -> None:
    """A 32000-piece sentencepiece BPE (byte fallback, like Llama's) trained offline on pseudo-words, then the
    transformers Llama tokenizer built from it with `<image>` = 32000 and `<pad>` = 32001 added."""
    import io

    import sentencepiece as spm
    from tokenizers.models import BPE
    from transformers import LlamaTokenizer
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 9))) for _ in range(60000)]
    words += "USER ASSISTANT What is in the image Describe picture How many objects are there colour".split()
    lines = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(40000)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        vocab_size=32000,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=2,
        minloglevel=2,
        split_digits=True,
    )
    (directory / "tokenizer.model").write_bytes(model.getvalue())
    pieces = SentencePieceExtractor(str(directory / "tokenizer.model")).extract(BPE)
    tok = LlamaTokenizer(
        vocab=pieces["vocab"], merges=pieces["merges"], legacy=False, add_bos_token=True, model_max_length=4096
    )
    tok.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tok.add_special_tokens({"pad_token": PAD_TOKEN})
    assert tok.convert_tokens_to_ids([IMAGE_TOKEN, PAD_TOKEN]) == [32000, 32001], "added tokens must be 32000, 32001"
    tok.save_pretrained(directory)


def make_checkpoint(
    out: str | Path, *, text_layers: int = 32, vision_layers: int = 24, std: float = 0.02, seed: int = 0, log=print
) -> Path:
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists: pass a new directory")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        cfg = config(text_layers, vision_layers)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        (tmp / "generation_config.json").write_text(
            json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32001}, indent=2)
        )
        (tmp / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2))
        (tmp / "processor_config.json").write_text(json.dumps(PROCESSOR, indent=2))
        (tmp / "chat_template.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}, indent=2))
        train_tokenizer(tmp, seed)
        index = write_shards(tmp, tensor_shapes(cfg), std, seed, log)
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="new directory to write")
    p.add_argument("--text-layers", type=int, default=32, help="decoder layers (published: 32)")
    p.add_argument("--vision-layers", type=int, default=24, help="CLIP layers (published: 24)")
    p.add_argument("--std", type=float, default=0.02, help="std of Linear / Embedding weights (HF initializer_range)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.text_layers < 2 or a.vision_layers < 2:
        p.error("--text-layers and --vision-layers: allowed >= 2")
    try:
        make_checkpoint(
            a.out,
            text_layers=a.text_layers,
            vision_layers=a.vision_layers,
            std=a.std,
            seed=a.seed,
            log=lambda s: print(s, file=sys.stderr, flush=True),
        )
    except FileExistsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
