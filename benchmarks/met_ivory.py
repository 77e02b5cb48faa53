"""Met ivory benchmark: train the default config on real photos, report Met val metrics and speed.

    python benchmarks/met_ivory.py [--out runs/met] [--epochs N] [--no-negatives]

Trains on met-ivory train (+ generic-products and caltech101-negatives as a per-epoch negatives pool),
picks the best epoch on val, then evaluates on Met val alone (the number the target is stated in) and
on the negatives' val splits (false-positive rate for ivory).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "runs" / "met_ivory"))
    parser.add_argument("--config", default=str(REPO / "configs" / "met_ivory.yaml"))
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--no-negatives", action="store_true", help="train on met-ivory alone")
    args = parser.parse_args()
    met = SHARED / "met-ivory"
    if not met.is_dir():
        print(f"{met} not found: this benchmark needs ../shared/datasets", file=sys.stderr)
        return 2

    from training.config import load_config
    from training.evaluate import evaluate
    from training.train import train

    config = load_config(args.config, {"train": {"epochs": args.epochs}})
    if args.no_negatives:
        config.data.negatives = []
    else:
        config.data.negatives = [str(SHARED / "generic-products"), str(SHARED / "caltech101-negatives")]
    t0 = time.time()
    summary = train([str(met)], args.out, config)
    wall = time.time() - t0
    print("\n== Met val (met-ivory/val only) ==")
    met_val = evaluate(args.out, [str(met)], split="val", out_dir=Path(args.out) / "eval_met_val")
    rows = {"met_val": met_val}
    for name in ("generic-products", "caltech101-negatives"):
        if (SHARED / name).is_dir():
            print(f"\n== {name} val (all 'other') ==")
            rows[name] = evaluate(args.out, [str(SHARED / name)], split="val")
    import csv

    with open(Path(args.out) / "history.csv") as fh:
        history = list(csv.DictReader(fh))
    speed = sum(float(r["train_images_per_s"]) for r in history) / len(history)
    print("\n| metric | value |\n|---|---|")
    print(f"| Met val balanced accuracy | {met_val['balanced_accuracy']:.4f} |")
    print(f"| Met val accuracy | {met_val['accuracy']:.4f} |")
    print(f"| Met val macro-F1 | {met_val['macro_f1']:.4f} |")
    print(f"| Met val ivory PR-AUC | {met_val['per_class']['ivory']['pr_auc']:.4f} |")
    for name in ("generic-products", "caltech101-negatives"):
        if name in rows:
            fp = 1.0 - rows[name]["accuracy"]
            print(f"| {name} val: share called ivory (argmax) | {fp:.4f} |")
    print(f"| best epoch / epochs run | {summary['best_epoch']} / {len(history)} |")
    print(f"| training wall time (incl. caching, validation) | {wall / 60:.1f} min |")
    print(f"| training images/s (mean over epochs) | {speed:.1f} |")
    (Path(args.out) / "benchmark.json").write_text(json.dumps(
        {"met_val": {k: met_val[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "confusion_matrix")},
         "wall_seconds": wall, "train_images_per_s": speed}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
