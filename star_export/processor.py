"""An engine's saved processor, read without transformers: the `tokenizers` tokenizer from `tokenizer.json`, the chat
template rendered by jinja2, CLIP's image preprocessing in Pillow and NumPy.

transformers' `AutoProcessor` takes 3-6 s to import and load (its image processors import torch) where the engine's
graphs load in about one; the runtime needs only what LLaVA-1.5's processor does:
- text: the chat template rendered as transformers renders it (a sandboxed jinja2 environment, `trim_blocks`,
  `lstrip_blocks`, the special tokens as variables, `{% generation %}` blocks passed through), each `<image>` expanded
  to the image's token count, encoded by `tokenizer.json` (what transformers' tokenizer runs: it loads that file as
  its generic fast backend), left padded with the pad token;
- pixels: transformers' PIL backend of `CLIPImageProcessor`: the short edge to `size.shortest_edge` with Pillow
  (`resample`), a centre crop to `crop_size` (zero padded where smaller), x `rescale_factor` in float64 then float32,
  `(x - mean) / std` in float32, channels first.
tests/test_processor.py proves the outputs bitwise equal to `AutoProcessor`'s on the tiny model's and the published
layout's processors. A processor outside this (another processor or image processor class, a template jinja2 cannot
compile here, token-space clean-up on decode) is not read here: `read_processor` returns None and the engine loads
transformers' own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .config import ModelSpec

PROCESSOR_CLASSES = ("LlavaProcessor",)
IMAGE_PROCESSOR_TYPES = ("CLIPImageProcessor", "CLIPImageProcessorPil")
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")

# The tiny model's chat template, and every processor's that has none: LLaVA-1.5's conversation format.
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for item in message['content'] if item['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for item in message['content'] if item['type'] == 'text' %}{{ item['text'] + ' ' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def normalize_processor(processor, spec: ModelSpec):
    """LlavaProcessor expands `<image>` into the right count only with these set; left padding; a pad token (the
    unknown or end token where the tokenizer has none); LLaVA-1.5's chat template where the processor has none.
    transformers' processor and this module's `Processor` alike."""
    if getattr(processor, "patch_size", None) is None:
        processor.patch_size = spec.patch_size
    if getattr(processor, "vision_feature_select_strategy", None) is None:
        processor.vision_feature_select_strategy = spec.vision_feature_select_strategy
    processor.num_additional_image_tokens = 1  # CLIP's CLS token
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.unk_token or processor.tokenizer.eos_token
    if not getattr(processor, "chat_template", None):
        processor.chat_template = CHAT_TEMPLATE
    return processor


class Unsupported(Exception):
    """A saved processor this module does not reproduce (transformers' own is loaded instead)."""


def resize_target(size: tuple[int, int], shortest_edge: int) -> tuple[int, int]:
    """(width, height) CLIP's processor resizes an image of `size` (width, height) to: the short edge to
    `shortest_edge`, the long one to int(shortest_edge * long / short) (transformers' get_resize_output_image_size)."""
    width, height = size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


# ------------------------------------------------------------------ text
class Tokenizer:
    """The subset of transformers' fast tokenizer the runtime calls, over the same `tokenizers.Tokenizer`."""

    def __init__(self, backend, config: dict[str, Any]):
        self.backend = backend
        self.padding_side = "left"
        extra = config.get("model_specific_special_tokens") or {}
        self.special_tokens_map = {
            k: v for k, v in ((k, _content(config.get(k))) for k in SPECIAL_TOKENS) if isinstance(v, str)
        } | {k: v for k, v in extra.items() if isinstance(v, str)}
        self.pad_token = self.special_tokens_map.get("pad_token")
        self.unk_token = self.special_tokens_map.get("unk_token")
        self.eos_token = self.special_tokens_map.get("eos_token")

    @classmethod
    def from_file(cls, path: Path, config: dict[str, Any]) -> "Tokenizer":
        from tokenizers import Tokenizer as Backend

        if config.get("clean_up_tokenization_spaces") and (
            json.loads(path.read_text()).get("model", {}).get("type") != "BPE"
            or config.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output")
        ):
            raise Unsupported("clean_up_tokenization_spaces")
        backend = Backend.from_file(str(path))
        # A saved tokenizer.json may carry the padding or truncation of the last call before it was saved; transformers
        # sets both at every call (none here: the processor pads itself, and nothing is truncated)
        backend.no_padding()
        backend.no_truncation()
        return cls(backend, config)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self.backend.token_to_id(self.pad_token)

    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": self.backend.encode(text).ids}

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts))]

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def convert_tokens_to_ids(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab()


def _content(token: Any) -> Any:
    """A special token as saved: its text, or an AddedToken's dict."""
    return token.get("content") if isinstance(token, dict) else token


def compile_template(source: str):
    """The chat template in the environment transformers renders it in (utils/chat_template_utils.py)."""
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):  # `{% generation %}...{% endgeneration %}`: marks assistant text; renders its body
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise Unsupported(f"chat template: {e}") from None


