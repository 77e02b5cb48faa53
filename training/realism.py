"""Listing-photo realism: what marketplace photos look like and museum photos do not.

Price tags and text, watermarks and logos, borders and frames, multi-photo collages, screenshot
framing. Applied to positives and negatives alike (the augmentation pipeline does not know labels),
so none of them can become a shortcut for either class. Each transform returns an image of the input's
size and dtype; use them in ``augment.train`` by name like any albumentations transform.
"""

from __future__ import annotations

import numpy as np
from albumentations.core.transforms_interface import ImageOnlyTransform
from PIL import Image, ImageDraw, ImageFont

_WORDS = ("SALE", "$120", "€85", "OBO", "antique", "rare", "vintage", "genuine", "NEW", "free shipping", "lot",
          "collector", "£40", "50% OFF", "authentic", "estate", "hand carved", "old", "gift", "best offer")


def _rng_colour(rng) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def _font(size: int):
    return ImageFont.load_default(size=max(8, int(size)))


class _PilTransform(ImageOnlyTransform):
    """Run a PIL drawing function with this transform's seeded numpy generator."""

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        rng = np.random.default_rng(int(self.random_generator.integers(2**32)))
        out = self.draw(Image.fromarray(img), rng)
        if out.size != (img.shape[1], img.shape[0]):
            out = out.resize((img.shape[1], img.shape[0]), Image.Resampling.BILINEAR)
        return np.asarray(out.convert("RGB"), dtype=np.uint8)

    def draw(self, img: Image.Image, rng) -> Image.Image:  # pragma: no cover - abstract
        raise NotImplementedError

    def get_transform_init_args_names(self):
        return ()


class TextOverlay(_PilTransform):
    """Price tags, sale stickers and seller text at random places."""

    def __init__(self, max_items: int = 3, p: float = 0.5):
        super().__init__(p=p)
        self.max_items = max_items

    def draw(self, img, rng):
        d = ImageDraw.Draw(img)
        w, h = img.size
        for _ in range(int(rng.integers(1, self.max_items + 1))):
            text = str(rng.choice(_WORDS))
            font = _font(h * rng.uniform(0.05, 0.12))
            x, y = int(rng.integers(0, max(1, w * 3 // 4))), int(rng.integers(0, max(1, h * 7 // 8)))
            if rng.random() < 0.5:  # a tag with a background
                box = d.textbbox((x, y), text, font=font)
                d.rectangle([box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2], fill=_rng_colour(rng))
            d.text((x, y), text, fill=_rng_colour(rng), font=font)
        return img

    def get_transform_init_args_names(self):
        return ("max_items",)


class Watermark(_PilTransform):
    """Semi-transparent repeated seller name / logo across the picture."""

    def draw(self, img, rng):
        w, h = img.size
        layer = Image.new("RGBA", img.size, (0, 0, 0, 0))
        d = ImageDraw.Draw(layer)
        text = str(rng.choice(("shop", "seller", "www.store.com", "©", "PHOTO", "sample")))
        font = _font(h * rng.uniform(0.06, 0.14))
        alpha = int(rng.integers(40, 110))
        colour = (255, 255, 255, alpha) if rng.random() < 0.6 else (0, 0, 0, alpha)
        step_x, step_y = max(20, int(w * rng.uniform(0.3, 0.6))), max(20, int(h * rng.uniform(0.2, 0.4)))
        for y in range(int(rng.integers(0, step_y)), h, step_y):
            for x in range(-step_x // 2 + int(rng.integers(0, step_x)), w, step_x):
                d.text((x, y), text, fill=colour, font=font)
        if rng.random() < 0.5:  # a logo-like disc in a corner
            r = int(min(w, h) * rng.uniform(0.06, 0.12))
            cx, cy = (r + 4, r + 4) if rng.random() < 0.5 else (w - r - 4, h - r - 4)
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour[:3] + (min(255, alpha + 60),))
        return Image.alpha_composite(img.convert("RGBA"), layer)


class Border(_PilTransform):
    """A frame or padding around the photo (then scaled back to the input size)."""

    def draw(self, img, rng):
        w, h = img.size
        pad = int(min(w, h) * rng.uniform(0.03, 0.15))
        colour = (255, 255, 255) if rng.random() < 0.5 else _rng_colour(rng)
        framed = Image.new("RGB", (w + 2 * pad, h + 2 * pad), colour)
        framed.paste(img, (pad, pad))
        if rng.random() < 0.4:
            ImageDraw.Draw(framed).rectangle([pad // 2, pad // 2, w + pad * 3 // 2, h + pad * 3 // 2],
                                             outline=_rng_colour(rng), width=max(1, pad // 4))
        return framed


class Collage(_PilTransform):
    """Several views of the same item in a grid, as sellers post them (only this image: labels stay true)."""

    def draw(self, img, rng):
        w, h = img.size
        cols, rows = ((2, 1), (1, 2), (2, 2), (3, 1))[int(rng.integers(4))]
        tile_w, tile_h = w // cols, h // rows
        canvas = Image.new("RGB", (w, h), (255, 255, 255))
        for r in range(rows):
            for c in range(cols):
                zoom = rng.uniform(0.6, 1.0)
                cw, ch = int(w * zoom), int(h * zoom)
                x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                tile = img.crop((x0, y0, x0 + cw, y0 + ch))
                if rng.random() < 0.5:
                    tile = tile.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                canvas.paste(tile.resize((max(1, tile_w - 2), max(1, tile_h - 2))), (c * tile_w + 1, r * tile_h + 1))
        return canvas


class ScreenshotFrame(_PilTransform):
    """The photo inside app/browser chrome: a title bar, price line and margins."""

    def draw(self, img, rng):
        w, h = img.size
        top, bottom = int(h * rng.uniform(0.08, 0.18)), int(h * rng.uniform(0.1, 0.25))
        side = int(w * rng.uniform(0.0, 0.1))
        bg = (int(rng.integers(235, 256)),) * 3 if rng.random() < 0.7 else (int(rng.integers(10, 40)),) * 3
        fg = (20, 20, 20) if bg[0] > 128 else (230, 230, 230)
        canvas = Image.new("RGB", (w + 2 * side, h + top + bottom), bg)
        canvas.paste(img, (side, top))
        d = ImageDraw.Draw(canvas)
        d.rectangle([0, 0, canvas.width, max(2, top // 3)], fill=_rng_colour(rng))
        font = _font(bottom * 0.35)
        d.text((side + 4, top + h + 4), str(rng.choice(_WORDS)), fill=fg, font=font)
        d.text((side + 4, top + h + bottom // 2), f"${int(rng.integers(5, 5000))}", fill=fg, font=font)
        return canvas


class SmallBlurry(_PilTransform):
    """A small, soft listing thumbnail scaled up again."""

    def __init__(self, min_side: int = 48, max_side: int = 128, p: float = 0.5):
        super().__init__(p=p)
        self.min_side, self.max_side = min_side, max_side

    def draw(self, img, rng):
        w, h = img.size
        side = int(rng.integers(self.min_side, self.max_side + 1))
        scale = min(1.0, side / max(w, h))
        small = img.resize((max(1, int(w * scale)), max(1, int(h * scale))), Image.Resampling.BILINEAR)
        return small.resize((w, h), Image.Resampling.BILINEAR)

    def get_transform_init_args_names(self):
        return ("min_side", "max_side")
