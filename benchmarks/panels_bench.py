"""How well ``serving.panels.find_panels`` finds collage panels, how often it fires on ordinary photos, its cost.

    python benchmarks/panels_bench.py --split val [--collages 300] [--limit 0] [--side 1000]

Ordinary photos: every photo of the split in each dataset under ``--shared`` (false detection rate per
dataset, with the first few false detections' paths). Collages: made here from photos of the split with
layouts, gutters and fits a collage app offers (see ``make_collage``; deliberately not
``training.conditions.Collage``, which the robustness report uses), JPEG-compressed; a collage counts as
found when each panel is found as one box inside it (``matches``). Cost: milliseconds per call on
each photo as given and on ``--side`` px copies.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image

from serving.imageio import images_under
from serving.panels import find_panels

DATASETS = ("met-ivory", "generic-products", "caltech101-negatives", "art-antiques", "listings-everyday")
# (name, rows of column weights): each row is (row weight, [column weights])
LAYOUTS = {
    "2x2": [(1, [1, 1]), (1, [1, 1])],
    "1x2": [(1, [1, 1])],
    "2x1": [(1, [1]), (1, [1])],
    "3x3": [(1, [1, 1, 1])] * 3,
    "1x3": [(1, [1, 1, 1])],
    "big+2": "big_left",  # a large panel on the left, two stacked on the right
    "1+3": [(2, [1]), (1, [1, 1, 1])],  # a wide panel on top, three below
    "2+3": [(1, [1, 1]), (1, [1, 1, 1])],
}


def photos(shared: Path, split: str, name: str) -> list[Path]:
    root = shared / name / split
    return images_under(root)


def _fit(img: Image.Image, w: int, h: int, fit: str, colour) -> Image.Image:
    if fit == "cover":
        s = max(w / img.width, h / img.height)
        r = img.resize((max(w, round(img.width * s)), max(h, round(img.height * s))), Image.Resampling.BICUBIC)
        x, y = (r.width - w) // 2, (r.height - h) // 2
        return r.crop((x, y, x + w, y + h))
    s = min(w / img.width, h / img.height)
    r = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", (w, h), colour)
    canvas.paste(r, ((w - r.width) // 2, (h - r.height) // 2))
    return canvas


def make_collage(imgs: list[Image.Image], layout: str, side: int, gutter: int, colour, fit: str, border: bool,
                 rng: np.random.Generator) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    """A collage of ``side`` px (aspect drawn 0.75-1.33) and its true panel boxes."""
    W = side
    H = int(side * rng.uniform(0.75, 1.33))
    outer = gutter if border else 0
    canvas = Image.new("RGB", (W, H), colour)
    spec = LAYOUTS[layout]
    boxes = []
    if spec == "big_left":
        inner_w, inner_h = W - 2 * outer, H - 2 * outer
        bw = round((inner_w - gutter) * 0.6)
        sh = (inner_h - gutter) // 2
        boxes = [(outer, outer, outer + bw, outer + inner_h),
                 (outer + bw + gutter, outer, W - outer, outer + sh),
                 (outer + bw + gutter, outer + sh + gutter, W - outer, H - outer)]
    else:
        total = sum(r for r, _ in spec)
        inner_h = H - 2 * outer - gutter * (len(spec) - 1)
        y = outer
        for k, (rw, cols) in enumerate(spec):
            rh = round(inner_h * rw / total) if k < len(spec) - 1 else H - outer - y
            inner_w = W - 2 * outer - gutter * (len(cols) - 1)
            x = outer
            for j, cw in enumerate(cols):
                pw = round(inner_w * cw / sum(cols)) if j < len(cols) - 1 else W - outer - x
                boxes.append((x, y, x + pw, y + rh))
                x += pw + gutter
            y += rh + gutter
    content = []
    for img, (l, t, r, b) in zip(imgs, boxes):
        canvas.paste(_fit(img, r - l, b - t, fit, colour), (l, t))
        if fit == "contain":  # the photo inside its letterboxed panel
            s = min((r - l) / img.width, (b - t) / img.height)
            pw, ph = max(1, round(img.width * s)), max(1, round(img.height * s))
            x, y = l + (r - l - pw) // 2, t + (b - t - ph) // 2
            content.append((x, y, x + pw, y + ph))
        else:
            content.append((l, t, r, b))
    buf = io.BytesIO()
    canvas.save(buf, "JPEG", quality=int(rng.integers(70, 95)))
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), list(zip(boxes, content))


def _area(a) -> int:
    return max(0, a[2] - a[0]) * max(0, a[3] - a[1])


def _inter(a, b) -> int:
    return _area((max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])))


def matches(found, truth) -> bool:
    """The collage was taken apart: as many boxes as panels, each lying (>= 85% of its area) inside its own
    panel. Boxes may be smaller than their panel: uniform margins (a contain fit's padding, a product
    photo's white backdrop) are trimmed."""
    owner = []
    for f in found:
        inside = [k for k, (box, _) in enumerate(truth) if _inter(f, box) >= 0.85 * _area(f)]
        if not inside:
            return False
        owner.append(inside[0])
    return sorted(owner) == list(range(len(truth)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", type=Path, default=Path("/work/shared/datasets"))
    ap.add_argument("--split", default="val")
    ap.add_argument("--collages", type=int, default=300)
    ap.add_argument("--limit", type=int, default=0, help="photos per dataset for the false detection rate (0: all)")
    ap.add_argument("--side", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)

    print(f"ordinary photos ({args.split}): false detection rate")
    times, pool = [], []
    for name in DATASETS:
        paths = photos(args.shared, args.split, name)
        if args.limit:
            paths = [paths[i] for i in sorted(rng.permutation(len(paths))[: args.limit])]
        fired = []
        for p in paths:
            img = Image.open(p).convert("RGB")
            pool.append(img)
            t = time.perf_counter()
            found = find_panels(img)
            times.append(time.perf_counter() - t)
            if found:
                fired.append((p, len(found)))
        print(f"  {name:22s} {len(fired):4d} / {len(paths):4d} = {len(fired) / max(1, len(paths)):.2%}  "
              + ", ".join(f"{p.relative_to(args.shared)}({n})" for p, n in fired[:4]))
    print(f"  detector on the photos as given (<= 384 px): {1000 * np.mean(times):.2f} ms mean, "
          f"{1000 * np.percentile(times, 95):.2f} ms p95")

    big = []
    for img in pool[:: max(1, len(pool) // 100)][:100]:
        s = args.side / max(img.size)
        big.append(img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.BICUBIC))
    t = time.perf_counter()
    fired_big = sum(bool(find_panels(img)) for img in big)
    print(f"  {len(big)} photos upscaled to {args.side} px: {1000 * (time.perf_counter() - t) / len(big):.2f} ms "
          f"mean, fired on {fired_big}")

    print(f"collages ({args.collages}, from {args.split} photos, {args.side} px +-): taken apart (see matches)")
    per: dict[str, list[bool]] = {}
    ctimes = []
    colours = [(255, 255, 255), (0, 0, 0), (240, 240, 240), (128, 128, 128), (250, 220, 230), (200, 230, 255)]
    for k in range(args.collages):
        layout = list(LAYOUTS)[k % len(LAYOUTS)]
        gutter = int(rng.choice([0, 0, 2, 5, 10, 20]))
        colour = colours[int(rng.integers(len(colours)))]
        fit = "cover" if rng.random() < 0.7 else "contain"
        border = bool(rng.random() < 0.3) and gutter > 0
        n = 9 if layout == "3x3" else 6
        imgs = [pool[i] for i in rng.choice(len(pool), n, replace=False)]
        side = int(args.side * rng.uniform(0.6, 1.2))
        collage, truth = make_collage(imgs, layout, side, gutter, colour, fit, border, rng)
        t = time.perf_counter()
        found = find_panels(collage)
        ctimes.append(time.perf_counter() - t)
        ok = matches(found, truth)
        key = f"{layout} gutter {'0' if gutter == 0 else '>0'} {fit}"
        per.setdefault(key, []).append(ok)
        per.setdefault(f"layout {layout}", []).append(ok)
        per.setdefault(f"gutter {gutter}", []).append(ok)
        per.setdefault("all", []).append(ok)
    for key in sorted(per):
        print(f"  {key:32s} {np.mean(per[key]):.2f} ({sum(per[key])}/{len(per[key])})")
    print(f"  detector on collages: {1000 * np.mean(ctimes):.2f} ms mean, {1000 * np.percentile(ctimes, 95):.2f} ms p95")


if __name__ == "__main__":
    from _entry import run_main  # benchmarks/ is sys.path[0] here: one line for a user's mistake

    run_main(main)
