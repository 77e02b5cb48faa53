"""Decode untrusted image bytes into a plain RGB picture, the same way for training and serving.

Listing photos arrive in every shape: CMYK JPEGs from print tools, 16-bit PNGs, palettes with
transparency, phone photos whose pixels are stored sideways with an EXIF orientation tag, animated
GIF/WebP. Everything here turns them into an 8-bit RGB ``PIL.Image`` or raises ``ImageError`` with a
code a caller can map to an HTTP status or a line in a data report.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from serving.errors import WildcheckError



@dataclass(frozen=True)
class ImageFormat:
    """One format a listing photo can come in: PIL's name, its MIME type, its file extensions (the first is the
    one we write) and the non-standard MIME names clients send for it."""

    pil: str
    mime: str
    extensions: tuple[str, ...]
    mime_aliases: tuple[str, ...] = ()


# The one table of image formats (decoding, content types, dataset/folder scans, ingest's file names). Anything
# else PIL can open (PDF, EPS, ICO, ...) is refused: fewer decoders reachable from the internet, less attack surface.
IMAGE_FORMATS = (
    ImageFormat("JPEG", "image/jpeg", (".jpg", ".jpeg"), ("image/jpg", "image/pjpeg")),
    ImageFormat("MPO", "image/jpeg", (".jpg", ".jpeg")),  # multi-picture JPEG from phones: a JPEG to everyone else
    ImageFormat("PNG", "image/png", (".png",), ("image/x-png",)),
    ImageFormat("WEBP", "image/webp", (".webp",)),
    ImageFormat("GIF", "image/gif", (".gif",)),
    ImageFormat("BMP", "image/bmp", (".bmp",), ("image/x-ms-bmp", "image/x-bmp")),
    ImageFormat("TIFF", "image/tiff", (".tif", ".tiff"), ("image/tif",)),
)
FORMATS = {f.pil: f for f in IMAGE_FORMATS}
SUPPORTED_FORMATS = frozenset(FORMATS)
IMAGE_EXTENSIONS = frozenset(ext for f in IMAGE_FORMATS for ext in f.extensions)
IMAGE_MIME_TYPES = tuple(dict.fromkeys(f.mime for f in IMAGE_FORMATS))
MIME_ALIASES = {alias: f.mime for f in IMAGE_FORMATS for alias in f.mime_aliases}


def is_image_file(path: Path) -> bool:
    """A file whose extension is one of the image formats (case-insensitive); hidden files (.DS_Store, ._x) are not.
    A dangling link counts, so the command that reads it reports it instead of the photo silently missing."""
    dangling = path.is_symlink() and not path.exists()
    return (path.is_file() or dangling) and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def files_under(folder: str | Path) -> list[Path]:
    """Every visible file under ``folder``, recursively and sorted, image or not; hidden files and folders (macOS
    ``._x.jpg`` resource forks, ``.thumbnails/``) are skipped. Linked folders are followed like linked files and
    label folders (``rglob`` skips them: a ``coco -> /store/coco`` source folder vanished without a word); a link
    back to a folder already walked, or to one holding ``folder`` (``loop -> ..``), is not walked again."""
    folder = Path(folder)
    top = folder.resolve()
    seen, found = set(), []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = Path(dirpath).resolve()
        if real in seen or (real != top and top.is_relative_to(real)):
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath) / name for name in filenames if not name.startswith(".")]
    return sorted(found)


def images_under(folder: str | Path) -> list[Path]:
    """The image files under ``folder`` (``files_under``): the one folder walk of every command that takes a folder."""
    return [p for p in files_under(folder) if is_image_file(p)]


def label_folders(root: str | Path) -> list[Path]:
    """The visible subfolders of ``root``, sorted: the ``ROOT/<label>/`` folders of a dataset, traffic sample or
    gallery (hidden ones such as ``.thumbnails/`` or ``.ipynb_checkpoints/`` are no label)."""
    return sorted(p for p in Path(root).iterdir() if p.is_dir() and not p.name.startswith("."))


DEFAULT_MAX_PIXELS = 40_000_000  # ~ 6300 x 6300; larger is a decompression bomb, not a listing photo
DEFAULT_MIN_SIDE = 16
# decoded image + its RGB copy (decode_bytes): the largest RGB photo needs 4 B/px; 16-bit grey 6, RGBA/CMYK/I/F 8
DEFAULT_MAX_DECODE_BYTES = 256 * 2**20
# Longer side / shorter side. Preprocessing scales the shorter side to ~365 px, so the resized picture holds
# 365^2 x aspect pixels whatever the decoded size: a 16 x 60000 PNG of 9 KB became 365 x 1.37M (1.5 GB) and
# 14 s of work. 50:1 bounds that at ~6.7 Mpx and passes any real photo, panorama or phone scroll capture (~1:20).
DEFAULT_MAX_ASPECT = 50


def size_text(n: float) -> str:
    """A size in bytes for a message: '20 MiB', '1.5 MiB', '300 KiB', '1 bytes'; never rounded to '0 MiB'."""
    if n >= 2**20:
        return f"{n / 2**20:.3g} MiB"
    if n >= 2**10:
        return f"{n / 2**10:.3g} KiB"
    return f"{int(n)} bytes"


class ImageError(WildcheckError, ValueError):
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


def _bomb_error(exc: Exception, max_pixels: int) -> ImageError:
    """PIL's own bomb limit (2 x MAX_IMAGE_PIXELS) fired: quote the configured limit, not PIL's."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    size = f" ({found.group(1)} pixels)" if found else ""
    return ImageError("too_many_pixels", f"image is over the limit of {max_pixels} pixels{size}")