# ------------------------------------------------------------------ pixels
@dataclass(frozen=True)
class ImageProcessor:
    """CLIPImageProcessor's settings (the attribute names transformers gives them) and its PIL-backend computation."""

    size: dict
    crop_size: dict
    resample: int = 3  # PIL.Image.Resampling.BICUBIC
    rescale_factor: float = 1 / 255
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    backend: str = "pil"  # resizing before this processor, as it resizes, leaves its output unchanged (images.py)

    @classmethod
    def from_config(cls, ip: dict[str, Any]) -> "ImageProcessor":
        if ip.get("image_processor_type") not in IMAGE_PROCESSOR_TYPES:
            raise Unsupported(f"image processor {ip.get('image_processor_type')!r}")
        size, crop = ip.get("size") or {}, ip.get("crop_size") or {}
        if set(size) != {"shortest_edge"} or (ip.get("do_center_crop", True) and set(crop) != {"height", "width"}):
            raise Unsupported(f"image sizes {size}, {crop}")
        if ip.get("do_convert_rgb") is False or ip.get("do_pad") or not isinstance(ip.get("resample", 3), int):
            raise Unsupported("image conversion")
        fields = ("resample", "rescale_factor", "do_resize", "do_center_crop", "do_rescale", "do_normalize")
        return cls(
            size=dict(size),
            crop_size=dict(crop),
            image_mean=tuple(ip.get("image_mean", cls.image_mean)),
            image_std=tuple(ip.get("image_std", cls.image_std)),
            **{k: ip[k] for k in fields if k in ip},
        )

    def __call__(self, image) -> np.ndarray:
        """An RGB PIL image -> (3, H, W) float32."""
        if self.do_resize:
            target = resize_target(image.size, self.size["shortest_edge"])
            if target != image.size:
                image = image.resize(target, resample=self.resample, reducing_gap=None)
        x = np.asarray(image).transpose(2, 0, 1)
        if self.do_center_crop:
            x = center_crop(x, self.crop_size["height"], self.crop_size["width"])
        if self.do_rescale:
            x = (x.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            x = x.astype(np.float32, copy=False)
            mean, std = (np.array(v, dtype=np.float32)[:, None, None] for v in (self.image_mean, self.image_std))
            x = (x - mean) / std
        return x


def center_crop(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """The centre (height, width) of a (C, H, W) array; zero padded (centred) where the image is smaller."""
    h, w = x.shape[-2:]
    top, left = (h - height) // 2, (w - width) // 2
    if top >= 0 and left >= 0:
        return x[:, top : top + height, left : left + width]
    out = np.zeros(x.shape[:-2] + (max(h, height), max(w, width)), dtype=x.dtype)
    pad_top, pad_left = -(-(out.shape[-2] - h) // 2), -(-(out.shape[-1] - w) // 2)
    out[:, pad_top : pad_top + h, pad_left : pad_left + w] = x
    return center_crop(out, height, width)


# ------------------------------------------------------------------ the processor
class Processor:
    """LlavaProcessor's runtime calls: `apply_chat_template`, `__call__(images=, text=, padding=True)`, `.tokenizer`,
    `.image_processor`, `.image_token`."""

    def __init__(self, tokenizer: Tokenizer, image_processor: ImageProcessor, config: dict[str, Any], template: str):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.image_token = config.get("image_token", "<image>")
        self.patch_size = config.get("patch_size")
        self.vision_feature_select_strategy = config.get("vision_feature_select_strategy")
        self.num_additional_image_tokens = config.get("num_additional_image_tokens", 0)
        self.chat_template = template

    @property
    def chat_template(self) -> str | None:
        return self._source

    @chat_template.setter
    def chat_template(self, source: str | None) -> None:
        self._source, self._template = source, compile_template(source) if source else None

    def apply_chat_template(self, conversation: list[dict], add_generation_prompt: bool = False) -> str:
        if self._template is None:
            raise ValueError("the processor has no chat template")
        return self._template.render(
            messages=conversation,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **self.tokenizer.special_tokens_map,
        )

    def image_tokens(self, pixels: np.ndarray) -> int:
        height, width = pixels.shape[-2:]
        count = (height // self.patch_size) * (width // self.patch_size) + self.num_additional_image_tokens
        return count - 1 if self.vision_feature_select_strategy == "default" else count

    def __call__(self, images: Sequence[Any], text: Sequence[str], padding: bool = True, return_tensors: str = "np"):
        """One RGB picture per text: pixel_values (B, 3, H, W) float32, input_ids / attention_mask (B, N) int64,
        padded on `tokenizer.padding_side`."""
        pixels = [self.image_processor(im) for im in images]
        expanded = [t.replace(self.image_token, self.image_token * self.image_tokens(p)) for t, p in zip(text, pixels)]
        ids = self.tokenizer.encode_batch(expanded)
        width = max(len(row) for row in ids)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = np.full((len(ids), width), pad, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for b, row in enumerate(ids):
            span = slice(width - len(row), width) if self.tokenizer.padding_side == "left" else slice(0, len(row))
            input_ids[b, span], mask[b, span] = row, 1
        return {"pixel_values": np.stack(pixels), "input_ids": input_ids, "attention_mask": mask}


def read_processor(directory: Path, spec: ModelSpec) -> Processor | None:
    """The saved processor in `directory` (an engine's processor/), normalized as transformers' is
    (`normalize_processor`), or None where it is one this module does not reproduce. Broken files raise (OSError,
    ValueError, tokenizers' Exception): the caller reports them."""
    config = json.loads((directory / "processor_config.json").read_text())
    if config.get("processor_class") not in PROCESSOR_CLASSES or not (directory / "tokenizer.json").is_file():
        return None
    try:
        image_processor = ImageProcessor.from_config(config.get("image_processor") or {})
        tok_config = json.loads((directory / "tokenizer_config.json").read_text())
        tokenizer = Tokenizer.from_file(directory / "tokenizer.json", tok_config)
        template = _saved_template(directory) or config.get("chat_template")
        return normalize_processor(Processor(tokenizer, image_processor, config, template), spec)
    except Unsupported:
        return None


def _saved_template(directory: Path) -> str | None:
    """The chat template as transformers finds it: chat_template.jinja, else chat_template.json's."""
    if (directory / "chat_template.jinja").is_file():
        return (directory / "chat_template.jinja").read_text()
    if (directory / "chat_template.json").is_file():
        return json.loads((directory / "chat_template.json").read_text()).get("chat_template")
    return None
