"""Decode one image file into a plain RGB picture, or say in a few words why it cannot be used."""

from __future__ import annotations

import io
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Raster formats only: Pillow would otherwise hand EPS/PS files to Ghostscript, and nobody puts
# a training photo in a format outside this list. "JPEG" also opens the MPO files many cameras
# write as ".jpg".
ALLOWED_FORMATS = ("JPEG", "PNG", "BMP", "DIB", "GIF", "TIFF", "WEBP")

# Modes holding 16- or 32-bit integer samples: Pillow's convert("RGB") clips them at 255, which
# turns almost every pixel of a 16-bit photo white.
_WIDE_INT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}


class ImageRejected(ValueError):
    """A file that is not a usable image.

    Attributes:
        reason: short human-readable cause, e.g. ``"truncated or corrupt: image file is
            truncated"``.
    """

    def __init__(self, reason: str, path: Path | None = None) -> None:
        # the message names the file when known: a later stage's error must say which image
        super().__init__(f"{path}: {reason}" if path is not None else reason)
        self.reason = reason
        self.path = path


def open_rgb(
    path: Path,
    *,
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int = 64_000_000,
    keep_gray: bool = False,
) -> Image.Image:
    """Fully decode an image file into an RGB image in its upright orientation.

    Transparent pixels are composited onto ``background``; 16-bit grayscale is scaled to 8 bits;
    CMYK, palette, grayscale and bilevel images become RGB. Multi-frame files give their first
    frame.

    Args:
        path: the image file.
        background: RGB colour, each in 0..255, put behind transparent pixels.
        max_pixels: reject images with more pixels (width * height) than this, judged from the
            header before any pixel is decoded (decompression bombs).
        keep_gray: return grayscale images without alpha in mode ``"L"``, for callers that
            resize first and copy the one channel to three after (a third of the work).

    Returns:
        A loaded ``PIL.Image.Image`` in mode ``"RGB"``, detached from the file.

    Raises:
        ImageRejected: empty file, not an image, truncated or corrupt data, too many pixels.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ImageRejected(f"unreadable: {exc.strerror or exc}", path) from None
    try:
        return decode_rgb(data, background=background, max_pixels=max_pixels, keep_gray=keep_gray)
    except ImageRejected as exc:
        raise ImageRejected(exc.reason, path) from None


def decode_rgb(
    data: bytes | BinaryIO,
    *,
    background: tuple[int, int, int] = (255, 255, 255),
    max_pixels: int = 64_000_000,
    keep_gray: bool = False,
) -> Image.Image:
    """Same as :func:`open_rgb`, for bytes already read (lets callers hash and copy one read)."""
    fp = io.BytesIO(data) if isinstance(data, bytes | bytearray) else data
    if _is_empty(fp):
        raise ImageRejected("empty file")
    # Pillow may warn (DecompressionBombWarning) before our own, usually stricter, check below
    # rejects the file; silencing it would need warnings.catch_warnings, which is not
    # thread-safe, and open_rgb may run in loader threads.
    try:
        im = Image.open(fp, formats=ALLOWED_FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageRejected(f"too many pixels: {exc}") from None
    except UnidentifiedImageError:
        raise ImageRejected("not an image: unrecognised format") from None
    except Exception as exc:  # noqa: BLE001 - corrupt headers raise many exception types
        raise ImageRejected(f"corrupt header: {_short(exc)}") from None
    with im:
        width, height = im.size
        if width * height > max_pixels:
            raise ImageRejected(
                f"too many pixels: {width}x{height} = {width * height} > max_pixels {max_pixels}"
            )
        if width < 1 or height < 1:
            raise ImageRejected(f"no pixels: {width}x{height}")
        try:
            im.load()
            return _to_rgb(_upright(im), background, keep_gray)
        except Image.DecompressionBombError as exc:
            raise ImageRejected(f"too many pixels: {exc}") from None
        except MemoryError:
            raise ImageRejected("too many pixels: out of memory while decoding") from None
        except Exception as exc:  # noqa: BLE001 - Pillow plugins raise OSError, SyntaxError,
            # ValueError, EOFError, struct.error... for damaged data; all mean the same here.
            raise ImageRejected(f"truncated or corrupt: {_short(exc)}") from None


def _upright(im: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - a damaged EXIF block should not cost a photo whose
        # pixels decode fine; it is then used as stored.
        return im


def _is_empty(fp: BinaryIO) -> bool:
    pos = fp.tell()
    empty = fp.read(1) == b""
    fp.seek(pos)
    return empty


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text[:200] or type(exc).__name__


def _to_rgb(
    im: Image.Image, background: tuple[int, int, int], keep_gray: bool = False
) -> Image.Image:
    if im.mode in _WIDE_INT_MODES:
        # 16-bit sources span 0..65535; 65535 / 257 == 255 exactly.
        scaled = np.asarray(im, dtype=np.float64) / 257.0
        im = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")
    elif im.mode == "F":
        # Float images have no agreed range; values outside 0..255 are clipped, not rescaled,
        # so that an image already in 8-bit units is unchanged.
        arr = np.clip(np.rint(np.asarray(im, dtype=np.float64)), 0, 255).astype(np.uint8)
        im = Image.fromarray(arr, mode="L")

    has_alpha = im.mode in _ALPHA_MODES or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    # convert() always returns a new image, so the result never refers to the open file.
    return im.convert("L" if keep_gray and im.mode == "L" else "RGB")
