"""Tiny images of every awkward kind, and a messy source folder built from them."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from transferlab.config import DataParams, FolderSource

ODD_CLASS = "Crème brûlée pâtisserie"
MAX_PIXELS = 20_000  # small, so a 200x200 "bomb" is cheap to make
MIN_SIZE = 32


def noise(size: tuple[int, int], seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Random pixels, so every generated file has different bytes."""
    w, h = size
    channels = len(Image.new(mode, (1, 1)).getbands())
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(arr[..., 0] if channels == 1 else arr, mode=mode)


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def jpeg(size=(64, 48), seed=0) -> bytes:
    return encode(noise(size, seed), "JPEG", quality=90)


def png(size=(64, 48), seed=0) -> bytes:
    return encode(noise(size, seed), "PNG")


def rgba_png(size=(48, 40)) -> bytes:
    """Opaque red with a fully transparent top-left pixel (alpha 0, colour black)."""
    im = Image.new("RGBA", size, (255, 0, 0, 255))
    im.putpixel((0, 0), (0, 0, 0, 0))
    return encode(im, "PNG")


def gray16_png(size=(40, 36), value=32896) -> bytes:
    """16-bit grayscale; 32896 / 257 == 128 exactly."""
    arr = np.full((size[1], size[0]), value, dtype=np.uint16)
    return encode(Image.fromarray(arr), "PNG")


def cmyk_jpeg(size=(48, 40)) -> bytes:
    return encode(Image.new("CMYK", size, (0, 255, 255, 0)), "JPEG", quality=95)  # red


def palette_png(size=(40, 40)) -> bytes:
    """Palette image: index 0 transparent (its colour black), index 1 blue."""
    im = Image.new("P", size, 1)
    im.putpalette([0, 0, 0, 0, 0, 255] + [0] * (256 - 2) * 3)
    im.putpixel((0, 0), 0)
    return encode(im, "PNG", transparency=0)


def exif_rotated_jpeg(size=(80, 40)) -> bytes:
    """Stored 80x40 landscape, EXIF orientation 6: shown as 40x80 portrait."""
    im = noise(size, seed=7)
    exif = im.getexif()
    exif[0x0112] = 6
    return encode(im, "JPEG", exif=exif.tobytes())


