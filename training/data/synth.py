"""``wildcheck data synth``: a deterministic synthetic dataset of listing-like photos.

A stand-in for demos and tests only: the pictures are drawn shapes (cream carvings and bangles for
``ivory``, piles of brown scales for ``pangolin_scales``, striped pelts for ``tiger_skin``, assorted
household products for ``other``) on listing backgrounds with price tags and text. Real quality is
measured on real photos, never on these.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from serving.errors import InvalidInput
from training.fileio import atomic_path, atomic_write_text
from training.outputs import new_run_folder

MARKER = "synth.json"  # written by synthesize: the folder holds its earlier output, which a rerun may replace

CLASSES = ("ivory", "pangolin_scales", "tiger_skin", "other")
_WORDS = ("SALE", "antique", "rare", "NEW", "vintage", "free ship", "genuine", "collector", "OBO", "lot", "gift")


def _background(rng: np.random.RandomState, size: int) -> Image.Image:
    kind = rng.randint(4)
    if kind == 0:  # plain studio white / grey
        v = rng.randint(200, 256)
        return Image.new("RGB", (size, size), (v, v, v - rng.randint(0, 10)))
    if kind == 1:  # wood table
        base = np.array([rng.randint(90, 160), rng.randint(55, 100), rng.randint(20, 60)], np.float32)
        y = np.arange(size, dtype=np.float32)[:, None]
        grain = np.sin(y / rng.uniform(3, 9) + np.sin(np.arange(size)[None, :] / rng.uniform(20, 60)) * 3) * 18
        arr = np.clip(base[None, None, :] + grain[..., None], 0, 255).astype(np.uint8)
        return Image.fromarray(np.broadcast_to(arr, (size, size, 3)).copy())
    if kind == 2:  # fabric checks
        c1, c2 = rng.randint(60, 230, 3), rng.randint(60, 230, 3)
        step = rng.randint(8, 24)
        yy, xx = np.mgrid[0:size, 0:size]
        mask = ((yy // step + xx // step) % 2).astype(bool)
        arr = np.where(mask[..., None], c1, c2).astype(np.uint8)
        return Image.fromarray(arr)
    top, bottom = rng.randint(80, 256, 3), rng.randint(80, 256, 3)  # gradient
    t = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
    arr = (top * (1 - t) + bottom * t).astype(np.uint8)
    return Image.fromarray(np.broadcast_to(arr, (size, size, 3)).copy())


def _cream(rng) -> tuple[int, int, int]:
    return (rng.randint(225, 250), rng.randint(210, 235), rng.randint(170, 200))


def _draw_ivory(draw: ImageDraw.ImageDraw, rng, size: int) -> None:
    kind = rng.randint(3)
    cx, cy = rng.randint(size // 3, 2 * size // 3, 2)
    if kind == 0:  # bangles: thick cream rings
        for _ in range(rng.randint(1, 4)):
            r = rng.randint(size // 8, size // 4)
            x, y = cx + rng.randint(-size // 6, size // 6), cy + rng.randint(-size // 6, size // 6)
            draw.ellipse([x - r, y - r, x + r, y + r], outline=_cream(rng), width=max(3, r // 3))
    elif kind == 1:  # carved figurine: stacked ellipses with grain lines
        h = rng.randint(size // 3, size // 2)
        w = h // 3
        for k in range(4):
            y0 = cy - h // 2 + k * h // 4
            draw.ellipse([cx - w + k * 2, y0, cx + w - k * 2, y0 + h // 3], fill=_cream(rng))
        for k in range(6):
            y = cy - h // 2 + k * h // 6
            draw.line([cx - w // 2, y, cx + w // 2, y + 2], fill=(200, 185, 150), width=1)
    else:  # tusk: a thick crescent
        r = rng.randint(size // 4, size // 3)
        box = [cx - r, cy - r, cx + r, cy + r]
        start = rng.randint(0, 360)
        draw.arc(box, start, start + 150, fill=_cream(rng), width=max(6, r // 4))


def _draw_pangolin(draw: ImageDraw.ImageDraw, rng, size: int) -> None:
    cx, cy = rng.randint(size // 3, 2 * size // 3, 2)
    spread = rng.randint(size // 6, size // 3)
    for _ in range(rng.randint(25, 60)):
        x, y = cx + rng.randint(-spread, spread), cy + rng.randint(-spread, spread)
        s = rng.randint(size // 30 + 3, size // 14 + 5)
        colour = (rng.randint(90, 150), rng.randint(60, 100), rng.randint(30, 60))
        angle = rng.uniform(0, 2 * math.pi)
        pts = [(x + s * math.cos(angle + a), y + s * math.sin(angle + a)) for a in (0, 2.2, 4.1)]
        draw.polygon(pts, fill=colour, outline=(60, 40, 20))


def _draw_tiger(draw: ImageDraw.ImageDraw, rng, size: int) -> None:
    x0, y0 = rng.randint(size // 10, size // 4, 2)
    x1, y1 = size - rng.randint(size // 10, size // 4, 2)
    draw.rounded_rectangle([x0, y0, x1, y1], radius=size // 10, fill=(rng.randint(200, 240), rng.randint(110, 150), 40))
    for _ in range(rng.randint(6, 12)):
        x = rng.randint(x0, x1)
        draw.line([x, y0, x + rng.randint(-20, 20), y1], fill=(25, 20, 15), width=rng.randint(3, 8))


def _draw_other(draw: ImageDraw.ImageDraw, rng, size: int) -> None:
    kind = rng.randint(4)
    colour = tuple(int(c) for c in rng.randint(0, 256, 3))
    cx, cy = rng.randint(size // 3, 2 * size // 3, 2)
    s = rng.randint(size // 6, size // 3)
    if kind == 0:  # box
        draw.rectangle([cx - s, cy - s // 2, cx + s, cy + s // 2], fill=colour, outline=(0, 0, 0))
    elif kind == 1:  # mug
        draw.rectangle([cx - s // 2, cy - s // 2, cx + s // 2, cy + s // 2], fill=colour)
        draw.arc([cx + s // 3, cy - s // 4, cx + s, cy + s // 4], 270, 90, fill=colour, width=6)
    elif kind == 2:  # t-shirt
        draw.polygon([(cx - s, cy - s // 2), (cx - s // 2, cy - s), (cx + s // 2, cy - s), (cx + s, cy - s // 2),
                      (cx + s // 2, cy - s // 4), (cx + s // 2, cy + s), (cx - s // 2, cy + s),
                      (cx - s // 2, cy - s // 4)], fill=colour)
    else:  # shoe
        draw.chord([cx - s, cy - s // 2, cx + s, cy + s], 180, 360, fill=colour)
        draw.rectangle([cx - s, cy + s // 4 - 4, cx + s, cy + s // 4 + 4], fill=(30, 30, 30))


_DRAWERS = {"ivory": _draw_ivory, "pangolin_scales": _draw_pangolin, "tiger_skin": _draw_tiger, "other": _draw_other}


def _overlay_text(img: Image.Image, rng, size: int) -> None:
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=max(10, size // 14))
    if rng.rand() < 0.7:  # price tag
        x, y = rng.randint(0, size * 2 // 3), rng.randint(0, size * 5 // 6)
        text = f"${rng.randint(5, 2000)}"
        box = draw.textbbox((x, y), text, font=font)
        draw.rectangle([box[0] - 3, box[1] - 3, box[2] + 3, box[3] + 3], fill=(255, 230, 0) if rng.rand() < 0.5 else (255, 255, 255))
        draw.text((x, y), text, fill=(0, 0, 0), font=font)
    if rng.rand() < 0.5:
        word = _WORDS[rng.randint(len(_WORDS))]
        draw.text((rng.randint(0, size // 2), rng.randint(0, size - size // 10)), word,
                  fill=tuple(int(c) for c in rng.randint(0, 256, 3)), font=font)


def make_image(label: str, seed: int, size: int = 256) -> Image.Image:
    """One deterministic picture of ``label``."""
    rng = np.random.RandomState(seed)
    img = _background(rng, size)
    _DRAWERS[label](ImageDraw.Draw(img), rng, size)
    if rng.rand() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2)))
    _overlay_text(img, rng, size)
    return img


def synthesize(out: str | Path, per_class: int = 40, size: int = 256, seed: int = 0,
               classes: tuple[str, ...] = CLASSES, splits: dict[str, float] | None = None) -> dict[str, dict[str, int]]:
    """Write ``OUT/<split>/<label>/<label>_<n>.jpg``; ``per_class`` images per class in train, a quarter in val/test."""
    splits = splits or {"train": 1.0, "val": 0.25, "test": 0.25}
    out = _synth_folder(out, splits)
    counts: dict[str, dict[str, int]] = {}
    for s_idx, (split, frac) in enumerate(splits.items()):
        n = max(2, int(round(per_class * frac)))
        for c_idx, label in enumerate(classes):
            folder = out / split / label
            folder.mkdir(parents=True, exist_ok=True)
            names = set()
            for k in range(n):
                image_seed = (seed * 1_000_003 + s_idx * 100_003 + c_idx * 10_007 + k) % (2**31)
                names.add(f"{label}_{k:05d}.jpg")
                with atomic_path(folder / f"{label}_{k:05d}.jpg") as tmp:
                    make_image(label, image_seed, size).save(tmp, format="JPEG", quality=int(80 + image_seed % 15))
            for old in folder.glob(f"{label}_*.jpg"):  # an earlier, larger run's: not part of this dataset
                if old.name not in names:
                    old.unlink()
            counts.setdefault(split, {})[label] = n
    _remove_other_labels(out, splits, classes)
    atomic_write_text(out / MARKER, json.dumps({"per_class": per_class, "size": size, "seed": seed,
                                                "classes": list(classes), "counts": counts}, indent=1))
    return counts


def _remove_other_labels(out: Path, splits: dict[str, float], classes: tuple[str, ...]) -> None:
    """An earlier run's drawings of labels this run leaves out (``classes`` differ) would still be read as data."""
    for split in splits:
        for folder in (out / split).iterdir():
            if folder.is_dir() and folder.name not in classes:
                for old in folder.glob(f"{folder.name}_*.jpg"):
                    old.unlink()
                if not any(folder.iterdir()):
                    folder.rmdir()


def _synth_folder(out: str | Path, splits: dict[str, float]) -> Path:
    """A new or empty folder, or one holding only an earlier ``synthesize`` output (its ``MARKER``): drawings
    written into a real dataset would be trained and evaluated on as photos."""
    out = new_run_folder(out, [*splits, MARKER], option="", what="dataset folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise InvalidInput(f"{out} already holds {', '.join(sorted(p.name for p in out.iterdir())[:4])} and is not an "
                           f"earlier `wildcheck data synth` output ({MARKER} missing): the drawings would be mixed "
                           f"into it. Choose a new folder")
    return out
