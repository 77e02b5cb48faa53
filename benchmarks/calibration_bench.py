"""Calibration benchmark on Met ivory: fit on one half of val, check on the other half.

    python benchmarks/calibration_bench.py RUN_DIR

Prints ECE and NLL before/after temperature scaling on the held-apart half, the thresholds fitted on the
fitting half, and block precision / block+review recall measured on the held-apart half next to targets.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "datasets"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path, help="a training run folder (its best.pt is calibrated)")
    args = ap.parse_args()
    from serving.decision import ClassThresholds
    from serving.runtime import softmax
    from training.calibrate import calibration_report, expected_calibration_error, nll
    from training.data.sources import load_samples, select_split
    from training.predict import TorchPredictor, predict_samples
    from training.metrics import decision_report, format_decisions

    predictor = TorchPredictor(args.run_dir / "best.pt")
    predictor.spec = predictor.spec.model_copy(update={"temperature": 1.0})
    samples = select_split(load_samples([SHARED / "met-ivory"]), "val")
    negatives = [s for s in select_split(load_samples([SHARED / "generic-products", SHARED / "caltech101-negatives"]), "val")]
    from training.data.sources import Sample

    samples += [Sample(s.path, "other", "val") for s in negatives]
    probs, kept, _ = predict_samples(predictor, samples, desc="val")
    labels = predictor.labels
    y = np.array([labels.index(s.label) for s in kept])
    half = np.array([int(hashlib.sha256(s.path.name.encode()).hexdigest(), 16) % 2 for s in kept])
    fit, check = half == 0, half == 1
    targets = dict(block_precision=0.98, review_recall=0.95)
    report = calibration_report(probs[fit], y[fit], labels, "other", targets["block_precision"],
                                targets["review_recall"], [])
    t = report["temperature"]
    held = softmax(np.log(np.clip(probs[check], 1e-7, 1)), t)
    print(f"fit on {fit.sum()} val images, checked on {check.sum()} held-apart images (Met val + negatives val)")
    print(f"temperature {t:.3f}")
    print("| held-apart half | before | after |\n|---|---|---|")
    print(f"| ECE | {expected_calibration_error(probs[check], y[check]):.4f} | {expected_calibration_error(held, y[check]):.4f} |")
    print(f"| NLL | {nll(probs[check], y[check]):.4f} | {nll(held, y[check]):.4f} |")
    thresholds = {k: ClassThresholds(**v) for k, v in report["thresholds"].items()}
    print(f"thresholds fitted on the first half: {report['thresholds']}; notes: {report['notes']}")
    d = decision_report(held, y[check], labels, thresholds, [], "other")
    print(format_decisions(d))
    ivory = d["per_class"]["ivory"]
    print("\n| on held-apart half | target | measured |\n|---|---|---|")
    print(f"| ivory block precision | {targets['block_precision']} | {ivory['block_precision']} |")
    print(f"| ivory block+review recall | {targets['review_recall']} | {ivory['flag_recall']:.4f} |")
    return 0


if __name__ == "__main__":
    from _entry import run_main  # benchmarks/ is sys.path[0] here: one line for a user's mistake

    run_main(main)
