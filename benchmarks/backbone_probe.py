"""Do a bigger backbone's ImageNet features hold ivory better under a crop or blur? A linear probe, before training.

    python benchmarks/backbone_probe.py --run runs/session16/H1a --out runs/probe \
        [--backbones tf_efficientnet_lite0,tf_efficientnet_lite2] [--conditions crop,phone] [--negatives 600]

Fine-tuning a backbone on this CPU takes hours per seed; this takes minutes. Each backbone's offline ImageNet
weights, frozen, embed the run's training photos (Met train plus ``--negatives`` pool photos, seeded) and its
validation photos (Met val plus the pools' val splits: the photos ``ensemble_check.py`` screens) as they are and
under each condition (``training.conditions``, seeded per photo as the robustness report does), all at the same
input size. A logistic regression fitted on the clean training embeddings then scores the validation photos:
ivory recall at the score that flags 1% of the clean negatives, as is and under each condition. A backbone whose
probe loses less under a condition has features that keep the material there; it says nothing about what
fine-tuning adds, so it ranks backbones for a training arm and does not replace one. Embeddings are cached in
``--out`` per backbone and input size, with a hash of the photos and conditions they embed (other ones: embedded again).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.fileio import atomic_savez  # noqa: E402


def embed(name: str, arrays: np.ndarray, threads: int) -> np.ndarray:
    """Pooled features of the offline ImageNet ``name`` for preprocessed NCHW ``arrays``."""
    import torch

    from training.models import create_model

    torch.set_num_threads(threads)
    model = create_model(name, 1000, "offline")
    model.reset_classifier(0)
    model.eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(arrays), 32):
            out.append(model(torch.from_numpy(arrays[i:i + 32].astype(np.float32))).numpy())
    return np.concatenate(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="a run dir: its recorded data (Met + pools) give the photos")
    ap.add_argument("--out", required=True)
    ap.add_argument("--backbones", default="tf_efficientnet_lite0,tf_efficientnet_lite2")
    ap.add_argument("--conditions", default="crop,phone")
    ap.add_argument("--negatives", type=int, default=600, help="pool photos among the training photos (seeded)")
    ap.add_argument("--size", type=int, default=256, help="input size, the same for every backbone")
    ap.add_argument("--label", default="ivory")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from serving.preprocess import Preprocessing
    from training.checkpoint import Checkpoint
    from training.conditions import default_conditions
    from training.data.sources import pool_name
    from training.predict import readable, run_samples

    sys.path.insert(0, str(REPO / "benchmarks"))
    from ensemble_check import budget_threshold, condition_images

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = Checkpoint.load(Path(args.run) / "best.pt")
    val, train = run_samples(checkpoint, None)
    own_pools = {pool_name(r) for r in checkpoint.data_roots}
    own = [s for s in train if s.pool in own_pools]
    pool_train = [s for s in train if s.pool not in own_pools]  # the negatives pools'
    random.Random(0).shuffle(pool_train)
    train = own + pool_train[:args.negatives]
    conditions = ["clean", *args.conditions.split(",")]
    known = default_conditions()
    pre = Preprocessing(input_size=args.size)

    train_kept, val_kept = readable(train, checkpoint.spec), readable(val, checkpoint.spec)
    inputs = {"train": np.stack([pre(img) for _, img in train_kept]).astype(np.float16)}
    for cond in conditions:
        inputs[cond] = np.stack([pre(img) for img in condition_images(cond, val_kept)]).astype(np.float16)
    photos = hashlib.sha256(json.dumps([args.size, [known[c].model_dump() for c in conditions[1:]],
                                        [[str(s.path), s.label] for s, _ in train_kept + val_kept]]).encode()).hexdigest()
    y_train = np.array([s.label == args.label for s, _ in train_kept])
    y_val = np.array([s.label == args.label for s, _ in val_kept])
    print(f"{len(train_kept)} training photos ({y_train.sum()} {args.label}), {len(val_kept)} validation photos "
          f"({y_val.sum()} {args.label}), {args.size} px", flush=True)

    rows = []
    for name in args.backbones.split(","):
        cached = out / f"{name}_{args.size}.npz"
        feats = {}
        if cached.is_file():
            with np.load(cached) as npz:
                feats = {k: npz[k] for k in npz.files}
        if str(feats.pop("photos", "")) != photos or not set(inputs) <= set(feats):  # other photos or conditions
            start = time.perf_counter()
            feats = {k: embed(name, a, args.threads) for k, a in inputs.items()}
            atomic_savez(cached, photos=np.array(photos), **feats)
            print(f"{name}: embedded {sum(len(a) for a in inputs.values())} photos in "
                  f"{time.perf_counter() - start:.0f} s", flush=True)
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000, class_weight="balanced"))
        probe.fit(feats["train"], y_train)
        score = {c: probe.decision_function(feats[c]) for c in conditions}
        threshold = budget_threshold(score["clean"][~y_val], 0.01)
        rows.append((name, [f"{np.mean(score[c][y_val] > threshold):.3f} / {np.mean(score[c][~y_val] > threshold):.1%}"
                            for c in conditions]))
    print(f"\n{args.label} recall / negatives flagged, at the score flagging 1% of the clean negatives:\n")
    print(f"| backbone (frozen, {args.size} px) | " + " | ".join(conditions) + " |")
    print("|---|" + "---|" * len(conditions))
    for name, cells in rows:
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    from _entry import run_main  # benchmarks/ is sys.path[0] here: one line for a user's mistake

    run_main(main)
