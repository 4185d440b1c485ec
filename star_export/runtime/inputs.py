"""Request preprocessing: images from disk, prompts through the chat template, the saved processor."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .generate import InputError

# the package's names for them
from .images import MAX_IMAGE_PIXELS, ResizeRule, check_pixels, read_image, to_rgb  # noqa: F401


def load_image(path: str | Path, rule: ResizeRule | None = None):
    """An RGB PIL image from a file (runtime/images.py: checked from its header, decoded in full, converted)."""
    return read_image(path, name=f"image {str(path)!r}", rule=rule)


def format_prompt(processor, question: str) -> str:
    """`USER: <image>\\n{question} ASSISTANT:` through the processor's chat template; a prompt that
    already holds one `<image>` is taken as written."""
    if not isinstance(question, str):
        raise InputError(f"a prompt must be text, got {type(question).__name__}")
    check_text(question, "a prompt")
    tags = question.count("<image>")
    if tags > 1:
        raise InputError(
            f"a prompt holds {tags} '<image>' tags; LLaVA-1.5 takes one image per prompt: keep at most one '<image>' "
            "(or none: the chat template adds it)"
        )
    if tags == 1:
        return question
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def check_text(text: str, name: str) -> None:
    """Text the tokenizer can take: valid Unicode (a command line's invalid UTF-8 arrives as lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(f"{name} is not valid UTF-8 text (at character {e.start}): pass UTF-8 text") from None


def prompt_length(processor, question: str, num_vision_tokens: int) -> int:
    """Tokens a request takes: the chat-templated question with its `<image>` expanded to the visual tokens."""
    ids = processor.tokenizer(format_prompt(processor, question))["input_ids"]
    return len(ids) - 1 + num_vision_tokens


def load_requests(images: Sequence[Any], questions: Sequence[str], rule: ResizeRule | None = None) -> list:
    """The requests' images as checked RGB pictures (paths are read, pictures converted), one per question; with
    `rule`, resized as the processor will (runtime/images.py)."""
    if len(images) != len(questions):
        raise InputError(f"{len(images)} image(s) but {len(questions)} prompt(s): give one --image per --prompt")
    if not images:
        raise InputError("no request: give at least one --image/--prompt pair")
    for q in questions:
        if isinstance(q, str):
            check_text(q, "a prompt")
    images = [load_image(i, rule) if isinstance(i, (str, Path)) else to_rgb(i) for i in images]
    for im in images:
        check_pixels(im.size)
    return [rule.fit(im) for im in images] if rule is not None else images


def prepare_inputs(processor, images: Sequence[Any], questions: Sequence[str]) -> dict[str, np.ndarray]:
    """pixel_values (B, 3, H, W) float32, input_ids / attention_mask (B, N) int64, left padded."""
    images = load_requests(images, questions, ResizeRule.from_processor(processor))
    processor.tokenizer.padding_side = "left"
    batch = processor(
        images=list(images), text=[format_prompt(processor, q) for q in questions], padding=True, return_tensors="np"
    )
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
        draw.rectangle(
            [int(x0), int(y0), int(x0 + w), int(y0 + h)], fill=tuple(int(c) for c in rng.integers(0, 255, 3))
        )
    return im
