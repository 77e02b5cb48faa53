"""Decode untrusted image bytes into a plain RGB picture, the same way for training and serving.

Listing photos arrive in every shape: CMYK JPEGs from print tools, 16-bit PNGs, palettes with
transparency, phone photos whose pixels are stored sideways with an EXIF orientation tag, animated
GIF/WebP. Everything here turns them into an 8-bit RGB ``PIL.Image`` or raises ``ImageError`` with a
code a caller can map to an HTTP status or a line in a data report.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

# Formats a listing photo can reasonably come in. Anything else PIL can open (PDF, EPS, ICO, ...) is
# refused: fewer decoders reachable from the internet means less attack surface.
SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})
DEFAULT_MAX_PIXELS = 40_000_000  # ~ 6300 x 6300; larger is a decompression bomb, not a listing photo
DEFAULT_MIN_SIDE = 16


class ImageError(ValueError):
    """An image that cannot be used. ``code`` is machine-readable, ``status`` the HTTP status to answer."""

    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


@dataclass(frozen=True)
class ImageInfo:
    """What we learnt about the original file (before any conversion)."""

    format: str
    width: int
    height: int
    mode: str
    exif_rotated: bool
    frames: int


def _open(data: bytes | Path | str) -> Image.Image:
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise ImageError("empty", "the image is empty (0 bytes)")
        fp = io.BytesIO(bytes(data))
    else:
        path = Path(data)
        if path.stat().st_size == 0:
            raise ImageError("empty", f"{path} is empty (0 bytes)")
        fp = path
    try:
        return Image.open(fp)
    except UnidentifiedImageError as exc:
        raise ImageError("not_an_image", "the data is not an image PIL can identify") from exc
    except Image.DecompressionBombError as exc:
        raise ImageError("too_many_pixels", str(exc)) from exc
    except OSError as exc:
        raise ImageError("corrupt", f"cannot read the image header: {exc}") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparent pixels become white (how listing pages show them)."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit grayscale: scale by the real maximum of the bit depth, not by clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode != "I" or arr.max() > 255 else 255.0
        arr8 = np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        return Image.fromarray(((arr - lo) * scale).astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def decode_image(
    data: bytes | Path | str,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    draft_size: int | None = None,
    allowed_formats: frozenset[str] = SUPPORTED_FORMATS,
) -> tuple[Image.Image, ImageInfo]:
    """Decode fully (truncation is an error), apply EXIF orientation, return 8-bit RGB and the original info.

    ``draft_size``: for JPEGs, let libjpeg decode at a reduced DCT scale whose result is still at least
    this many pixels on its shorter side (PIL ``Image.draft``). Several times faster for large photos.
    """
    img = _open(data)
    fmt = (img.format or "").upper()
    if fmt not in allowed_formats:
        raise ImageError(
            "unsupported_format",
            f"image format {fmt or 'unknown'} is not supported; send one of {sorted(allowed_formats)}",
            status=415,
        )
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(
            "too_many_pixels",
            f"image is {width}x{height} = {width * height} pixels, over the limit of {max_pixels}",
        )
    if min(width, height) < min_side:
        raise ImageError("too_small", f"image is {width}x{height}; the shorter side must be at least {min_side} px")
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        img.seek(0)  # first frame of an animation
    if draft_size and fmt in ("JPEG", "MPO") and min(width, height) > 2 * draft_size:
        # draft() keeps both sides >= the requested box; ask for a box that keeps the shorter side >= draft_size
        scale = draft_size / min(width, height)
        img.draft("RGB", (max(1, int(width * scale + 0.999)), max(1, int(height * scale + 0.999))))
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    try:
        ImageFile.LOAD_TRUNCATED_IMAGES = False  # a cut-off upload is an error, never half a picture
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        if isinstance(exc, (Image.DecompressionBombWarning, Image.DecompressionBombError)):
            raise ImageError("too_many_pixels", str(exc)) from exc
        raise ImageError("corrupt", f"the image data is truncated or corrupt: {exc}") from exc
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    mode = img.mode
    exif_rotated = False
    try:
        orientation = img.getexif().get(0x0112, 1)
        if orientation not in (None, 1):
            img = ImageOps.exif_transpose(img)
            exif_rotated = True
    except Exception:  # a broken EXIF block must not make a good picture unusable
        pass
    info = ImageInfo(format=fmt, width=width, height=height, mode=mode, exif_rotated=exif_rotated, frames=frames)
    return to_rgb(img), info