def _open(data: bytes | Path | str, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    if isinstance(data, (bytes, bytearray, memoryview)):
        if len(data) == 0:
            raise ImageError("empty", "the image is empty (0 bytes)")
        fp = io.BytesIO(bytes(data))
    else:
        path = Path(data)
        try:
            size = path.stat().st_size
        except OSError as exc:  # missing, a dangling link, no permission: say so, not "corrupt"
            raise ImageError("unreadable", f"cannot read {path}: {exc.strerror or exc}") from exc
        if size == 0:
            raise ImageError("empty", f"{path} is empty (0 bytes)")
        fp = path
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit is checked next
            return Image.open(fp)
    except UnidentifiedImageError as exc:
        raise ImageError("not_an_image", "the data is not an image PIL can identify") from exc
    except Image.DecompressionBombError as exc:
        raise _bomb_error(exc, max_pixels) from exc
    except Exception as exc:  # OSError, and ValueError/struct.error/... from a broken header (truncated IHDR, acTL)
        raise ImageError("corrupt", f"cannot read the image header: {exc}") from exc


# Bytes per pixel PIL holds for a decoded image of each mode (everything not listed takes 4).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
_STRIP_ROWS = 256  # high-bit-depth images are converted this many rows at a time: memory stays ~ one 8-bit copy
_LUT16 = ((np.arange(65536, dtype=np.uint32) * 255 + 32767) // 65535).astype(np.uint8)  # round(v / 65535 * 255)


def decode_bytes(mode: str, width: int, height: int) -> int:
    """Memory to hold the decoded image plus its 8-bit RGB copy (what decode_image needs at its peak)."""
    per_pixel = _MODE_BYTES.get(mode, 4) + (0 if mode == "RGB" else 4)
    return width * height * per_pixel


def decode_cost(data: bytes) -> int:
    """``decode_bytes`` of an upload from its header alone (0 when unreadable: decoding will say why)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(bytes(data))) as img:
                return decode_bytes(img.mode, *img.size)
    except Exception:
        return 0


def _strips_to_l(img: Image.Image, convert) -> Image.Image:
    """Map a high-bit-depth image to 8-bit L strip by strip (a float64 copy of a whole 36 MP image is 290 MB)."""
    width, height = img.size
    out = Image.new("L", img.size)
    for top in range(0, height, _STRIP_ROWS):
        strip = np.asarray(img.crop((0, top, width, min(height, top + _STRIP_ROWS))))
        out.paste(Image.fromarray(np.ascontiguousarray(convert(strip)), "L"), (0, top))
    return out


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparent pixels become white (how listing pages show them)."""
    if img.mode in ("P", "RGB", "L") and "transparency" in img.info:
        img = img.convert("RGBA")  # a palette entry or a colour key (PNG tRNS) marks the transparent pixels
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        # 16-bit grayscale: scale by the bit depth's maximum (not clipping at 255), integer lookup per pixel
        return _strips_to_l(img, lambda a: _LUT16[a]).convert("RGB")
    if img.mode == "I":
        low, high = img.getextrema()
        peak = 65535 if high > 255 else 255
        return _strips_to_l(
            img, lambda a: ((np.clip(a, 0, peak).astype(np.int64) * 255 + peak // 2) // peak).astype(np.uint8)
        ).convert("RGB")
    if img.mode == "F":
        low, high = np.inf, -np.inf
        width, height = img.size
        for top in range(0, height, _STRIP_ROWS):  # the finite values' range, a strip at a time: one NaN or
            strip = np.asarray(img.crop((0, top, width, min(height, top + _STRIP_ROWS))))  # inf made it all black
            finite = strip[np.isfinite(strip)]
            if finite.size:
                low, high = min(low, float(finite.min())), max(high, float(finite.max()))
        low = 0.0 if not np.isfinite(low) else low
        scale = 255.0 / (high - low) if np.isfinite(high) and high > low else 0.0
        return _strips_to_l(
            img, lambda a: np.nan_to_num((a.astype(np.float64) - low) * scale, nan=0.0, posinf=255, neginf=0)
            .clip(0, 255).astype(np.uint8)
        ).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img if img.mode == "RGBA" else img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba)  # = alpha_composite over white, without two more full-size RGBA copies
        return out
    return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def decode_image(
    data: bytes | Path | str,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_side: int = DEFAULT_MIN_SIDE,
    draft_size: int | None = None,
    allowed_formats: frozenset[str] = SUPPORTED_FORMATS,
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES,
    max_aspect: float = DEFAULT_MAX_ASPECT,
) -> tuple[Image.Image, ImageInfo]:
    """Decode fully (truncation is an error), apply EXIF orientation, return 8-bit RGB and the original info.

    ``draft_size``: for JPEGs, let libjpeg decode at a reduced DCT scale whose result is still at least
    this many pixels on its shorter side (PIL ``Image.draft``). Several times faster for large photos.
    ``max_decode_bytes`` bounds the memory of the decoded image and its RGB copy (``decode_bytes``), so a
    4-byte-per-pixel mode cannot cost more than the pixel limit suggests; ``max_aspect`` bounds what resizing
    the shorter side up costs (``DEFAULT_MAX_ASPECT``). Any failure is an ``ImageError``:
    decoders raise all sorts (ValueError, TypeError, IndexError, struct.error) on hostile files.
    """
    try:
        return _decode(data, max_pixels, min_side, draft_size, allowed_formats, max_decode_bytes, max_aspect)
    except ImageError:
        raise
    except MemoryError as exc:
        raise ImageError("too_many_pixels", "the image needs more memory to decode than this server allows") from exc
    except Exception as exc:
        raise ImageError("corrupt", f"the image data is truncated or corrupt: {type(exc).__name__}: {exc}") from exc


def _decode(data, max_pixels, min_side, draft_size, allowed_formats, max_decode_bytes, max_aspect):
    img = _open(data, max_pixels)
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
    needed = decode_bytes(img.mode, width, height)
    if needed > max_decode_bytes:
        raise ImageError(
            "too_many_pixels",
            f"a {width}x{height} {img.mode} image needs {size_text(needed)} to decode, over the limit of "
            f"{size_text(max_decode_bytes)}; send a smaller or 8-bit image",
        )
    if min(width, height) < min_side:
        raise ImageError("too_small", f"image is {width}x{height}; the shorter side must be at least {min_side} px")
    if max(width, height) > max_aspect * min(width, height):
        raise ImageError(
            "extreme_aspect_ratio",
            f"image is {width}x{height}, {max(width, height) / max(1, min(width, height)):.0f} times longer than wide; "
            f"at most {max_aspect:g}:1 is checked: send the photo itself, or cut a long capture into parts",
        )
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
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise _bomb_error(exc, max_pixels) from exc
    except Exception as exc:
        raise ImageError("corrupt", f"the image data is truncated or corrupt: {exc}") from exc
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous
    mode = img.mode
    exif_rotated = False
    try:
        orientation = img.getexif().get(0x0112, 1)
        if orientation in (2, 3, 4, 5, 6, 7, 8):  # 1 is upright; anything else (0, 99) is no orientation at all
            img = ImageOps.exif_transpose(img)
            exif_rotated = True
    except Exception:  # a broken EXIF block must not make a good picture unusable
        pass
    info = ImageInfo(format=fmt, width=width, height=height, mode=mode, exif_rotated=exif_rotated, frames=frames)
    return to_rgb(img), info
