"""Would reading blurred or noisy photos smaller help, and at which thresholds? The screen behind ``SizeRoute``.

    python benchmarks/size_route_screen.py RUN[,RUN...] --cache DIR --unseen MANIFEST.csv \
        [--conditions clean,phone,thumbnail,crop,jpeg] [--route 0.6,2 --route 0.55,2 ...]

RUN: run dirs whose ``best.pt`` takes any input size (several: their logits averaged, as an ensemble; a 1.5.0
pair from ``benchmarks/members_from_onnx.py``). For every photo of Met val and the shipped pools' val splits
(``tta_check.samples_of``), under each condition (seeded as `wildcheck robustness` seeds it), the cache holds the
logits read at the model's size (``id``) and at 256 px (``s256``: the preprocessed array resized, antialiased,
as ``SizeRouted`` resizes it), and the route's two measures (``training.models.detail_ratio`` / ``noise_level``).
Each ``--route DETAIL,NOISE`` then reads a photo at 256 px when its detail ratio is below DETAIL or its noise
estimate above NOISE (``0,1e9``: never; ``9,0``: always) and reports, like ``ensemble_check.py``: ivory recall /
negatives flagged / share routed per condition at the score that flags 1% of the clean negatives (routed as
well), the share of ``--unseen`` photos (sources no run trained on) flagged at it, and the clean ivory recall at
the 0.1% (block) budget.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.ensemble_check import class_margin, condition_images, predictor_of  # noqa: E402
from benchmarks.tta_check import decoded, samples_of, view  # noqa: E402
from training.fileio import atomic_savez  # noqa: E402


def measures(arrays: np.ndarray, pre) -> dict[str, np.ndarray]:
    """The route's measures of preprocessed arrays, by the code the graph runs."""
    import torch

    from training.models import detail_ratio, luma_levels, noise_level

    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (pre.mean, pre.std))
    y = luma_levels(torch.from_numpy(arrays), mean, std)
    return {"detail": detail_ratio(y).numpy(), "noise": noise_level(y).numpy()}


def cache_condition(members, kept, name: str, path: Path) -> None:
    if path.is_file():
        return
    pre = members[0].contract.preprocessing
    with ThreadPoolExecutor(2) as pool:
        arrays = np.stack(list(pool.map(pre, condition_images("clean" if name == "unseen" else name, kept))))
    arrays = arrays.astype(np.float32)
    out = measures(arrays, pre)
    for v in ("id", "s256"):
        out[v] = np.mean([np.concatenate([m.predict_logits(view(v, arrays[i:i + 32])) for i in range(0, len(arrays), 32)])
                          for m in members], axis=0)
    atomic_savez(path, **out)
    print(f"cached {name} ({len(arrays)} photos)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", help="run dirs, comma-separated (logits averaged)")
    ap.add_argument("--cache", required=True)
    ap.add_argument("--shared", default=str(REPO.parent / "shared" / "datasets"))
    ap.add_argument("--unseen", required=True, help="negatives no run trained on (a root or CSV manifest)")
    ap.add_argument("--conditions", default="clean,phone,thumbnail,crop,jpeg")
    ap.add_argument("--route", action="append", default=None, help="DETAIL,NOISE (repeat)")
    ap.add_argument("--label", default="ivory")
    args = ap.parse_args()
    from training.data.sources import load_samples, select_split

    members = [predictor_of(Path(r)) for r in args.runs.split(",")]
    contract = members[0].contract
    c = list(contract.labels).index(args.label)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    conditions = ["clean"] + [n for n in args.conditions.split(",") if n != "clean"]
    if any(not (cache / f"{n}.npz").is_file() for n in conditions):
        kept = decoded(samples_of(Path(args.shared), cache, list(contract.labels), contract.negative_label), contract)
        atomic_savez(cache / "meta.npz", y=np.array([contract.labels.index(s.label) for s, _ in kept]))
        for name in conditions:
            cache_condition(members, kept, name, cache / f"{name}.npz")
    cache_condition(members, decoded(select_split(load_samples([args.unseen]), "val"), contract), "unseen",
                    cache / "unseen.npz")
    positive = np.load(cache / "meta.npz")["y"] == c
    data = {n: dict(np.load(cache / f"{n}.npz")) for n in conditions + ["unseen"]}

    def margins(cond: str, detail: float, noise: float):
        d = data[cond]
        routed = (d["detail"] < detail) | (d["noise"] > noise)
        return np.where(routed, class_margin(d["s256"], c), class_margin(d["id"], c)), routed

    print("| route (detail <, noise >) | " + " | ".join(f"{n}: recall / negatives flagged / routed" for n in conditions)
          + " | unseen flagged / routed | clean recall at 0.1% |")
    print("|---|" + "---|" * (len(conditions) + 2))
    for spec in args.route or ["0,1e9", "9,0", "0.6,1e9", "0,2", "0.6,2"]:
        detail, noise = (float(v) for v in spec.split(","))
        clean, _ = margins("clean", detail, noise)
        flag = np.quantile(clean[~positive], 0.99, method="higher")
        block = np.quantile(clean[~positive], 0.999, method="higher")
        cells = []
        for cond in conditions:
            m, routed = margins(cond, detail, noise)
            cells.append(f"{(m[positive] > flag).mean():.3f} / {(m[~positive] > flag).mean():.1%} / {routed.mean():.0%}")
        m, routed = margins("unseen", detail, noise)
        cells += [f"{(m > flag).mean():.1%} / {routed.mean():.0%}", f"{(clean[positive] > block).mean():.3f}"]
        print(f"| {detail:g}, {noise:g} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    from _entry import run_main  # benchmarks/ is sys.path[0] here: one line for a user's mistake

    run_main(main)
