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


# --- scenes built from several photos ---------------------------------------------------------------
# The photos above change one picture. Listing photos also put the product among other things: in a
# collage with unrelated photos, small inside an app screenshot, on a cluttered table. Museum photos
# (most positives) never do, and ordinary photos (the negatives) never show an object alone on a plain
# backdrop, so without these scenes "plain backdrop" and "clutter" become labels. ``ListingScene``
# composes them from the image and a bank of other photos (the negatives pool), label-preserving:
# the image's own content is always whole in view, the added photos are all negatives.


def plain_background_mask(img: np.ndarray, tolerance: float = 28.0) -> np.ndarray | None:
    """A soft foreground mask (float32 HxW in [0, 1]) for a photo of an object on a plain backdrop.

    The backdrop colour is the median of the border; pixels far from it are the object. Returns None
    when the border is not plain (a cluttered photo) or the object would be tiny or fill the frame.
    """
    import cv2

    h, w = img.shape[:2]
    b = max(2, min(h, w) // 40)
    border = np.concatenate([img[:b].reshape(-1, 3), img[-b:].reshape(-1, 3), img[:, :b].reshape(-1, 3),
                             img[:, -b:].reshape(-1, 3)]).astype(np.float32)
    colour = np.median(border, axis=0)
    if np.percentile(np.abs(border - colour).max(axis=1), 80) > tolerance:
        return None
    distance = np.abs(img.astype(np.float32) - colour).max(axis=2)
    mask = (distance > tolerance).astype(np.uint8)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5))
    mask = cv2.morphologyEx(mask, cv2.MORPH_CLOSE, kernel, iterations=2)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
    n, comp, stats, _ = cv2.connectedComponentsWithStats(mask)
    if n < 2:
        return None
    keep = 1 + np.argsort(stats[1:, cv2.CC_STAT_AREA])[::-1]
    total = stats[1:, cv2.CC_STAT_AREA].sum()
    chosen = np.zeros_like(mask)
    for label in keep:  # the largest components holding 95% of the object
        chosen[comp == label] = 1
        if chosen.sum() >= 0.95 * total:
            break
    share = chosen.mean()
    if share < 0.04 or share > 0.85:
        return None
    chosen = cv2.dilate(chosen, kernel)
    return cv2.GaussianBlur(chosen.astype(np.float32), (0, 0), 1.5)


def _cover(img: np.ndarray, h: int, w: int, rng) -> np.ndarray:
    """A random crop of ``img`` resized to cover (h, w)."""
    import cv2

    ih, iw = img.shape[:2]
    scale = max(h / ih, w / iw) * rng.uniform(1.0, 1.4)
    nh, nw = max(h, int(round(ih * scale))), max(w, int(round(iw * scale)))
    big = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    y, x = int(rng.integers(0, nh - h + 1)), int(rng.integers(0, nw - w + 1))
    return big[y : y + h, x : x + w]


