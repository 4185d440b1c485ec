"""runtime/images.py: every image mode Pillow opens becomes the right 8-bit RGB picture; oversized images are refused
from their header."""

import io

import numpy as np
import pytest
from PIL import Image

from star_export.runtime.generate import InputError
from star_export.runtime.inputs import MAX_IMAGE_PIXELS, check_pixels, load_image

GRADIENT = np.tile(np.linspace(0, 1, 64), (32, 1))  # left black, right white


def _save(tmp_path, im, name="im.png", **kw):
    path = tmp_path / name
    im.save(path, **kw)
    return path


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    im = Image.fromarray((GRADIENT * 65535).astype(np.uint16))  # mode I;16
    rgb = np.asarray(load_image(_save(tmp_path, im)))
    assert rgb.shape == (32, 64, 3)
    np.testing.assert_allclose(rgb[0, :, 0], GRADIENT[0] * 255, atol=1)  # a gradient, not 99.5 % white
    assert (rgb == 255).mean() < 0.05


def test_32_bit_integer_and_float_images(tmp_path):
    as_int = Image.fromarray((GRADIENT * 65535).astype(np.int32), "I")
    np.testing.assert_allclose(np.asarray(load_image(_save(tmp_path, as_int, "i.tiff")))[0, :, 1], GRADIENT[0] * 255, atol=1)
    as_float = Image.fromarray(GRADIENT.astype(np.float32), "F")
    np.testing.assert_allclose(np.asarray(load_image(_save(tmp_path, as_float, "f.tiff")))[0, :, 2], GRADIENT[0] * 255, atol=1)


def test_transparency_is_composited_onto_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgb = np.asarray(load_image(_save(tmp_path, rgba)))
    assert tuple(rgb[0, 0]) == (0, 0, 255) and tuple(rgb[4, 4]) == (255, 255, 255)
    la = Image.new("LA", (4, 4), (0, 0))
    assert tuple(np.asarray(load_image(_save(tmp_path, la, "la.png")))[1, 1]) == (255, 255, 255)


def test_palette_with_transparency_and_cmyk(tmp_path):
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    p.info["transparency"] = 0
    assert tuple(np.asarray(load_image(_save(tmp_path, p, "p.png", transparency=0)))[0, 0]) == (0, 255, 0)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # red in CMYK
    assert tuple(np.asarray(load_image(_save(tmp_path, cmyk, "c.jpg", quality=100)))[2, 2])[0] > 200


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (20, 10), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    assert load_image(_save(tmp_path, im, "r.jpg", exif=exif)).size == (10, 20)


def test_pixel_limit_from_the_header(tmp_path):
    with pytest.raises(InputError, match="over the limit"):
        check_pixels((MAX_IMAGE_PIXELS + 1, 1), "image")
    with pytest.raises(InputError, match="empty"):
        check_pixels((0, 5), "image")


# ---------------------------------------------------------------- real files, every format, exact pre-resize

from pathlib import Path  # noqa: E402

from PIL import ImageOps  # noqa: E402

from star_export.runtime.images import MAX_RESIZED_PIXELS, ResizeRule, read_image  # noqa: E402

PHOTO = np.random.default_rng(0).integers(0, 256, (90, 120, 3), dtype=np.uint8)  # noise: no format can flatter it
# Every format Pillow writes that a user may hand over, with the options a camera or an editor would use.
FORMATS = {
    "jpeg": ("JPEG", "RGB", {"quality": 90}),
    "jpeg-gray": ("JPEG", "L", {}),
    "jpeg-cmyk": ("JPEG", "CMYK", {}),
    "jpeg-progressive": ("JPEG", "RGB", {"progressive": True}),
    "png": ("PNG", "RGB", {}),
    "png-palette": ("PNG", "P", {}),
    "png-rgba": ("PNG", "RGBA", {}),
    "webp": ("WEBP", "RGB", {"quality": 80}),
    "webp-lossless-rgba": ("WEBP", "RGBA", {"lossless": True}),
    "gif": ("GIF", "P", {}),
    "tiff": ("TIFF", "RGB", {"compression": "tiff_lzw"}),
    "tiff-cmyk": ("TIFF", "CMYK", {}),
    "bmp": ("BMP", "RGB", {}),
    "ppm": ("PPM", "RGB", {}),
    "tga": ("TGA", "RGB", {}),
    "ico": ("ICO", "RGBA", {}),
}


def _write(tmp_path: Path, key: str) -> Path:
    fmt, mode, options = FORMATS[key]
    im = Image.fromarray(PHOTO).convert(mode) if mode != "P" else Image.fromarray(PHOTO).quantize(64)
    path = tmp_path / f"{key}.{fmt.lower()}"
    im.save(path, fmt, **options)
    return path


@pytest.mark.parametrize("key", list(FORMATS))
def test_every_format_loads_in_full_before_its_file_closes(key, tmp_path):
    """The picture is usable after the file is closed (an RGB JPEG was returned lazily), and equals Pillow's own
    reading of the file converted to RGB (transparency onto white where there is an alpha channel)."""
    path = _write(tmp_path, key)
    got = load_image(path)
    assert got.mode == "RGB" and got.size == Image.open(path).size
    with Image.open(path) as im:
        im.load()
        want = np.asarray(im.convert("RGBA"), dtype=np.float64)
    rgb, alpha = want[..., :3], want[..., 3:] / 255
    want = rgb * alpha + 255 * (1 - alpha)
    assert np.abs(np.asarray(got, dtype=np.float64) - want).max() <= 1 + (key.endswith("cmyk") and 2)
    assert np.array_equal(np.asarray(read_image(path.read_bytes())), np.asarray(got)), "bytes and files read alike"


