"""Which photos does a model catch as is and miss under a condition? A list and a contact sheet per condition.

    python benchmarks/condition_misses.py --cache runs/ensemble_check --runs runs/A,runs/B \
        [--conditions crop,phone] [--label ivory] [--budget 0.01] --out runs/misses

Reads the logits ``ensemble_check.py`` cached for the runs (named as they were screened; averaged when several, as
``wildcheck ensemble`` does), sets the score that flags 1% of the clean negatives, and lists the ``--label``
photos above it as is and at or under it with the condition: ``misses.csv`` (condition, path, clean score,
score under the condition, threshold) and ``missed_<condition>.png``, the photos as the model saw them, so a
person can tell a photo that no longer shows the material from one the model should have read.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from ensemble_check import (budget_threshold, checkpoint_of, class_margin, condition_images, is_cached, key,  # noqa: E402
                            validation_of)

CELL = 160  # contact-sheet cell, pixels


def cached_photos(run: Path, cache: Path) -> list:
    """(sample, decoded image) of every photo in the cache, in its order: the run's validation photos that decode."""
    from training.predict import readable, run_samples

    meta = np.load(cache / "meta.npz")
    if str(meta["validation"]) != validation_of(run):
        raise SystemExit(f"{run} records other validation photos than {cache} holds: name the runs it screened")
    checkpoint = checkpoint_of(run)
    val, _ = run_samples(checkpoint, None)
    kept = readable(val, checkpoint.spec)
    if len(kept) != len(meta["y"]):
        raise SystemExit(f"{len(kept)} photos decode now, {len(meta['y'])} did when {cache} was filled: name a new cache")
    return kept


def contact_sheet(images: list[Image.Image], captions: list[str], columns: int = 8) -> Image.Image:
    rows = max(1, -(-len(images) // columns))
    sheet = Image.new("RGB", (columns * CELL, rows * CELL), "white")
    draw = ImageDraw.Draw(sheet)
    for k, (img, caption) in enumerate(zip(images, captions)):
        x, y = (k % columns) * CELL, (k // columns) * CELL
        small = img.copy()
        small.thumbnail((CELL - 4, CELL - 4))
        sheet.paste(small, (x, y))
        draw.text((x + 2, y + 2), caption, fill=(220, 0, 0))
    return sheet


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", required=True, help="an ensemble_check.py cache holding the runs' logits")
    ap.add_argument("--runs", required=True, help="RUN1,RUN2,...: run dirs as screened (averaged when several)")
    ap.add_argument("--conditions", default="crop,phone")
    ap.add_argument("--label", default="ivory", help="the protected class")
    ap.add_argument("--budget", type=float, default=0.01, help="share of clean negatives flagged")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from training.conditions import default_conditions

    cache, runs = Path(args.cache), [Path(r) for r in args.runs.split(",")]
    conditions = args.conditions.split(",")
    known = default_conditions()
    if unknown := [c for c in conditions if c not in known]:
        raise SystemExit(f"unknown condition(s) {unknown}: choose from {sorted(known)}")
    meta = np.load(cache / "meta.npz")
    c = list(meta["labels"]).index(args.label)
    positive = meta["y"] == c
    logits = []
    for run in runs:
        if not is_cached(cache / f"{key(run)}.npz", run, {"clean", *conditions}):
            raise SystemExit(f"{cache} holds no logits of {run} as it is now under {', '.join(conditions)}: "
                             f"screen it with ensemble_check.py --cache {cache} --conditions clean,{','.join(conditions)}")
        logits.append(np.load(cache / f"{key(run)}.npz"))
    score = {cond: class_margin(np.mean([z[cond] for z in logits], axis=0), c) for cond in ["clean", *conditions]}
    threshold = budget_threshold(score["clean"][~positive], args.budget)
    kept = cached_photos(next(r for r in runs if r.suffix != ".onnx"), cache)
    others = [img for _, img in kept[:3]]  # the collage's other panels, as the cache drew them
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    print(f"{args.label}: {positive.sum()} photos, {np.sum(score['clean'][positive] <= threshold)} missed as is "
          f"(threshold {threshold:.3f}, {args.budget:.0%} of {np.sum(~positive)} negatives)")
    for cond in conditions:
        missed = np.flatnonzero(positive & (score["clean"] > threshold) & (score[cond] <= threshold))
        shown = condition_images(cond, [kept[i] for i in missed], others)
        contact_sheet(shown, [Path(kept[i][0].path).stem for i in missed]).save(out / f"missed_{cond}.png")
        rows += [{"condition": cond, "path": str(kept[i][0].path), "clean": f"{score['clean'][i]:.3f}",
                  "under_condition": f"{score[cond][i]:.3f}", "threshold": f"{threshold:.3f}"} for i in missed]
        print(f"{cond}: {np.sum(positive & (score[cond] <= threshold))} missed, {len(missed)} of them only under it "
              f"-> {out / f'missed_{cond}.png'}")
    with open(out / "misses.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, ["condition", "path", "clean", "under_condition", "threshold"])
        writer.writeheader()
        writer.writerows(rows)
    return 0


if __name__ == "__main__":
    from _entry import run_main  # benchmarks/ is sys.path[0] here: one line for a user's mistake

    run_main(main)