def _fit(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """``img`` resized to fit inside (h, w), aspect kept."""
    import cv2

    ih, iw = img.shape[:2]
    s = min(h / ih, w / iw)
    return cv2.resize(img, (max(1, int(iw * s)), max(1, int(ih * s))), interpolation=cv2.INTER_AREA)


def _plain_backdrop(h: int, w: int, rng) -> np.ndarray:
    """A museum-like backdrop: light, mid or dark grey (slightly tinted), with a soft vertical gradient."""
    base = float(rng.choice([rng.uniform(200, 250), rng.uniform(110, 170), rng.uniform(10, 50)]))
    tint = rng.uniform(-8, 8, 3)
    ramp = np.linspace(-1, 1, h)[:, None, None] * rng.uniform(0, 18)
    return np.clip(base + tint + ramp + np.zeros((h, w, 3)), 0, 255).astype(np.uint8)


class ListingScene(ImageOnlyTransform):
    """The image inside a listing-like scene made with photos from ``bank`` (set by the training loop).

    One of, chosen with the given weights:
    - ``collage``: one tile of a 2x2 (or 1x2 / 2x1 / 3x3) grid, the other tiles bank photos;
    - ``frame``: shown small (about 1/9 to 1/4 of the area) inside a plain app/screenshot frame with a UI bar;
    - ``cutout``: an object photographed on a plain backdrop is cut out (``plain_background_mask``) and put
      on a cluttered bank photo; any other photo is put, as a print, on a plain museum-like backdrop.
    Place it after the crop: the image stays whole in the scene, so its label stays true.
    """

    def __init__(self, collage: float = 1.0, frame: float = 1.0, cutout: float = 1.0, p: float = 0.3):
        super().__init__(p=p)
        self.weights = np.asarray([collage, frame, cutout], dtype=np.float64)
        if self.weights.sum() <= 0 or (self.weights < 0).any():
            raise ValueError("ListingScene weights must be >= 0 with a positive sum")
        self.bank: list[np.ndarray] = []

    def get_transform_init_args_names(self):
        return ("collage", "frame", "cutout")

    def _bank_photo(self, rng) -> np.ndarray:
        return self.bank[int(rng.integers(len(self.bank)))]

    def apply(self, img: np.ndarray, **params) -> np.ndarray:
        if not self.bank:
            return img
        rng = np.random.default_rng(int(self.random_generator.integers(2**32)))
        kind = int(rng.choice(3, p=self.weights / self.weights.sum()))
        return (self._collage, self._frame, self._cutout)[kind](img, rng)

    def _collage(self, img, rng):
        h, w = img.shape[:2]
        rows, cols = ((2, 2), (2, 2), (1, 2), (2, 1), (3, 3))[int(rng.integers(5))]
        gap = int(rng.integers(0, 4))
        canvas = np.full((h, w, 3), 255 if rng.random() < 0.7 else int(rng.integers(0, 256)), np.uint8)
        th, tw = (h - gap * (rows - 1)) // rows, (w - gap * (cols - 1)) // cols
        mine = int(rng.integers(rows * cols))
        for k in range(rows * cols):
            r, c = divmod(k, cols)
            if k == mine:  # the image itself is never cropped: fitted whole, centred on its own backdrop colour
                fitted = _fit(img, th, tw)
                tile = np.full((th, tw, 3), np.median(img.reshape(-1, 3), axis=0), np.uint8)
                y0, x0 = (th - fitted.shape[0]) // 2, (tw - fitted.shape[1]) // 2
                tile[y0 : y0 + fitted.shape[0], x0 : x0 + fitted.shape[1]] = fitted
            else:
                tile = _cover(self._bank_photo(rng), th, tw, rng)
            y, x = r * (th + gap), c * (tw + gap)
            canvas[y : y + th, x : x + tw] = tile
        return canvas

    def _frame(self, img, rng):
        h, w = img.shape[:2]
        light = rng.random() < 0.75
        canvas = np.full((h, w, 3), int(rng.integers(228, 256)) if light else int(rng.integers(12, 45)), np.uint8)
        bar = int(h * rng.uniform(0.06, 0.12))
        canvas[:bar] = rng.integers(0, 256, 3)
        area = rng.uniform(1 / 9, 1 / 4)
        side = np.sqrt(area)
        fitted = _fit(img, int(h * side), int(w * side))
        fh, fw = fitted.shape[:2]
        y = int(rng.integers(bar + 2, max(bar + 3, h - fh)))
        x = int(rng.integers(0, max(1, w - fw)))
        y = min(y, h - fh)
        canvas[y : y + fh, x : x + fw] = fitted
        ink = 40 if light else 215  # text-like lines beside/below the photo: title, price, seller
        for _ in range(int(rng.integers(2, 6))):
            ty = int(rng.integers(bar + 2, h - 4))
            tx = int(rng.integers(0, w // 2))
            if y <= ty <= y + fh and x <= tx <= x + fw:
                continue
            canvas[ty : ty + 3, tx : tx + int(rng.integers(w // 8, w // 2))] = ink
        return canvas

    def _cutout(self, img, rng):
        h, w = img.shape[:2]
        mask = plain_background_mask(img)
        if mask is not None:  # an object on a plain backdrop -> among clutter
            scene = _cover(self._bank_photo(rng), h, w, rng).astype(np.float32)
            s = rng.uniform(0.55, 0.95)
            obj, m = _fit(img, int(h * s), int(w * s)), _fit(mask[..., None].repeat(3, 2), int(h * s), int(w * s))
            oh, ow = obj.shape[:2]
            y, x = int(rng.integers(0, h - oh + 1)), int(rng.integers(0, w - ow + 1))
            region = scene[y : y + oh, x : x + ow]
            scene[y : y + oh, x : x + ow] = m * obj + (1 - m) * region
            return np.clip(scene, 0, 255).astype(np.uint8)
        # an ordinary photo -> on a plain backdrop, like a print or object in a museum shot
        canvas = _plain_backdrop(h, w, rng)
        s = rng.uniform(0.5, 0.85)
        fitted = _fit(img, int(h * s), int(w * s))
        fh, fw = fitted.shape[:2]
        y, x = (h - fh) // 2 + int(rng.integers(-h // 12, h // 12 + 1)), (w - fw) // 2 + int(rng.integers(-w // 12, w // 12 + 1))
        y, x = min(max(0, y), h - fh), min(max(0, x), w - fw)
        canvas[y : y + fh, x : x + fw] = fitted
        return canvas