@pytest.mark.parametrize("key", ["jpeg", "png", "webp", "gif", "tiff", "bmp"])
def test_truncated_files_are_input_errors(key, tmp_path):
    data = _write(tmp_path, key).read_bytes()
    for cut in (len(data) // 2, 40, 8):
        (tmp_path / "cut").write_bytes(data[:cut])
        with pytest.raises(InputError, match="not a readable image|empty|pixels"):
            load_image(tmp_path / "cut")


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_matches_pillows_transpose(orientation, tmp_path):
    im = Image.fromarray(PHOTO[:, :100])  # not square: a rotation shows in the size
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.png"
    im.save(path, exif=exif)
    with Image.open(path) as opened:
        want = ImageOps.exif_transpose(opened).convert("RGB")
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(want))


def _engine_processor(tiny_engine):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_engine / "processor", local_files_only=True)


@pytest.mark.parametrize("size", [(120, 90), (336, 336), (337, 500), (2000, 30), (30, 2000), (641, 479), (7, 3), (4, 1200)])
def test_pre_resizing_leaves_the_processors_output_bitwise_equal(size, tiny_engine):
    """read_image resizes to the processor's own target first; pixel_values are bitwise those of the full image."""
    processor = _engine_processor(tiny_engine)
    rule = ResizeRule.from_processor(processor)
    assert rule is not None and rule.exact, "the installed transformers' processor is the PIL backend this relies on"
    w, h = size
    image = Image.fromarray(np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8))
    full = processor.image_processor(images=image, return_tensors="np")["pixel_values"]
    fitted = read_image(_as_png(image), rule=rule)
    assert fitted.size == rule.target(size)
    assert np.array_equal(processor.image_processor(images=fitted, return_tensors="np")["pixel_values"], full)


def _as_png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_extreme_aspect_ratios_are_refused_from_the_header(tmp_path, tiny_engine):
    """The bound is on the processor's resized image (MAX_RESIZED_PIXELS); the largest accepted ratio follows from it."""
    rule = ResizeRule.from_processor(_engine_processor(tiny_engine))
    edge = rule.shortest_edge
    ratio = MAX_RESIZED_PIXELS // edge**2
    rule.check((ratio, 1), "image")
    rule.check((1, ratio), "image")
    for size in ((ratio + 2, 1), (1, ratio + 2), (5000, 1), (1, 12000)):
        with pytest.raises(InputError, match="aspect ratio"):
            rule.check(size, "image")
    path = tmp_path / "wide.png"
    Image.new("RGB", (5000, 1)).save(path)
    with pytest.raises(InputError, match="aspect ratio"):
        load_image(path, rule)


def test_a_fifo_is_not_a_regular_file(tmp_path):
    import os

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match="not a regular file"):
        load_image(fifo)


def test_star_run_on_a_plain_rgb_jpeg(tiny_engine, tmp_path, capsys):
    """The case that failed: a phone-style RGB JPEG through star-run is exit 0."""
    from star_export.cli import run_main

    path = _write(tmp_path, "jpeg")
    assert run_main([str(tiny_engine), "--image", str(path), "--prompt", "What is in the image?", "--max-new-tokens", "2"]) == 0, capsys.readouterr().err


_MEASURE = """
import sys
from star_export.runtime.images import decode_bytes, peek, read_image

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) << 10 for line in f if line.startswith(key))

data = open(sys.argv[1], "rb").read()
header = peek(data)
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from the current RSS
before = status("VmRSS:")
image = read_image(data)
print(decode_bytes(header), status("VmHWM:") - before)
"""


@pytest.mark.parametrize("key, options", [
    ("png-rgba", {}), ("png-16bit", {}), ("jpeg-progressive-444", {"progressive": True, "subsampling": 0}), ("jpeg-cmyk", {}),
    ("jpeg-rotated", {}), ("webp", {"quality": 50}), ("tiff-cmyk", {}),
])
def test_the_decode_cost_from_the_header_covers_the_measured_peak(key, options, tmp_path):
    """decode_bytes (what star-serve's image memory is charged) against the peak RSS of read_image in a fresh process
    (its peak reset just before), at 3000 x 3000; 4 MiB of slack for the allocator's granularity."""
    import subprocess
    import sys

    rng = np.random.default_rng(1)
    im = Image.fromarray(rng.integers(0, 256, (300, 300, 3), dtype=np.uint8)).resize((3000, 3000))
    fmt = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP", "tiff": "TIFF"}[key.split("-")[0]]
    if key.endswith("rgba"):
        im = im.convert("RGBA")
    elif key.endswith("cmyk"):
        im = im.convert("CMYK")
    elif key.endswith("16bit"):
        im = Image.fromarray(np.asarray(im.convert("L"), dtype=np.uint16) * 257)
    elif key.endswith("rotated"):
        options = {"exif": Image.Exif()}
        options["exif"][0x0112] = 6
    path = tmp_path / f"im.{fmt.lower()}"
    im.save(path, fmt, **options)
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True, timeout=120)
    estimate, measured = map(int, out.stdout.split())
    assert measured <= estimate + (4 << 20), f"{key}: decode peak {measured / 2**20:.1f} MiB over the estimate {estimate / 2**20:.1f} MiB"
