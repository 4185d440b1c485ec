"""Images, from a file or from bytes, through one function (`read_image`) for star-run, star-validate, star-serve and
Triton: checked from the header before any pixel is decoded, decoded in full before the file closes, converted to
8-bit RGB, and brought to the size LLaVA's processor resizes to, exactly as it would.

Bounds (both from the header, before decoding):
- pixels: at most `MAX_IMAGE_PIXELS` (64 M, e.g. 8000 x 8000: a 200-megapixel phone photo must be downscaled first).
- the processor's resize: CLIP's processor scales the *short* edge to 336 px before it crops the centre, so a
  5000 x 1 image becomes 336 x 1,680,000 pixels (1.7 GB) from 5,000 decoded ones. The resized image is held to the
  same pixel bound as a decoded one (`MAX_IMAGE_PIXELS`), which allows aspect ratios up to 64 M / 336^2 = 566 : 1
  at 336 px; beyond that the image is refused (its centre crop would be a sliver of the picture anyway).

Exactness: the transformers PIL backend resizes with `PIL.Image.resize((w, h), resample, reducing_gap=None)` on the
RGB data and Pillow returns a copy when the size already matches, so resizing here first, to the size the processor
computes (its own `get_resize_output_image_size`), leaves the processor's output bitwise unchanged
(tests/test_images.py checks it) while the full-size picture is freed before the processor copies it twice. Other
backends (torchvision) are not pre-resized; their resize is still bounded.
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..processor import resize_target
from .generate import InputError

MAX_IMAGE_PIXELS = 64_000_000  # 64 megapixels, e.g. 8000 x 8000: far above what the 336-px tower uses
MAX_RESIZED_PIXELS = MAX_IMAGE_PIXELS  # the processor's resized intermediate: no more than a decoded image may hold
_ROWS = 256  # rows converted at a time (bounded scratch memory)


@dataclass(frozen=True, kw_only=True)
class ResizeRule:
    """What the model's image processor does to an image's size: the short edge to `shortest_edge` px."""

    shortest_edge: int
    resample: int = 3  # PIL.Image.Resampling.BICUBIC, CLIP's
    exact: bool = False  # True: the processor is transformers' PIL backend, so resizing here first is exact

    @classmethod
    def from_processor(cls, processor) -> "ResizeRule | None":
        ip = getattr(processor, "image_processor", processor)
        size = getattr(ip, "size", None)
        edge = _get(size, "shortest_edge")
        if not getattr(ip, "do_resize", False) or not isinstance(edge, int) or edge < 1:
            return None
        resample = getattr(ip, "resample", 3)
        plain = _get(size, "longest_edge") is None and _get(size, "height") is None
        exact = getattr(ip, "backend", None) == "pil" and isinstance(resample, int) and plain
        return cls(shortest_edge=edge, resample=int(resample) if isinstance(resample, int) else 3, exact=exact)

    def target(self, size: tuple[int, int]) -> tuple[int, int]:
        """(width, height) the processor resizes an image of `size` (width, height) to: its own computation
        (processor.resize_target; tests/test_processor.py compares it with transformers')."""
        return resize_target(size, self.shortest_edge)

    def check(self, size: tuple[int, int], name: str) -> None:
        w, h = self.target(size)
        if w * h > MAX_RESIZED_PIXELS:
            short, long = sorted(size)
            raise InputError(
                f"{name} is {size[0]} x {size[1]} pixels, an aspect ratio of {long / short:,.0f} : 1: the processor "
                "would scale its short "
                f"edge to {self.shortest_edge} px, {w} x {h} = {w * h:,} pixels (limit {MAX_RESIZED_PIXELS:,}); crop "
                f"it to a ratio of at most {MAX_RESIZED_PIXELS // self.shortest_edge**2} : 1"
            )

    def fit(self, image, name: str = "image"):
        """`image` (RGB) at the processor's resize size where that is exact; checked against the bound in any case."""
        self.check(image.size, name)
        target = self.target(image.size)
        if not self.exact or target == image.size:
            return image
        return image.resize(target, resample=self.resample, reducing_gap=None)


def _get(size: Any, key: str):
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def check_pixels(size: tuple[int, int], name: str = "image") -> None:
    width, height = size
    if width < 1 or height < 1:
        raise InputError(f"{name} is empty ({width} x {height} pixels)")
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(
            f"{name} has {width} x {height} = {width * height:,} pixels, over the limit of {MAX_IMAGE_PIXELS:,}: "
            "downscale it"
        )


def _gray(mode: str) -> bool:
    return mode in ("1", "L", "F") or mode.startswith("I")


# Bytes a pixel that a format's decoder holds beside Pillow's image while it decodes, measured at 16 megapixels
# (peak RSS of a decode less the file and Pillow's image): PNG, baseline JPEG, TIFF, BMP, TGA, PPM and GIF at most 0.46
# (DECODER_SCRATCH covers them); WebP 12.6 (libwebp's own RGBA buffer and copies: 16.6 in all); a progressive JPEG keeps
# every DCT coefficient (2 bytes) of every component until its last scan: 2 x 3 for YCbCr without chroma subsampling
# (measured 6.0; 3.0 with 4:2:0).
DECODER_SCRATCH = 0.5
DECODER_EXTRA = {"WEBP": 13.0}


@dataclass(frozen=True)
class Header:
    """What an image file's header says, nothing decoded."""

    size: tuple[int, int]
    mode: str
    format: str | None = None
    rotated: bool = False  # an EXIF orientation that transposes
    progressive: bool = False  # a progressive JPEG


BAND_BYTES = 32  # scratch a pixel of the band being converted (to_rgb): its crop, and up to three float64 temporaries


def decode_bytes(header: Header, final_size: tuple[int, int] | None = None) -> int:
    """Memory `read_image` holds at its peak for an image with this header, phase by phase (to_rgb's order):
    decoding, Pillow's image (1 byte a pixel for '1' / 'L' / 'P', 2 for 16-bit, 4 for everything else, RGB included)
    and the decoder's own buffers (DECODER_EXTRA); converting, the source, the output (1 byte gray, 4 RGB) and one band
    of scratch (_ROWS rows x BAND_BYTES); an EXIF rotation, the output twice (the source is freed first); a gray
    picture becoming RGB at `final_size` (the processor's size where read_image resizes first; default: the image's),
    1 + 4 bytes a pixel. tests/test_images.py checks it against measured peaks."""
    width, height = header.size
    px = width * height
    mode = header.mode
    source = 1 if mode in ("1", "L", "P") else 2 if mode.startswith("I;16") else 4
    out = 1 if _gray(mode) else 4
    extra = DECODER_EXTRA.get(header.format or "", DECODER_SCRATCH)
    if header.format == "JPEG" and header.progressive:
        extra += 2 * len(mode if mode != "RGB" else "YCC")  # one 2-byte coefficient per component and pixel
    phases = [px * (source + extra)]
    if mode != "RGB" or header.rotated:
        phases.append(px * (source + out) + _ROWS * width * BAND_BYTES)
    if header.rotated:
        phases.append(2 * px * out)
    if out == 1:
        final = final_size or header.size
        phases.append(final[0] * final[1] * (1 + 4))
    return int(max(phases))


def peek(data: bytes) -> Header | None:
    """The header of an image file's bytes, nothing decoded; None where Pillow cannot read it."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as im:
                if im.format == "PNG":  # PNG's getexif() decodes the image to look for a late eXIf chunk
                    exif = Image.Exif()
                    if im.info.get("exif"):
                        exif.load(im.info["exif"])
                else:
                    exif = im.getexif()
                progressive = bool(im.info.get("progressive") or im.info.get("progression"))
                return Header(im.size, im.mode, im.format, exif.get(0x0112, 1) in _TRANSPOSE, progressive)
    except Exception:  # read_image says what is wrong with it
        return None


def _source(source: str | Path | bytes, name: str):
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(source)
    path = Path(source)
    try:
        st = path.stat()
    except FileNotFoundError:
        raise InputError(f"{name} does not exist: pass the path of an image file (PNG, JPEG, ...)") from None
    except OSError as e:  # a name too long, a loop of links, no permission on a parent
        raise InputError(f"{name} cannot be read ({e.strerror}): pass the path of an image file you can read") from None
    if stat.S_ISDIR(st.st_mode):
        raise InputError(f"{name} is a directory: pass the path of an image file (PNG, JPEG, ...)")
    if not stat.S_ISREG(st.st_mode):
        raise InputError(
            f"{name} is not a regular file (a pipe, socket or device): save the image to a file and pass its path"
        )
    if not os.access(path, os.R_OK):
        raise InputError(f"{name} is not readable (permission denied): pass a file you can read")
    return path


def read_image(source: str | Path | bytes, *, name: str = "image", rule: ResizeRule | None = None):
    """An 8-bit RGB PIL image, fully decoded, from a path or bytes; InputError (the user's to fix) for anything else.

    Before any pixel is decoded: the pixel count and, with `rule`, the size the processor will resize to. Then the
    first frame is decoded in full while the file is open, converted to RGB (`to_rgb`), and with `rule` resized as
    the processor would (`ResizeRule.fit`)."""
    from PIL import Image

    opened = _source(source, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(opened) as im:  # reads the header only
                check_pixels(im.size, name)
                if rule is not None:
                    rule.check(im.size, name)
                im.load()  # decode now, while the file is open: a truncated file fails here
                rgb = to_rgb(im, fit=(lambda x: rule.fit(x, name)) if rule is not None else None, consume=True)
                rgb.load()
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"{name} declares too many pixels ({e}): limit {MAX_IMAGE_PIXELS:,}; downscale it") from None
    except MemoryError:
        raise InputError(f"{name} could not be decoded in the memory available: downscale it") from None
    except (
        Exception
    ) as e:  # Pillow's decoders raise many types on hostile or broken files (OSError, SyntaxError, struct.error, ...)
        raise InputError(
            f"{name} is not a readable image ({type(e).__name__}: {str(e)[:120]}): pass a PNG, JPEG or another format "
            "Pillow reads"
        ) from None
    return rgb


_TRANSPOSE = {
    2: "FLIP_LEFT_RIGHT",
    3: "ROTATE_180",
    4: "FLIP_TOP_BOTTOM",
    5: "TRANSPOSE",
    6: "ROTATE_270",
    7: "TRANSVERSE",
    8: "ROTATE_90",
}


def to_rgb(im, fit=None, consume: bool = False):
    """8-bit RGB from any Pillow mode: high bit depths are scaled, not clipped (a 16-bit PNG opens as 'I;16' or
    'I'), transparency is composited onto white, EXIF orientation is applied, palette / CMYK / LAB / YCbCr convert.

    Every conversion is per pixel, so it runs `_ROWS` rows at a time into one output image (a 64-megapixel RGBA
    picture holds its decoded pixels and the RGB result, not four full-size copies). `fit`, when given, resizes
    the result; a gray picture is resized before it becomes RGB (the same bytes per band, a quarter of the memory).
    `consume`: `im` is closed once converted (its pixels freed before an EXIF rotation copies the result)."""
    from PIL import Image

    orientation = im.getexif().get(0x0112, 1)
    if im.mode == "RGB" and orientation == 1:
        return fit(im) if fit is not None else im  # already what the processor takes
    out = Image.new("L" if _gray(im.mode) else "RGB", im.size)
    scale = _scale(im)
    for top in range(0, im.size[1], _ROWS):
        box = (0, top, im.size[0], min(top + _ROWS, im.size[1]))
        out.paste(_band_to_8bit(im.crop(box), scale), box)
    if consume:
        im.close()
    if orientation in _TRANSPOSE:
        out = out.transpose(getattr(Image.Transpose, _TRANSPOSE[orientation]))
    if fit is not None:
        out = fit(out)
    return out.convert("RGB") if out.mode != "RGB" else out


def _scale(im) -> float | None:
    """The value that maps to 255 for 16 / 32-bit pixels (scaled, not clipped), from the whole image; None for 8-bit."""
    if im.mode.startswith("I;16"):
        return 65535.0
    if im.mode == "I":
        return 65535.0 if im.getextrema()[1] > 255 else 255.0
    if im.mode == "F":
        return 1.0 if im.getextrema()[1] <= 1.0 else 255.0  # floats in [0, 1], else taken as 0..255
    return None


def _band_to_8bit(band, scale: float | None):
    """One band of rows as 'L' (gray) or 'RGB' (anything with colour or transparency)."""
    from PIL import Image

    if scale is not None:
        a = np.asarray(band)
        return Image.fromarray(np.clip(np.rint(a / scale * 255.0), 0, 255).astype(np.uint8), "L")
    if band.mode in ("1", "L"):
        return band.convert("L")
    if band.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (band.mode == "P" and "transparency" in band.info):
        rgba = band.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return band.convert("RGB")


def rule_from_engine_dir(directory: str | Path) -> ResizeRule | None:
    """The resize rule of an engine's saved processor, read from its JSON without loading the processor (so that
    star-run checks images before the engine loads); None where it cannot be read (the engine load says why)."""
    import json

    try:
        ip = json.loads((Path(directory) / "processor" / "processor_config.json").read_text())["image_processor"]
        edge = ip["size"]["shortest_edge"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not ip.get("do_resize", True) or not isinstance(edge, int) or edge < 1:
        return None
    return ResizeRule(
        shortest_edge=edge, resample=int(ip.get("resample", 3)) if isinstance(ip.get("resample", 3), int) else 3
    )
