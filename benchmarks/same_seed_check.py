"""Same seed, same data, same numbers? A tiny synthetic run's deterministic results, to compare across a refactor.

    python benchmarks/same_seed_check.py OUT_DIR [--compare EARLIER_OUT_DIR/numbers.json]

Trains tf_efficientnet_lite0 at 64 px for 3 epochs on the synthetic dataset plus a negatives pool (hard-negative
mining on), once with Mixup/CutMix on half the batches and once without, and writes OUT_DIR/numbers.json: the
history rows (everything but timings), best.pt's validation metrics and epoch, the sum of last.pt's weights and
of the pool's hardness. Two runs of the same code give the same file; --compare says which runs differ.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from pathlib import Path

from training.fileio import atomic_write_text

HISTORY_KEYS = ["epoch", "train_loss", "val_loss", "val_accuracy", "val_balanced_accuracy", "val_macro_f1", "lr",
                "best", "mined_negatives", "mined_per_pool"]


def run(out: Path) -> dict:
    from training.config import load_config
    from training.data.synth import synthesize
    from training.fileio import load_checkpoint
    from training.train import train

    root, negatives = out / "synth", out / "negatives"
    if not root.exists():
        synthesize(root, per_class=16, size=128, seed=1)
    if not negatives.exists():
        for split in ("train", "val"):
            shutil.copytree(root / split / "other", negatives / split / "other")
    result = {}
    for name, prob in (("mix", 0.5), ("nomix", 0.0)):
        config = load_config(None, {
            "train": {"epochs": 3, "batch_size": 16, "threads": 2, "lr": 2e-3, "early_stopping_patience": None,
                      "mixup": {"prob": prob}},
            "data": {"img_size": 64, "num_workers": 0, "cache_workers": 2, "negatives": [str(negatives)],
                     "negatives_per_epoch": 0.5},
            "decision": {"calibrate": False}})
        run_dir = out / name
        shutil.rmtree(run_dir, ignore_errors=True)
        train([str(root)], run_dir, config)
        with (run_dir / "history.csv").open(newline="") as fh:
            rows = [{k: r[k] for k in HISTORY_KEYS} for r in csv.DictReader(fh)]
        last, best = load_checkpoint(run_dir / "last.pt"), load_checkpoint(run_dir / "best.pt")
        result[name] = {
            "history": rows,
            "best_val_metrics": {k: best["val_metrics"][k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "nll")},
            "best_epoch": best["epoch"],
            "last_weights_sum": float(sum(v.double().sum() for v in last["model"].values() if v.is_floating_point())),
            "hardness_sum": float(last["hardness"].sum()),
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--compare", type=Path, help="numbers.json of an earlier run")
    args = parser.parse_args()
    # read before the run, which takes minutes and then rewrites OUT/numbers.json: --compare may name that very file
    # (a rerun into the same folder), and a missing one is said now, not after the trainings
    earlier = None
    if args.compare:
        try:
            earlier = json.loads(args.compare.read_text())
        except (OSError, ValueError) as exc:
            parser.error(f"--compare {args.compare}: {exc}")
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args.out)
    atomic_write_text(args.out / "numbers.json", json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    if earlier is not None:
        print({name: "identical" if earlier.get(name) == numbers else "DIFFERENT" for name, numbers in result.items()})


if __name__ == "__main__":
    from _entry import run_main  # benchmarks/ is sys.path[0] here: one line for a user's mistake

    run_main(main)
