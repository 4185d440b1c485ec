"""Request preprocessing: images from disk, prompts through the chat template, the saved processor."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .generate import InputError


def load_image(path: str | Path):
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise InputError(f"image {str(path)!r} does not exist: pass the path of a PNG/JPEG file with --image")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"image {str(path)!r} is not a readable image ({e.__class__.__name__}): pass a PNG/JPEG file") from e


def format_prompt(processor, question: str) -> str:
    """`USER: <image>\\n{question} ASSISTANT:` through the processor's chat template; a prompt that
    already holds `<image>` is taken as written."""
    if "<image>" in question:
        return question
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def prepare_inputs(processor, images: Sequence[Any], questions: Sequence[str]) -> dict[str, np.ndarray]:
    """pixel_values (B, 3, H, W) float32, input_ids / attention_mask (B, N) int64, left padded."""
    if len(images) != len(questions):
        raise InputError(f"{len(images)} image(s) but {len(questions)} prompt(s): give one --image per --prompt")
    if not images:
        raise InputError("no request: give at least one --image/--prompt pair")
    images = [load_image(i) if isinstance(i, (str, Path)) else i for i in images]
    processor.tokenizer.padding_side = "left"
    batch = processor(images=list(images), text=[format_prompt(processor, q) for q in questions], padding=True, return_tensors="np")
    return {
        "pixel_values": batch["pixel_values"].astype(np.float32),
        "input_ids": batch["input_ids"].astype(np.int64),
        "attention_mask": batch["attention_mask"].astype(np.int64),
    }


def synthetic_image(seed: int = 0, size: int = 336):
    """A deterministic test picture: smooth colour gradients plus a few rectangles."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, (x + y) / 2], -1) * rng.uniform(100, 255, 3)
    im = Image.fromarray(base.astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(4):
        x0, y0 = rng.integers(0, size - 60, 2)
        w, h = rng.integers(30, 120, 2)
        draw.rectangle([int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    return im
