"""Listing conditions for the robustness report: what a marketplace does to a photo before we see it.

Each condition takes a decoded RGB ``PIL.Image`` and a seeded ``numpy.random.Generator`` and returns a
new RGB image; the same generator state gives the same image. They are written independently of
``training.realism`` (the training augmentation) on purpose: a report that measured the augmentation
with itself would only say that the model learnt its own training noise.

Conditions are pydantic models, so a YAML file can select and parameterise them
(``load_conditions``); unknown names or parameters are errors, never silently ignored.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Union

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from serving.errors import WildcheckError

Rng = np.random.Generator

_PRICES = ("$120", "€85", "£40", "$1,250", "€390", "$75 OBO", "¥12,000", "£600")
_SLOGANS = ("FREE SHIPPING", "SALE", "antique", "rare find", "best offer", "ships today", "genuine", "estate lot")
_SHOPS = ("© antique-treasures.shop", "@oldcurios_store", "© VintageFinds", "rare-estate-goods.com", "@the.collector")


# ---------------------------------------------------------------------------------------------- fonts


@lru_cache(maxsize=None)
def font_path(bold: bool = False) -> str | None:
    """DejaVu Sans shipped with matplotlib (a real TrueType font); None if that installation lacks it."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")
    return str(path) if path.is_file() else None


@lru_cache(maxsize=256)
def _font(size: int, bold: bool = False) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    size = max(6, int(size))
    path = font_path(bold)
    if path is not None:
        return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)  # fallback only: text still drawn, at the requested size


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _fit_font(draw: ImageDraw.ImageDraw, text: str, max_width: float, size: int, bold: bool = False):
    """The largest font up to ``size`` whose rendering of ``text`` fits ``max_width`` pixels."""
    while size > 6:
        font = _font(size, bold)
        if _text_size(draw, text, font)[0] <= max_width:
            return font
        size = int(size * 0.85)
    return _font(6, bold)


def _grey(rng: Rng, lo: int, hi: int) -> tuple[int, int, int]:
    v = int(rng.integers(lo, hi + 1))
    return (v, v, v)


def _cover(img: Image.Image, w: int, h: int) -> Image.Image:
    """Resize so ``img`` covers a w x h box, then crop the centre (how collage apps fill a tile)."""
    scale = max(w / img.width, h / img.height)
    new = (max(w, round(img.width * scale)), max(h, round(img.height * scale)))
    resized = img.resize(new, Image.Resampling.BICUBIC)
    left, top = (new[0] - w) // 2, (new[1] - h) // 2
    return resized.crop((left, top, left + w, top + h))


