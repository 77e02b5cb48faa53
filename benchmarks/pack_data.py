"""Compact copies of the shared datasets, for moving them to a GPU machine with a small upload limit.

    python benchmarks/pack_data.py --out PACK [--pool NAME[:SOURCES]=SUBSET ...] [--quality 75]

Each image is resized so its shorter side is at most ``--short-side`` (293 px: what training caches for
256 px input at crop 0.875, so nothing the model sees is lost) and re-encoded as WebP. ``--train-cap``
keeps a stratified random subset of a pool's training images (the per-epoch negatives draw never uses a
whole large pool in a 12-epoch run); validation images are all kept. Layout is kept (split/label/source).
"""

from __future__ import annotations

import argparse
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
EXTS = {".jpg", ".jpeg", ".png", ".webp"}


def convert(src: Path, dst: Path, short_side: int, quality: int) -> int:
    """``src`` as a WebP of at most ``short_side`` px on its short side, written whole or not at all (a save that
    fails half-way, now that the pack goes on past a bad image, left a partial file in the pack)."""
    from training.fileio import atomic_path

    with Image.open(src) as opened:
        img = opened.convert("RGB")
    scale = short_side / min(img.size)
    if scale < 1:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BICUBIC)
    with atomic_path(dst) as tmp:
        img.save(tmp, "WEBP", quality=quality, method=6)
    return dst.stat().st_size


def plan(dataset: str, sources: list[str] | None, train_cap: int | None, seed: int, shared: Path = SHARED) -> list[Path]:
    root = shared / dataset
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in EXTS)
    if sources:  # keep only these source folders (split/label/<source>/...)
        files = [p for p in files if len(p.relative_to(root).parts) > 3 and p.relative_to(root).parts[2] in sources]
    train = [p for p in files if p.relative_to(root).parts[0] == "train"]
    rest = [p for p in files if p.relative_to(root).parts[0] != "train"]
    if train_cap and len(train) > train_cap:
        rng = random.Random(seed)
        by_group: dict[str, list[Path]] = {}
        for p in train:  # stratify by source folder, else by file-name prefix (Caltech category)
            rel = p.relative_to(root).parts
            key = rel[2] if len(rel) > 3 else (p.name.split("_image_")[0] if "_image_" in p.name else "")
            by_group.setdefault(key, []).append(p)
        keep: list[Path] = []
        for key in sorted(by_group):
            group = by_group[key]
            rng.shuffle(group)
            keep += group[: max(1, round(train_cap * len(group) / len(train)))]
        train = sorted(keep)
    return train + rest


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--pool", action="append", required=True,
                    help="NAME[:SRC1,SRC2][=TRAIN_CAP][@OUTNAME], e.g. art-antiques:artbreaker,byzart2k@art-clean")
    ap.add_argument("--short-side", type=int, default=293)
    ap.add_argument("--quality", type=int, default=75)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shared", type=Path, default=SHARED, help="the folder holding the pools")
    args = ap.parse_args()
    out = Path(args.out)
    jobs, planned = [], set()
    for spec in args.pool:
        spec, _, outname = spec.partition("@")
        spec, _, cap = spec.partition("=")
        name, _, srcs = spec.partition(":")
        if cap and not (cap.isdigit() and int(cap) > 0):
            ap.error(f"--pool {spec}={cap}: TRAIN_CAP is a number of training images, e.g. {name}=2000")
        if not (args.shared / name).is_dir():
            print(f"{args.shared / name} not found", file=sys.stderr)
            return 2
        for p in plan(name, srcs.split(",") if srcs else None, int(cap) if cap else None, args.seed, args.shared):
            rel = p.relative_to(args.shared / name)
            target = out / (outname or name) / rel.with_suffix(".webp")
            if target in planned:  # a.jpg and a.png of one folder: both kept (a.png.webp), not one over the other
                target = target.with_name(rel.name + ".webp")
            planned.add(target)
            jobs.append((p, target))

    def one(job: tuple[Path, Path]) -> int | str:  # an unreadable image is reported, not the end of the pack
        try:
            return convert(*job, args.short_side, args.quality)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            return f"{job[0]}: {exc}"

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, jobs))
    sizes, failed = [r for r in results if isinstance(r, int)], [r for r in results if isinstance(r, str)]
    for line in failed:
        print(f"skipped {line}", file=sys.stderr)
    print(f"{len(sizes)} images, {sum(sizes) / 2**20:.1f} MiB in {out}" + (f"; {len(failed)} unreadable skipped" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    from _entry import run_main  # benchmarks/ is sys.path[0] here: one line for a user's mistake

    run_main(main)
