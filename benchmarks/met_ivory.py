"""Met ivory benchmark: train the default config on real photos, report Met val metrics and speed.

    python benchmarks/met_ivory.py [--out runs/met] [--epochs N] [--no-negatives] [--no-train]

Trains on met-ivory train (+ generic-products and caltech101-negatives as a per-epoch negatives pool),
picks the best epoch on val, then evaluates on Met val alone (the number the target is stated in) and
on every negatives pool's val split: false-positive rate for ivory, and flag/block rates per source
folder (PNGs of each source's most confident false positives in OUT/eval_<pool>/false_positives_by_source/).
``--no-train`` evaluates an existing run in --out (or an ONNX file given with --model) instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"
POOLS = ("generic-products", "caltech101-negatives", "art-antiques", "listings-everyday")


def source_table(rows: dict) -> str:
    """Markdown: flag and block rate per pool/source of negatives (evaluate's per_source)."""
    lines = ["| negatives source | images | flagged (review+block) | blocked | top ivory-like score |", "|---|---|---|---|---|"]
    for name in POOLS:
        for origin, r in (rows.get(name, {}).get("per_source") or {}).items():
            top = r["top"][0]["score"] if r["top"] else float("nan")
            lines.append(f"| {origin} | {r['n']} | {r['flag_rate']:.2%} | {r['block_rate']:.2%} | {top:.3f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "runs" / "met_ivory"))
    parser.add_argument("--config", default=str(REPO / "configs" / "met_ivory.yaml"))
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--no-negatives", action="store_true", help="train on met-ivory alone")
    parser.add_argument("--no-train", action="store_true", help="evaluate the run in --out (or --model) without training")
    parser.add_argument("--model", default=None, help="with --no-train: an ONNX file or run dir to evaluate")
    parser.add_argument("--epoch-time-baseline", action="store_true",
                        help="afterwards, time one epoch on met-ivory alone (the negatives pool's cost per epoch)")
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
    model = args.model or args.out
    if args.no_train:
        print("\n== Met val (met-ivory/val only) ==")
        met_val = evaluate(model, [str(met)], split="val", out_dir=Path(args.out) / "eval_met_val")
        rows = {name: evaluate(model, [str(SHARED / name)], split="val", out_dir=Path(args.out) / f"eval_{name}")
                for name in POOLS if (SHARED / name).is_dir()}
        print("\n" + source_table(rows))
        return 0
    t0 = time.time()
    summary = train([str(met)], args.out, config)
    wall = time.time() - t0
    print("\n== Met val (met-ivory/val only) ==")
    met_val = evaluate(args.out, [str(met)], split="val", out_dir=Path(args.out) / "eval_met_val")
    rows = {"met_val": met_val}
    for name in POOLS:
        if (SHARED / name).is_dir():
            print(f"\n== {name} val (all 'other') ==")
            rows[name] = evaluate(args.out, [str(SHARED / name)], split="val", out_dir=Path(args.out) / f"eval_{name}")
    import csv

    with open(Path(args.out) / "history.csv") as fh:
        history = list(csv.DictReader(fh))
    speed = sum(float(r["train_images_per_s"]) for r in history) / len(history)
    epoch_seconds = sum(float(r["epoch_seconds"]) for r in history) / len(history)
    alone_seconds = None
    if not args.no_negatives and args.epoch_time_baseline:
        # one epoch on met-ivory alone, same config: what the negatives pool costs per epoch
        alone = config.model_copy(deep=True)
        alone.data.negatives, alone.train.epochs, alone.decision.calibrate = [], 1, False
        train([str(met)], Path(args.out) / "met_only_epoch", alone)
        with open(Path(args.out) / "met_only_epoch" / "history.csv") as fh:
            alone_seconds = float(next(csv.DictReader(fh))["epoch_seconds"])
    print("\n| metric | value |\n|---|---|")
    print(f"| Met val balanced accuracy | {met_val['balanced_accuracy']:.4f} |")
    print(f"| Met val accuracy | {met_val['accuracy']:.4f} |")
    print(f"| Met val macro-F1 | {met_val['macro_f1']:.4f} |")
    print(f"| Met val ivory PR-AUC | {met_val['per_class']['ivory']['pr_auc']:.4f} |")
    d = met_val["decisions"]["per_class"]["ivory"]  # at the model's thresholds (targets, then budgets)
    print(f"| Met val ivory recall at review / block (the model's thresholds) | {d['flag_recall']:.4f} / {d['block_recall']:.4f} |")
    for name in POOLS:
        if name in rows:
            fp = rows[name]["false_positives"]["per_class"]["ivory"]
            print(f"| {name} val ({rows[name]['n']}): ivory false-positive rate at 0.5 | {fp['at_0.5']:.4f} |")
            print(f"| {name} val: ivory FPR at the review threshold ({fp['review']:.3f}) | {fp['at_review']:.4f} |")
            if fp["block"] is not None:
                print(f"| {name} val: ivory FPR at the block threshold ({fp['block']:.3f}) | {fp['at_block']:.4f} |")
    print(f"| best epoch / epochs run | {summary['best_epoch']} / {len(history)} |")
    print(f"| training wall time (incl. caching, validation) | {wall / 60:.1f} min |")
    print(f"| training images/s (mean over epochs) | {speed:.1f} |")
    print(f"| epoch wall time (mean) | {epoch_seconds:.0f} s |")
    if alone_seconds:
        print(f"| epoch wall time on met-ivory alone | {alone_seconds:.0f} s (ratio {epoch_seconds / alone_seconds:.2f}x) |")
    print("\n" + source_table(rows))
    (Path(args.out) / "benchmark.json").write_text(json.dumps(
        {"met_val": {k: met_val[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "confusion_matrix")},
         "wall_seconds": wall, "train_images_per_s": speed, "epoch_seconds": epoch_seconds,
         "met_only_epoch_seconds": alone_seconds}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
