"""``wildcheck grey-head RUN --out DIR``: a second head for photos without colour (``serving.contract.GreyRoute``).

Ivory is told from its look-alikes partly by colour, so a model trained mostly on colour photos finds far less of
it in grey ones (archive scans, filters): 0.75 recall under the report's greyscale condition where clean photos
give 0.91 (benchmarks/README.md, "Head refit on frozen features"). The backbone's features of a grey photo still
carry the object; what is off is the head that reads them. So a second linear head is fitted on the frozen pooled
features of the run's own training photos shown in grey (the main images and an even draw from its negatives
pools): class-balanced cross-entropy, pulled toward the trained head (``lam * ||W - W0||^2``), L-BFGS. The model
then routes every input by its colour spread (``training.models.GreyRouted``), inside the exported graph: one more
1,280 x 2 product per photo. The result is a run dir like ``wildcheck ensemble``'s, calibrated afresh; members
with grey heads make an ensemble with one (their heads joined, ``training.ensemble``).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from serving.contract import GreyRoute
from serving.errors import InvalidInput
from training.checkpoint import Checkpoint, Head
from training.config import GreyHeadConfig
from training.data.sources import Sample, pool_name
from training.outputs import new_run_folder

FEATURES_FILE = "grey_features.npz"
# what fit_grey_head and its calibration write into --out
GREY_HEAD_FILES = ("best.pt", "labels.json", "grey_head.json", FEATURES_FILE, "calibration.json", "reliability.png")


class GreyHeadError(InvalidInput):
    """The run cannot get a grey head: an ensemble, no training photos, or --out is the run itself."""


def even_pool_sample(train: list[Sample], main_roots: list[str], total: int, seed: int
                     ) -> tuple[list[Sample], list[Sample]]:
    """(the training photos of the main roots, up to ``total`` of the negatives pools' drawn evenly across the pools
    by ``training.loop.data.even_sample``, so a big easy pool does not drown a small hard one)."""
    from training.loop.data import even_sample

    names = {pool_name(r) for r in main_roots}
    main = [s for s in train if s.pool in names]
    pools: dict[str, list[Sample]] = {}
    for s in train:
        if s.pool not in names:
            pools.setdefault(s.pool, []).append(s)
    return main, even_sample(list(pools.values()), total, np.random.RandomState(seed))


def fit_head(x: np.ndarray, y: np.ndarray, w0: np.ndarray, b0: np.ndarray, lam: float, steps: int = 200
             ) -> tuple[np.ndarray, np.ndarray]:
    """A linear head on features ``x`` (N x K) with labels ``y``: class-balanced cross-entropy + lam * ||W - W0||^2,
    full batch, L-BFGS from the trained head (``w0``, ``b0``)."""
    import torch

    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).long()
    counts = np.bincount(y, minlength=len(b0)).astype(np.float64)
    present = counts > 0
    weight = np.zeros_like(counts)
    weight[present] = counts.sum() / (present.sum() * counts[present])
    weight = torch.tensor(weight, dtype=torch.float32)
    W0, B0 = torch.from_numpy(w0).float(), torch.from_numpy(b0).float()
    W, B = W0.clone().requires_grad_(True), B0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([W, B], lr=1, max_iter=steps, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ W.T + B, yt, weight=weight) + lam * ((W - W0) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach().numpy(), B.detach().numpy()


def grey_features(network, samples: list[Sample], spec, batch: int = 32, workers: int = 2, desc: str = "grey photos"
                  ) -> tuple[np.ndarray, list[Sample], list[tuple[str, str]]]:
    """Pooled features (``training.embedding.pooled_features``, eval mode) of ``samples`` decoded, turned grey
    (``training.conditions.greyscale``, the report's condition) and preprocessed as evaluation does. Returns
    (features, readable samples, [(path, reason)] for the others)."""
    import torch

    from training.conditions import greyscale
    from training.embedding import pooled_features
    from training.predict import decoded_batches

    device = next(network.parameters()).device
    out, kept, skipped = [], [], []
    for pool, images, batch_samples in decoded_batches(samples, spec, skipped, batch, workers, desc):
        x = np.stack(list(pool.map(lambda img: spec.preprocessing(greyscale(img)), images)))
        with torch.inference_mode():
            out.append(pooled_features(network, torch.from_numpy(x).to(device)).float().cpu().numpy())
        kept.extend(batch_samples)
    features = np.concatenate(out) if out else np.zeros((0, int(network.num_features)), np.float32)
    return features, kept, skipped


def cached_grey_features(cache: Path, network, samples: list[Sample], ckpt: Checkpoint, say=print
                         ) -> tuple[np.ndarray, list[Sample], list[tuple[str, str]]]:
    """``grey_features``, kept in ``cache`` (the out folder's) so that fitting again with another ``--lam`` or
    ``--tolerance`` takes seconds: reused only for the same weights and the same photos in the same order, with the
    same bytes (a photo replaced under its name, even with the same size and mtime, is another photo)."""
    from training.checkpoint import weights_hash
    from training.data.sources import fingerprint
    from training.fileio import atomic_savez

    digest = weights_hash(ckpt.weights) + ":" + fingerprint(samples)["sha256"]
    paths = [str(s.path) for s in samples]
    if cache.is_file():
        with np.load(cache, allow_pickle=False) as held:
            if str(held["weights"]) == digest and held["paths"].tolist() == paths:
                readable = set(held["kept"].tolist())
                kept = [s for s in samples if str(s.path) in readable]
                say(f"grey features of {len(kept)} training photos reused from {cache}")
                return held["features"], kept, [tuple(r) for r in held["skipped"].tolist()]
    features, kept, skipped = grey_features(network, samples, ckpt.spec)
    atomic_savez(cache, features=features, weights=np.array(digest), paths=np.array(paths),
                 kept=np.array([str(s.path) for s in kept]), skipped=np.array(skipped, dtype=str).reshape(-1, 2))
    return features, kept, skipped


def fit_grey_head(run: str | Path, out: str | Path, settings: GreyHeadConfig = GreyHeadConfig(),
                  data: list[str] | None = None, say=print, in_place: bool = False) -> dict:
    """``run``'s weights with a grey head fitted on its training photos in grey, as ``out``/best.pt (uncalibrated:
    the caller calibrates). Returns the fit's summary (also ``out``/grey_head.json). ``in_place``: ``out`` may be
    the run itself (after training: the trained weights and head are kept, the route is added)."""
    import torch
    from sklearn.metrics import balanced_accuracy_score

    from training.fileio import atomic_write_text
    from training.models import parse_name
    from training.predict import TorchPredictor, resolve_checkpoint, run_samples

    out = Path(out)
    path = resolve_checkpoint(run)
    if path.parent.resolve() == out.resolve() and not in_place:
        raise GreyHeadError(f"--out {out} is the run itself: name a new folder for the run with a grey head")
    predictor = TorchPredictor(path)
    ckpt = predictor.checkpoint
    if not in_place:  # an earlier grey head's folder is replaced (its features reused), another run's never
        new_run_folder(out, GREY_HEAD_FILES, marker="grey_head.json", reads=[*(data or ()), *ckpt.data_roots])
    if parse_name(ckpt.spec.architecture):
        raise GreyHeadError(f"{path} is an ensemble: fit a grey head for each of its runs (wildcheck grey-head "
                            "RUN --out DIR), then ensemble those")
    _, train = run_samples(ckpt, data)
    main_roots = data or ckpt.data_roots
    main, pool = even_pool_sample(train, main_roots, settings.pool_sample, ckpt.config.train.seed)
    if not main:
        raise GreyHeadError(f"no training photos under {main_roots}: pass --data ROOT (a dataset with a train split)")
    network = predictor.network
    features, kept, skipped = cached_grey_features(out / FEATURES_FILE, network, main + pool, ckpt, say)
    index = {label: i for i, label in enumerate(ckpt.spec.labels)}
    y = np.array([index[s.label] for s in kept])
    if len(np.unique(y)) < 2:
        raise GreyHeadError(f"the training photos read have one label only ({ckpt.spec.labels[y[0]] if len(y) else 'none'})")
    head = network.get_classifier()
    w0, b0 = head.weight.detach().cpu().numpy(), head.bias.detach().cpu().numpy()
    say(f"fitting the grey head on {len(kept)} training photos in grey ({len(main)} main, {len(pool)} from the pools"
        + (f"; {len(skipped)} unreadable, skipped" if skipped else "") + f"), lam {settings.lam:g}")
    w, b = fit_head(features, y, w0, b0, settings.lam)
    summary = {
        "photos": len(kept), "main": len(main), "pool_sample": len(pool), "skipped": [list(s) for s in skipped],
        "lam": settings.lam, "tolerance": settings.tolerance, "seed": ckpt.config.train.seed,
        "grey_training_balanced_accuracy": {
            "trained_head": float(balanced_accuracy_score(y, (features @ w0.T + b0).argmax(1))),
            "grey_head": float(balanced_accuracy_score(y, (features @ w.T + b).argmax(1)))},
        "weight_change": float(np.linalg.norm(w - w0) / max(np.linalg.norm(w0), 1e-12)),
    }
    fitted = {k: summary[k] for k in ("photos", "main", "pool_sample", "lam", "seed")}
    spec = ckpt.spec.model_copy(update={"grey_route": GreyRoute(tolerance=settings.tolerance, fitted=fitted)})
    routed = Checkpoint(spec=spec, weights=ckpt.weights, epoch=ckpt.epoch, val_metrics={}, config=ckpt.config,
                        data_roots=ckpt.data_roots, init_from=ckpt.init_from, ema=ckpt.ema,
                        grey_head=Head(weight=torch.from_numpy(w), bias=torch.from_numpy(b)))
    out.mkdir(parents=True, exist_ok=True)
    routed.save(out / "best.pt")
    atomic_write_text(out / "labels.json", json.dumps(ckpt.spec.labels))
    atomic_write_text(out / "grey_head.json", json.dumps(summary, indent=2))
    acc = summary["grey_training_balanced_accuracy"]
    say(f"wrote {out / 'best.pt'}: grey head for inputs with colour spread < {settings.tolerance:g} levels; training photos in "
        f"grey, balanced accuracy {acc['trained_head']:.3f} (trained head) -> {acc['grey_head']:.3f} (grey head)")
    return summary


def make_grey_head(run: str | Path, out: str | Path, settings: GreyHeadConfig = GreyHeadConfig(),
                   data: list[str] | None = None, say=print) -> dict:
    """``wildcheck grey-head``: fit, then calibrate (its pass over the validation photos, routed, also records the
    new validation metrics). Returns the calibration report."""
    from training.calibrate import calibrate_new_run

    fit_grey_head(run, out, settings, data, say)
    report = calibrate_new_run(Path(out), data)
    metrics = Checkpoint.load(Path(out) / "best.pt").val_metrics
    say(f"validation: balanced accuracy {metrics['balanced_accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} "
        f"on {metrics['n']} images")
    return report
