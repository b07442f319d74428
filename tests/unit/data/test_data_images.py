from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferlab.data import ImageRejected, open_rgb


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _rejected(path: Path, **kw) -> str:
    with pytest.raises(ImageRejected) as info:
        open_rgb(path, **kw)
    assert isinstance(info.value, ValueError)
    return info.value.reason


def test_plain_jpeg_and_png_come_back_rgb_and_detached(tmp_path: Path, gen) -> None:
    for name, data in (("a.jpg", gen.jpeg()), ("a.png", gen.png())):
        path = _write(tmp_path, name, data)
        im = open_rgb(path)
        path.unlink()  # the image must not need the file any more
        assert im.mode == "RGB"
        assert im.size == (64, 48)
        assert im.getpixel((5, 5)) is not None


def test_png_pixels_are_unchanged(tmp_path: Path, gen) -> None:
    src = gen.noise((20, 30), seed=3)
    im = open_rgb(_write(tmp_path, "a.png", gen.encode(src, "PNG")))
    assert np.array_equal(np.asarray(im), np.asarray(src))


def test_rgba_transparent_pixel_becomes_background(tmp_path: Path, gen) -> None:
    path = _write(tmp_path, "rgba.png", gen.rgba_png())
    assert open_rgb(path).getpixel((0, 0)) == (255, 255, 255)
    assert open_rgb(path).getpixel((5, 5)) == (255, 0, 0)
    assert open_rgb(path, background=(0, 128, 0)).getpixel((0, 0)) == (0, 128, 0)


def test_la_and_half_transparent_pixels_are_blended(tmp_path: Path, gen) -> None:
    im = Image.new("LA", (40, 40), (0, 128))  # black at half opacity
    out = open_rgb(_write(tmp_path, "la.png", gen.encode(im, "PNG")), background=(200, 200, 200))
    assert all(abs(c - 100) <= 1 for c in out.getpixel((3, 3)))


def test_palette_transparency_becomes_background(tmp_path: Path, gen) -> None:
    path = _write(tmp_path, "p.png", gen.palette_png())
    im = open_rgb(path, background=(10, 20, 30))
    assert im.getpixel((0, 0)) == (10, 20, 30)
    assert im.getpixel((9, 9)) == (0, 0, 255)


def test_gray16_is_scaled_not_white(tmp_path: Path, gen) -> None:
    path = _write(tmp_path, "g16.png", gen.gray16_png(value=32896))
    assert Image.open(path).mode.startswith("I")  # the case Pillow's convert gets wrong
    im = open_rgb(path)
    assert im.mode == "RGB"
    assert im.getpixel((2, 2)) == (128, 128, 128)
    full = open_rgb(_write(tmp_path, "w16.png", gen.gray16_png(value=65535)))
    assert full.getpixel((0, 0)) == (255, 255, 255)


def test_32bit_integer_image_is_scaled(tmp_path: Path, gen) -> None:
    im = Image.fromarray(np.full((40, 40), 257 * 64, dtype=np.int32), mode="I")
    out = open_rgb(_write(tmp_path, "i32.tif", gen.encode(im, "TIFF")))
    assert out.getpixel((0, 0)) == (64, 64, 64)


def test_cmyk_jpeg_becomes_rgb(tmp_path: Path, gen) -> None:
    im = open_rgb(_write(tmp_path, "cmyk.jpg", gen.cmyk_jpeg()))
    assert im.mode == "RGB"
    r, g, b = im.getpixel((10, 10))
    assert r > 240 and g < 15 and b < 15


def test_grayscale_and_bilevel_become_rgb(tmp_path: Path, gen) -> None:
    gray = open_rgb(_write(tmp_path, "l.png", gen.encode(Image.new("L", (40, 40), 77), "PNG")))
    assert gray.getpixel((0, 0)) == (77, 77, 77)
    bw = open_rgb(_write(tmp_path, "1.bmp", gen.encode(Image.new("1", (40, 40), 1), "BMP")))
    assert bw.getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path: Path, gen) -> None:
    path = _write(tmp_path, "rot.jpg", gen.exif_rotated_jpeg((80, 40)))
    assert Image.open(path).size == (80, 40)
    assert open_rgb(path).size == (40, 80)


def test_empty_file(tmp_path: Path) -> None:
    assert _rejected(_write(tmp_path, "e.jpg", b"")) == "empty file"


def test_html_saved_as_jpg(tmp_path: Path) -> None:
    path = _write(tmp_path, "e.jpg", b"<html><body>Not Found</body></html>")
    assert _rejected(path).startswith("not an image")


def test_truncated_jpeg_and_png(tmp_path: Path, gen) -> None:
    data = gen.jpeg((64, 64), seed=4)
    assert _rejected(_write(tmp_path, "t.jpg", data[: len(data) // 2])).startswith(
        "truncated or corrupt"
    )
    data = gen.png((64, 64), seed=4)
    assert _rejected(_write(tmp_path, "t.png", data[: len(data) // 2])).startswith(
        "truncated or corrupt"
    )


def test_eps_is_not_handed_to_ghostscript(tmp_path: Path) -> None:
    path = _write(tmp_path, "x.jpg", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n")
    assert _rejected(path).startswith("not an image")


def test_too_many_pixels_is_judged_before_decoding(tmp_path: Path, gen) -> None:
    # The header claims 9000 x 9000 but the file holds one pixel: decoding would call it
    # truncated, so "too many pixels" shows the header was checked first.
    path = _write(tmp_path, "bomb.png", gen.lying_png(9000, 9000))
    assert _rejected(path).startswith("too many pixels")
    assert _rejected(path, max_pixels=10**9).startswith("truncated or corrupt")


def test_pillow_decompression_bomb_error_is_a_rejection(tmp_path: Path, gen) -> None:
    # Past twice Image.MAX_IMAGE_PIXELS Pillow refuses to open at all.
    path = _write(tmp_path, "bomb.png", gen.lying_png(30_000, 30_000))
    assert _rejected(path, max_pixels=10**12).startswith("too many pixels")


def test_small_max_pixels(tmp_path: Path, gen) -> None:
    path = _write(tmp_path, "a.png", gen.png((200, 100)))
    assert _rejected(path, max_pixels=19_999).startswith("too many pixels")
    assert open_rgb(path, max_pixels=20_000).size == (200, 100)


def test_missing_file_is_rejected_with_reason(tmp_path: Path) -> None:
    assert _rejected(tmp_path / "nope.jpg").startswith("unreadable")
