"""Request preprocessing: images from disk, prompts through the chat template, the saved processor."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .generate import InputError


MAX_IMAGE_PIXELS = 64_000_000  # 64 megapixels, e.g. 8000 x 8000: far above what the 336-px tower uses


def load_image(path: str | Path):
    """An RGB PIL image from a file. The pixel count is checked from the header, before any pixel is decoded
    (a decompression bomb is refused without reading it); every mode Pillow opens is converted (to_rgb)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.is_dir():
        raise InputError(f"image {str(path)!r} is a directory: pass the path of an image file (PNG, JPEG, ...) with --image")
    if not path.is_file():
        raise InputError(f"image {str(path)!r} does not exist: pass the path of a PNG/JPEG file with --image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:  # reads the header only
                check_pixels(im.size, f"image {str(path)!r}")
                return to_rgb(im)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"image {str(path)!r} declares too many pixels ({e}): limit {MAX_IMAGE_PIXELS:,}; downscale it") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputError(f"image {str(path)!r} is not a readable image ({e.__class__.__name__}): pass a PNG/JPEG file") from e


def check_pixels(size: tuple[int, int], name: str = "image") -> None:
    width, height = size
    if width < 1 or height < 1:
        raise InputError(f"{name} is empty ({width} x {height} pixels)")
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(f"{name} has {width} x {height} = {width * height:,} pixels, over the limit of {MAX_IMAGE_PIXELS:,}: downscale it")


def to_rgb(im):
    """8-bit RGB from any Pillow mode: high bit depths are scaled, not clipped (a 16-bit PNG opens as 'I;16' or
    'I'), transparency is composited onto white, EXIF orientation is applied, palette / CMYK / LAB / YCbCr convert."""
    from PIL import Image, ImageOps

    if im.mode == "RGB" and im.getexif().get(0x0112, 1) == 1:
        return im  # already what the processor takes (e.g. converted once before)
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float64)
        if im.mode == "F":
            top = 1.0 if a.max(initial=0.0) <= 1.0 else 255.0  # floats in [0, 1], else taken as 0..255
        else:
            top = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        im = Image.fromarray(np.clip(np.rint(a / top * 255.0), 0, 255).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def format_prompt(processor, question: str) -> str:
    """`USER: <image>\\n{question} ASSISTANT:` through the processor's chat template; a prompt that
    already holds one `<image>` is taken as written."""
    if not isinstance(question, str):
        raise InputError(f"a prompt must be text, got {type(question).__name__}")
    tags = question.count("<image>")
    if tags > 1:
        raise InputError(f"a prompt holds {tags} '<image>' tags; LLaVA-1.5 takes one image per prompt: keep at most one '<image>' (or none: the chat template adds it)")
    if tags == 1:
        return question
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def prompt_length(processor, question: str, num_vision_tokens: int) -> int:
    """Tokens a request takes: the chat-templated question with its `<image>` expanded to the visual tokens."""
    ids = processor.tokenizer(format_prompt(processor, question))["input_ids"]
    return len(ids) - 1 + num_vision_tokens


def load_requests(images: Sequence[Any], questions: Sequence[str]) -> list:
    """The requests' images as checked RGB pictures (paths are read, pictures converted), one per question."""
    if len(images) != len(questions):
        raise InputError(f"{len(images)} image(s) but {len(questions)} prompt(s): give one --image per --prompt")
    if not images:
        raise InputError("no request: give at least one --image/--prompt pair")
    images = [load_image(i) if isinstance(i, (str, Path)) else to_rgb(i) for i in images]
    for im in images:
        check_pixels(im.size)
    return images


def prepare_inputs(processor, images: Sequence[Any], questions: Sequence[str]) -> dict[str, np.ndarray]:
    """pixel_values (B, 3, H, W) float32, input_ids / attention_mask (B, N) int64, left padded."""
    images = load_requests(images, questions)
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
