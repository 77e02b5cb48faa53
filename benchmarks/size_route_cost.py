"""What the size route costs per photo: one-photo passes of two exported models (say 1.5.0 and 1.6.0, the same
weights without and with ``size_route``) over the same preprocessed photos, interleaved, one onnxruntime thread
each, as a serving worker runs them. Photos: Met val as they are (mostly read at full size) and the same photos
under ``phone`` and ``thumbnail`` (mostly routed to the smaller read).

    python benchmarks/size_route_cost.py models/wildcheck-ivory-1.5.0.onnx models/wildcheck-ivory.onnx [--photos 60] [--rounds 3]

Prints, per photo set, the share routed (by the second model's contract) and the median milliseconds per photo of
each model, and their ratio (second / first), medians over rounds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def routed_share(contract, arrays: np.ndarray) -> float:
    """The share of ``arrays`` the contract's size route reads smaller (``training.models.size_routed``)."""
    import torch

    from training.models import size_routed

    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (contract.preprocessing.mean, contract.preprocessing.std))
    return float(size_routed(torch.from_numpy(arrays), contract.size_route, mean, std).float().mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("baseline")
    ap.add_argument("candidate")
    ap.add_argument("--shared", default=str(REPO.parent / "shared" / "datasets"))
    ap.add_argument("--photos", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from serving.runtime import OnnxModel
    from benchmarks.ensemble_check import condition_images
    from training.data.sources import load_samples, select_split
    from training.predict import decode_sample

    a, b = OnnxModel(args.baseline, threads=1), OnnxModel(args.candidate, threads=1)
    if b.contract.size_route is None:
        raise SystemExit(f"{args.candidate} has no size_route")
    pre = b.contract.preprocessing
    samples = select_split(load_samples([Path(args.shared) / "met-ivory"]), "val")[:: max(1, 565 // args.photos)][: args.photos]
    kept = [(s, img) for s in samples if not isinstance(img := decode_sample(s, b.contract), str)]
    print(f"| photos | routed (candidate) | baseline ms/photo | candidate ms/photo | ratio |\n|---|---|---|---|---|")
    for name in ("clean", "phone", "thumbnail"):
        arrays = np.stack([pre(img) for img in condition_images(name, kept)]).astype(np.float32)
        for model in (a, b):  # warm-up
            model.predict_logits(arrays[:1])
        times = {id(a): [], id(b): []}
        for _ in range(args.rounds):
            for model in (a, b):
                start = time.perf_counter()
                for row in arrays:
                    model.predict_logits(row[None])
                times[id(model)].append((time.perf_counter() - start) / len(arrays) * 1e3)
        ta, tb = statistics.median(times[id(a)]), statistics.median(times[id(b)])
        print(f"| {name} ({len(arrays)}) | {routed_share(b.contract, arrays):.0%} | {ta:.1f} | {tb:.1f} | {tb / ta:.2f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    from _entry import run_main  # benchmarks/ is sys.path[0] here: one line for a user's mistake

    run_main(main)