def _contain(img: Image.Image, w: int, h: int, background: tuple[int, int, int]) -> Image.Image:
    """Resize so ``img`` fits a w x h box (aspect kept), padded with ``background``."""
    scale = min(w / img.width, h / img.height)
    new = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    canvas = Image.new("RGB", (w, h), background)
    canvas.paste(img.resize(new, Image.Resampling.BICUBIC), ((w - new[0]) // 2, (h - new[1]) // 2))
    return canvas


# ------------------------------------------------------------------------------------------ conditions


class Condition(BaseModel):
    """A deterministic image change. ``others``: how many other photos ``apply`` needs (collage)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    others: ClassVar[int] = 0
    description: ClassVar[str] = ""

    def apply(self, img: Image.Image, rng: Rng, others: Sequence[Image.Image] = ()) -> Image.Image:
        raise NotImplementedError

    def params(self) -> dict:
        return self.model_dump(exclude={"kind"})


class Jpeg(Condition):
    kind: Literal["jpeg"] = "jpeg"
    quality: int = Field(20, ge=1, le=95)
    description: ClassVar[str] = "re-encoded as JPEG at low quality (a platform's recompression)"

    def apply(self, img, rng, others=()):
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=self.quality)
        buf.seek(0)
        return Image.open(buf).convert("RGB")


class Thumbnail(Condition):
    kind: Literal["thumbnail"] = "thumbnail"
    size: int = Field(96, ge=8, description="longer side of the thumbnail, in pixels")
    description: ClassVar[str] = "shrunk to a thumbnail (longer side `size` px) and scaled back up"

    def apply(self, img, rng, others=()):
        scale = self.size / max(img.size)
        if scale >= 1:
            return img.copy()
        small = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BOX)
        return small.resize(img.size, Image.Resampling.BILINEAR)


class Banner(Condition):
    kind: Literal["banner"] = "banner"
    height: float = Field(0.16, gt=0.0, le=0.5, description="banner height as a share of the image height")
    description: ClassVar[str] = "an opaque price/text banner across the top or bottom (DejaVu Sans)"

    def apply(self, img, rng, others=()):
        out = img.copy()
        draw = ImageDraw.Draw(out)
        w, h = out.size
        bh = max(8, round(h * self.height))
        top = 0 if rng.random() < 0.5 else h - bh
        colours = [(200, 20, 30), (250, 200, 0), (20, 20, 20), (255, 255, 255), (0, 90, 180)]
        bg = colours[int(rng.integers(len(colours)))]
        fg = (0, 0, 0) if sum(bg) > 450 else (255, 255, 255)
        draw.rectangle([0, top, w, top + bh], fill=bg)
        text = f"{_PRICES[int(rng.integers(len(_PRICES)))]}  {_SLOGANS[int(rng.integers(len(_SLOGANS)))]}"
        font = _fit_font(draw, text, w * 0.92, int(bh * 0.7), bold=True)
        tw, th = _text_size(draw, text, font)
        x = int(rng.integers(0, max(1, w - tw - 1))) if w > tw else 0
        draw.text((x, top + (bh - th) // 2), text, fill=fg, font=font, anchor="lt")
        return out


class Watermark(Condition):
    kind: Literal["watermark"] = "watermark"
    opacity: float = Field(0.4, gt=0.0, le=1.0)
    description: ClassVar[str] = "a semi-transparent shop name written diagonally across the middle"

    def apply(self, img, rng, others=()):
        w, h = img.size
        text = _SHOPS[int(rng.integers(len(_SHOPS)))]
        diag = int(math.hypot(w, h))
        layer = Image.new("L", (diag, diag), 0)
        draw = ImageDraw.Draw(layer)
        font = _fit_font(draw, text, diag * 0.8, max(10, diag // 10), bold=True)
        tw, th = _text_size(draw, text, font)
        draw.text(((diag - tw) // 2, (diag - th) // 2), text, fill=255, font=font, anchor="lt")
        angle = float(rng.uniform(20, 45)) * (1 if rng.random() < 0.5 else -1)
        layer = layer.rotate(angle, resample=Image.Resampling.BILINEAR)
        left, top = (diag - w) // 2, (diag - h) // 2
        mask = layer.crop((left, top, left + w, top + h)).point(lambda v: int(v * self.opacity))
        colour = (255, 255, 255) if rng.random() < 0.6 else (40, 40, 40)
        return Image.composite(Image.new("RGB", (w, h), colour), img, mask)


class Frame(Condition):
    kind: Literal["frame"] = "frame"
    area: float = Field(1 / 9, gt=0.01, le=0.6, description="share of the frame's area the photo takes")
    description: ClassVar[str] = "the photo small inside a plain screenshot-like page with a UI bar and text"
    # The page is a phone, tablet or desktop screenshot (aspect drawn per image) of area ``w*h/area``; the
    # photo keeps its pixels (so the model sees it ~3x smaller than usual at area 1/9), sits in the page's
    # central square and is shrunk only if it cannot fit there (very elongated photos).

    def apply(self, img, rng, others=()):
        w, h = img.size
        aspect = (9 / 16, 10 / 16, 16 / 10)[int(rng.integers(3))]  # phone portrait, tablet, desktop (W/H)
        area = w * h / self.area
        cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        dark = rng.random() < 0.25
        page = _grey(rng, 18, 40) if dark else _grey(rng, 238, 255)
        ink = (225, 225, 225) if dark else (40, 40, 40)
        canvas = Image.new("RGB", (cw, ch), page)
        draw = ImageDraw.Draw(canvas)
        bar = max(12, round(ch * 0.07))
        bar_colour = tuple(int(c) for c in rng.integers(0, 200, 3))
        draw.rectangle([0, 0, cw, bar], fill=bar_colour)  # app bar
        font = _font(max(8, int(bar * 0.5)), bold=True)
        draw.text((bar // 2, bar // 4), "< Marketplace", fill=(255, 255, 255), font=font, anchor="lt")
        # the photo: its own pixels where it fits, inside the page's central square (the part of a page any
        # centre crop keeps: the report measures the model, not whether preprocessing cropped the photo away)
        margin, side = max(4, cw // 40), min(cw, ch)
        left, right = max(margin, (cw - side) // 2), min(cw - margin, (cw + side) // 2)
        top, bottom = max(bar + margin, (ch - side) // 2), min(ch - margin, (ch + side) // 2)
        scale = min(1.0, (right - left) / w, (bottom - top) / h)
        pw, ph = max(1, int(w * scale)), max(1, int(h * scale))
        photo = img if scale == 1.0 else img.resize((pw, ph), Image.Resampling.BICUBIC)
        px = int(rng.integers(left, max(left, right - pw) + 1))
        py = top + int(rng.integers(0, max(0, (bottom - top - ph) // 3) + 1))
        canvas.paste(photo, (px, py))
        # title, price and a button below the photo, like a listing page
        line = max(8, round(ch * 0.035))
        y = py + ph + line // 2
        draw.text((px, y), _SLOGANS[int(rng.integers(len(_SLOGANS)))], fill=ink, font=_font(line), anchor="lt")
        y += int(line * 1.6)
        draw.text((px, y), _PRICES[int(rng.integers(len(_PRICES)))], fill=ink, font=_font(line, True), anchor="lt")
        y += int(line * 1.8)
        if y + line * 1.5 < ch:
            draw.rounded_rectangle([px, y, px + cw // 3, y + int(line * 1.5)],
                                   radius=line // 3, fill=bar_colour)
        for _ in range(3):  # grey placeholder text lines
            y += int(line * 2)
            if y + line // 2 >= ch:
                break
            draw.rectangle([px, y, px + int(max(pw, cw // 3) * rng.uniform(0.4, 0.9)), y + line // 2],
                           fill=_grey(rng, 60, 90) if dark else _grey(rng, 200, 225))
        return canvas


class Collage(Condition):
    kind: Literal["collage"] = "collage"
    gutter: float = Field(0.02, ge=0.0, le=0.1, description="white space between tiles, share of the side")
    fit: Literal["cover", "contain"] = "cover"
    others: ClassVar[int] = 3
    description: ClassVar[str] = "one tile of a 2x2 collage; the other three tiles are other photos"

    def layout(self, img: Image.Image) -> tuple[int, int]:
        """(tile side, gutter) in pixels for a collage made around ``img``."""
        tile = min(img.size)
        return tile, round(2 * tile * self.gutter)

    def apply(self, img, rng, others=()):
        if len(others) < 3:
            raise ValueError("a collage needs three other photos")
        tile, gap = self.layout(img)
        side = 2 * tile + gap
        canvas = Image.new("RGB", (side, side), (255, 255, 255))
        slot = int(rng.integers(4))
        photos = list(others[:3])
        photos.insert(slot, img)
        for i, photo in enumerate(photos):
            fitted = _cover(photo, tile, tile) if self.fit == "cover" else _contain(photo, tile, tile, (255, 255, 255))
            canvas.paste(fitted, ((i % 2) * (tile + gap), (i // 2) * (tile + gap)))
        return canvas

    def quadrant_box(self, img: Image.Image, slot: int) -> tuple[int, int, int, int]:
        tile, gap = self.layout(img)
        x, y = (slot % 2) * (tile + gap), (slot // 2) * (tile + gap)
        return x, y, x + tile, y + tile


class Rotate(Condition):
    kind: Literal["rotate"] = "rotate"
    direction: Literal["random", "cw", "ccw"] = "random"
    description: ClassVar[str] = "rotated by 90 degrees (a phone photo uploaded sideways)"

    def apply(self, img, rng, others=()):
        cw = self.direction == "cw" or (self.direction == "random" and rng.random() < 0.5)
        return img.transpose(Image.Transpose.ROTATE_270 if cw else Image.Transpose.ROTATE_90)


def greyscale(img: Image.Image) -> Image.Image:
    """The photo in grey (ITU-R 601 luma, PIL's "L"), still RGB: the report's condition, and the training photos a
    grey head is fitted on (``training.grey_head``)."""
    return img.convert("L").convert("RGB")


class Greyscale(Condition):
    kind: Literal["greyscale"] = "greyscale"
    description: ClassVar[str] = "converted to greyscale (archive photos, filters)"

    def apply(self, img, rng, others=()):
        return greyscale(img)


class CentreCrop(Condition):
    kind: Literal["crop"] = "crop"
    side: float = Field(0.5, gt=0.05, le=1.0, description="kept share of each side (0.5: a quarter of the area)")
    description: ClassVar[str] = "the centre of the photo only (a close-up)"

    def apply(self, img, rng, others=()):
        w, h = img.size
        cw, ch = max(1, round(w * self.side)), max(1, round(h * self.side))
        left, top = (w - cw) // 2, (h - ch) // 2
        return img.crop((left, top, left + cw, top + ch))


class Phone(Condition):
    kind: Literal["phone"] = "phone"
    blur: float = Field(0.004, ge=0.0, le=0.05, description="Gaussian blur radius as a share of the longer side")
    noise: float = Field(8.0, ge=0.0, le=64.0, description="sensor noise standard deviation, in 0-255 units")
    description: ClassVar[str] = "phone camera: slight defocus blur and sensor noise"

    def apply(self, img, rng, others=()):
        out = img.filter(ImageFilter.GaussianBlur(self.blur * max(img.size))) if self.blur else img
        arr = np.asarray(out, dtype=np.float32)
        if self.noise:
            luma = rng.normal(0.0, self.noise, arr.shape[:2])[..., None]  # mostly luminance noise, some chroma
            chroma = rng.normal(0.0, self.noise * 0.35, arr.shape)
            arr = arr + luma + chroma
        return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")


AnyCondition = Annotated[
    Union[Jpeg, Thumbnail, Banner, Watermark, Frame, Collage, Rotate, Greyscale, CentreCrop, Phone],
    Field(discriminator="kind"),
]
KINDS: dict[str, type[Condition]] = {
    c.model_fields["kind"].default: c
    for c in (Jpeg, Thumbnail, Banner, Watermark, Frame, Collage, Rotate, Greyscale, CentreCrop, Phone)
}
_ADAPTER = TypeAdapter(AnyCondition)


def default_conditions() -> dict[str, Condition]:
    """Every condition with its documented defaults, named by its kind, in report order."""
    return {kind: cls() for kind, cls in KINDS.items()}


class ConditionsError(WildcheckError, ValueError):
    """A conditions file that names an unknown condition or parameter, or is not a mapping."""


def parse_conditions(spec: dict | None) -> dict[str, Condition]:
    """``{"conditions": {name: params}}`` -> named conditions.

    ``name`` is a kind (``jpeg``) or any name with ``kind:`` among its params (``jpeg_q50: {kind: jpeg,
    quality: 50}``), so one kind can be measured at several settings. Empty params mean the defaults.
    """
    if not isinstance(spec, dict) or set(spec) != {"conditions"} or not isinstance(spec["conditions"], dict):
        raise ConditionsError("a conditions file is a YAML mapping with one key, `conditions:`, mapping names to "
                              f"parameters, e.g. `conditions: {{jpeg: {{quality: 20}}, collage: {{}}}}`; "
                              f"known conditions: {', '.join(KINDS)}")
    out: dict[str, Condition] = {}
    for name, params in spec["conditions"].items():
        if not isinstance(name, str):  # `1:` and `"1":` were both "1": one of them was dropped without a word
            raise ConditionsError(f"condition name {name!r} is not text: quote it (`\"{name}\": ...`) or give the "
                                  "condition a name such as jpeg_q50")
        params = dict(params or {}) if isinstance(params, dict) or params is None else params
        if not isinstance(params, dict):
            raise ConditionsError(f"condition {name!r}: parameters must be a mapping, got {params!r}")
        if name == "clean":
            raise ConditionsError("`clean` is the unchanged photo and always measured; name the condition otherwise")
        kind = params.pop("kind", name)
        if not isinstance(kind, str) or kind not in KINDS:
            raise ConditionsError(f"unknown condition {kind!r}; known conditions: {', '.join(KINDS)} "
                                  "(another name needs `kind: <one of these>`)")
        fields = KINDS[kind].model_fields
        flags = [k for k, v in params.items() if isinstance(v, bool) and k in fields and fields[k].annotation in (int, float)]
        if flags:  # pydantic takes YAML's `yes` for 1: `quality: yes` ran at quality 1
            raise ConditionsError(f"condition {name!r} ({kind}): {flags[0]}: {params[flags[0]]!r} is a yes/no value, "
                                  "not a number; give a number")
        try:
            out[name] = _ADAPTER.validate_python({"kind": kind, **params})
        except ValidationError as exc:
            allowed = [f for f in KINDS[kind].model_fields if f != "kind"]
            problems = "; ".join(f"{'.'.join(map(str, e['loc'][1:])) or kind}: {e['msg']}" for e in exc.errors())
            raise ConditionsError(f"condition {name!r} ({kind}): {problems}. Parameters of {kind}: "
                                  f"{', '.join(allowed) or 'none'}") from None
    if not out:
        raise ConditionsError("the conditions file selects no condition")
    return out


def load_conditions(path: str | Path) -> dict[str, Condition]:
    import yaml

    from serving.yamlio import load_yaml  # refuses a condition named twice, which would keep only the last

    path = Path(path)
    if not path.is_file():
        raise ConditionsError(f"conditions file {path} not found")
    try:
        spec = load_yaml(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:  # as training.config does for a train config: a traceback before
        raise ConditionsError(f"conditions file {path} is not a UTF-8 text file ({exc.reason} at byte {exc.start}): "
                              "save it as UTF-8 YAML") from None
    except yaml.YAMLError as exc:
        raise ConditionsError(f"{path} is not valid YAML: {exc}") from None
    try:
        return parse_conditions(spec)
    except ConditionsError as exc:
        raise ConditionsError(f"{path}: {exc}") from None


def condition_rng(seed: int, condition: str, image_key: str) -> Rng:
    """The generator for one (image, condition): independent of the order and number of images evaluated. A key
    naming a file that is not UTF-8 is hashed as the name's own bytes (``name_bytes``): the same seeds as before for
    every UTF-8 name, where it raised UnicodeEncodeError."""
    import zlib

    from training.data.sources import name_bytes

    return np.random.default_rng([seed, zlib.crc32(name_bytes(condition)), zlib.crc32(name_bytes(image_key))])
