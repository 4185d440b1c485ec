"""Issue 9: every image mode Pillow opens becomes the right 8-bit RGB picture; oversized images are refused
from their header."""

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
