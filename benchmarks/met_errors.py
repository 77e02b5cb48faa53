"""Which validation images do several runs get wrong, and would averaging the runs help?

    python benchmarks/met_errors.py runs/met8 runs/met14 runs/met15 [--out runs/met_errors]

Reads each run's ``eval_met_val/predictions.csv`` (written by ``benchmarks/met_ivory.py`` or
``wildcheck evaluate --predictions``), then prints per run and for the average of all runs' probabilities:
balanced accuracy and errors, the errors on black-and-white vs colour photos, and how many images are
wrong in k of the runs. Images wrong in every run are drawn into ``OUT/always_wrong.png`` with their mean
scores: that is where to look for labels that cannot be judged from the photo. The point is to tell a
ceiling (the same images wrong whatever the recipe) from seed noise (different images each run).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import balanced_accuracy_score

REPO = Path(__file__).resolve().parents[1]


def read_predictions(csv_path: Path) -> tuple[list[str], list[str], list[str], np.ndarray]:
    """(paths, true labels, class names, probabilities) sorted by path so runs line up."""
    with open(csv_path, newline="") as fh:
        rows = sorted(csv.DictReader(fh), key=lambda row: row["path"])
    if not rows:
        raise ValueError(f"{csv_path}: no predictions")
    classes = [name[2:] for name in rows[0] if name.startswith("p_")]
    probs = np.array([[float(row[f"p_{c}"]) for c in classes] for row in rows], dtype=np.float64)
    return [row["path"] for row in rows], [row["label"] for row in rows], classes, probs


def is_black_and_white(path: str, tolerance: float = 4.0) -> bool:
    """A photo whose channels barely differ (archive B/W prints, scanned greyscale); unreadable -> False."""
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB").resize((64, 64)), dtype=np.int16)
    except OSError:
        return False
    return float(np.abs(arr[..., 0] - arr[..., 1]).mean() + np.abs(arr[..., 1] - arr[..., 2]).mean()) < tolerance


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run dirs holding eval_met_val/predictions.csv")
    parser.add_argument("--predictions", default="eval_met_val/predictions.csv", help="path inside each run dir")
    parser.add_argument("--out", default=str(REPO / "runs" / "met_errors"))
    args = parser.parse_args()

    runs = {}
    for run in args.runs:
        csv_path = Path(run) / args.predictions
        if not csv_path.exists():
            print(f"{csv_path} not found: run benchmarks/met_ivory.py (or wildcheck evaluate) first", file=sys.stderr)
            return 2
        name = Path(run).name if Path(run).name not in runs else str(run)  # two runs/*/best: keep both
        try:
            runs[name] = read_predictions(csv_path)
        except (ValueError, KeyError) as exc:
            print(f"{csv_path}: not a predictions file ({exc})", file=sys.stderr)
            return 2
    paths, truth, classes, _ = next(iter(runs.values()))
    for name, (other_paths, _, other_classes, _) in runs.items():
        if other_paths != paths or other_classes != classes:
            print(f"{name} was evaluated on other images or classes than {next(iter(runs))}", file=sys.stderr)
            return 2
    y = np.array([classes.index(label) if label in classes else -1 for label in truth])
    known = y >= 0
    bw = np.array([is_black_and_white(p) for p in paths])
    print(f"{known.sum()} images ({bw.sum()} black-and-white), {len(runs)} runs\n")
    print("| run | balanced accuracy | errors | errors on B/W photos | errors on colour photos |")
    print("|---|---|---|---|---|")

    def report(name: str, probs: np.ndarray) -> np.ndarray:
        """Print one table row; return which images ``probs`` gets wrong."""
        pred = probs.argmax(1)
        miss = (pred != y) & known
        ba = balanced_accuracy_score(y[known], pred[known])
        print(f"| {name} | {ba:.4f} | {miss.sum()} | {(miss & bw).sum()} / {(bw & known).sum()} "
              f"| {(miss & ~bw).sum()} / {(~bw & known).sum()} |")
        return miss

    times_wrong = np.sum([report(name, probs) for name, (*_, probs) in runs.items()], axis=0)
    mean_probs = np.mean([probs for *_, probs in runs.values()], axis=0)
    report("average of all runs", mean_probs)

    print("\n| wrong in k runs | images |\n|---|---|")
    for k in range(len(runs) + 1):
        print(f"| {k} | {(times_wrong == k).sum()} |")

    always = np.flatnonzero(times_wrong == len(runs))
    if len(always):
        from training.plots import plot_image_grid

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        captions = [f"{truth[i]}: " + ", ".join(f"{c} {mean_probs[i, j]:.2f}" for j, c in enumerate(classes))
                    for i in always]
        plot_image_grid([paths[i] for i in always], captions, out / "always_wrong.png",
                        title=f"wrong in all {len(runs)} runs (true label: mean scores)")
        print(f"\n{len(always)} images wrong in every run: {out / 'always_wrong.png'}")
        for i in always:
            print(f"  {paths[i]}  ({truth[i]})")
    return 0


if __name__ == "__main__":
    from _entry import run_main  # benchmarks/ is sys.path[0] here: one line for a user's mistake

    run_main(main)