def _half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def lying_png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` but holds one row of pixels.

    Decoding it would fail as truncated; a rejection for size proves the check ran first.
    """
    data = bytearray(encode(Image.new("L", (1, 1)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


class Gen:
    """The generators above, for tests (a fixture, so no test imports conftest by name)."""

    noise = staticmethod(noise)
    encode = staticmethod(encode)
    jpeg = staticmethod(jpeg)
    png = staticmethod(png)
    rgba_png = staticmethod(rgba_png)
    gray16_png = staticmethod(gray16_png)
    cmyk_jpeg = staticmethod(cmyk_jpeg)
    palette_png = staticmethod(palette_png)
    exif_rotated_jpeg = staticmethod(exif_rotated_jpeg)
    lying_png = staticmethod(lying_png)


@pytest.fixture
def gen() -> type[Gen]:
    return Gen


@dataclass
class Messy:
    """A source folder and what pulling it must give, file by file."""

    root: Path
    kept: dict[str, tuple[str, int, int]] = field(default_factory=dict)  # rel -> label, w, h
    rejected: dict[str, str] = field(default_factory=dict)  # rel -> reason must start with this
    ignored: list[str] = field(default_factory=list)
    odd_class: str = ODD_CLASS

    def params(self, **kw) -> DataParams:
        """The data section that the expectations above were written for."""
        kw = {"min_size": MIN_SIZE, "max_pixels": MAX_PIXELS, **kw}
        return DataParams(source=FolderSource(path=self.root), **kw)

    def add(self, rel: str, data: bytes) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def keep(self, rel: str, data: bytes, w: int, h: int) -> None:
        self.add(rel, data)
        self.kept[rel] = (rel.split("/", 1)[0], w, h)

    def reject(self, rel: str, data: bytes, reason: str) -> None:
        self.add(rel, data)
        self.rejected[rel] = reason

    def ignore(self, rel: str, data: bytes) -> None:
        self.add(rel, data)
        self.ignored.append(rel)


def build_messy(root: Path) -> Messy:
    m = Messy(root)
    good = jpeg(seed=1)
    m.keep("cats/good.jpg", good, 64, 48)
    m.keep("cats/good.png", png(seed=2), 64, 48)
    m.keep("cats/rgba.png", rgba_png(), 48, 40)
    m.keep("cats/gray16.png", gray16_png(), 40, 36)
    m.keep("cats/cmyk.jpg", cmyk_jpeg(), 48, 40)
    m.keep("cats/palette.png", palette_png(), 40, 40)
    m.keep("cats/rotated.jpeg", exif_rotated_jpeg(), 40, 80)
    m.keep("cats/nested/deeper/UPPER.PNG", png(seed=3), 64, 48)
    m.keep("cats/nested/shot.Tiff", encode(noise((33, 50), seed=4), "TIFF"), 33, 50)
    m.keep("cats/dither.gif", encode(noise((40, 40), seed=5).convert("P"), "GIF"), 40, 40)
    m.reject("cats/truncated.jpg", _half(jpeg((64, 64), seed=6)), "truncated or corrupt")
    m.reject("cats/empty.jpg", b"", "empty file")
    m.reject("cats/page.jpg", b"<!DOCTYPE html><html><body>404</body></html>\n", "not an image")
    m.reject("cats/tiny.png", png((10, 40), seed=8), "too small")
    m.reject("cats/bomb.png", png((200, 200), seed=9), "too many pixels")
    m.reject("cats/zz copy.jpg", good, "duplicate: same bytes as images/cats/good.jpg")
    m.ignore("cats/.DS_Store", b"\x00\x00\x00\x01Bud1")
    m.ignore("cats/Thumbs.db", b"\xd0\xcf\x11\xe0")
    m.ignore("cats/._good.jpg", b"\x00\x05\x16\x07")  # AppleDouble
    m.ignore("cats/.hidden/secret.jpg", jpeg(seed=10))
    m.ignore("cats/notes.txt", b"not an image\n")
    m.keep(f"{ODD_CLASS}/tarte.jpg", jpeg(seed=11), 64, 48)
    m.keep(f"{ODD_CLASS}/sous dossier/éclair.png", png(seed=12), 64, 48)
    m.ignore("readme.txt", b"images go in class folders\n")
    m.ignore("stray.jpg", jpeg(seed=13))
    m.ignore(".DS_Store", b"\x00")
    m.ignore(".hidden/x.jpg", jpeg(seed=14))
    m.ignore("__MACOSX/cats/._good.jpg", jpeg(seed=15))
    (root / "empty class").mkdir()
    return m


@pytest.fixture
def messy(tmp_path: Path) -> Messy:
    return build_messy(tmp_path / "source")


@pytest.fixture
def write_manifest(tmp_path: Path) -> Callable[[dict[str, int]], Path]:
    """Write a manifest with ``n`` fake images per label (split needs no real files)."""
    from transferlab.data.manifest import MANIFEST_COLUMNS, write_csv_atomic

    def make(counts: dict[str, int], name: str = "manifest.csv") -> Path:
        rows = []
        for label, n in counts.items():
            for i in range(n):
                digest = zlib.crc32(f"{label}/{i}".encode()).to_bytes(4, "big").hex() * 8
                rows.append(
                    {
                        "path": f"images/{label}/{i:04d}.jpg",
                        "label": label,
                        "sha256": digest,
                        "width": 64,
                        "height": 48,
                        "source": f"file:///src/{label}/{i:04d}.jpg",
                    }
                )
        rows.sort(key=lambda r: (r["label"], r["path"]))
        path = tmp_path / name
        write_csv_atomic(path, MANIFEST_COLUMNS, rows)
        return path

    return make
