"""Is the head the weak part? Refit a trained run's classifier on frozen features of its training photos shown
under listing conditions (last-layer retraining, as DFR: Kirichenko et al. 2022), and screen the new heads.

    python benchmarks/head_refit.py extract RUN --out DIR [--pool-sample 3000] [--passes 1]
    python benchmarks/head_refit.py screen DIR1 [DIR2 ...] [--lam 1e-3 ...]
    python benchmarks/head_refit.py crossfit DIR [--lam 1e-3]
    python benchmarks/head_refit.py routed DIR1 [DIR2 ...] [--lam 1e-3 ...] [--tolerance 1.0]

``extract``: the run's pooled features (its ``best.pt``, evaluation mode) of (a) its training photos (Met train
and an even sample of its negatives pools) through the run's own training augmentation, each paired with the
same augmented picture under one of the training-side condition views (``train.consistency.views``: greyscale,
blur + noise, close-up crop, thumbnail, quarter turn, JPEG, watermark, text; not the report's conditions), and
(b) its validation photos as the screen scores them (``training.conditions``, seeded as `wildcheck robustness`),
each cached as ``DIR/*.npz``. ``screen``: for each run's features, heads fitted with class-balanced cross-entropy
on (picture, view) features pulled toward the trained head (``lam`` * ||W - W0||^2), and the trained head itself,
scored like ``ensemble_check.py`` (ivory recall at the score that flags 1% of the clean negatives), per run and
with the runs' logits averaged. ``extract`` also keeps the training photos' features in grey and each photo's colour
spread (under each condition), for ``routed``: colour-free photos scored by a second head fitted on the grey training photos.
``crossfit``: a diagnostic, heads fitted on held-out validation photos.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.ensemble_check import class_margin, condition_images, mean_sd, recall_at_budget  # noqa: E402
from training.fileio import atomic_savez  # noqa: E402
from training.grey_head import even_pool_sample, fit_head  # noqa: E402

BLOCK_BUDGET = 0.001  # the shipped model's max_block_rate: at most 1 in 1,000 negatives blocked
CONDITIONS = ["clean", "rotate", "greyscale", "crop", "phone", "jpeg", "thumbnail", "banner", "watermark"]


def features(model, batches) -> np.ndarray:
    """Pooled features (what the head reads) of each batch, by ``training.embedding.pooled_features``."""
    import torch

    from training.embedding import pooled_features

    with torch.inference_mode():
        return np.concatenate([pooled_features(model, x).float().numpy() for x in batches])


def features_of_arrays(model, arrays: np.ndarray, batch: int = 32) -> np.ndarray:
    """``features`` of preprocessed inputs (N, 3, S, S), ``batch`` at a time."""
    import torch

    return features(model, (torch.from_numpy(arrays[i:i + batch]) for i in range(0, len(arrays), batch)))


def grey(pixels: np.ndarray) -> np.ndarray:
    """uint8 RGB -> the same photo in grey, still three channels (``training.conditions.greyscale``, the report's)."""
    from PIL import Image

    from training.conditions import greyscale

    return np.asarray(greyscale(Image.fromarray(pixels)))


def input_spread(arrays: np.ndarray, pre) -> np.ndarray:
    """Each preprocessed input's (N, 3, S, S) colour spread in 8-bit levels (``training.models.colour_spread``):
    what the grey route in the graph sees."""
    import torch

    from training.models import colour_spread

    def shaped(v):
        return torch.tensor(v, dtype=torch.float32).view(1, 3, 1, 1)

    return colour_spread(torch.from_numpy(arrays), shaped(pre.mean), shaped(pre.std)).numpy()


def extract(run: Path, out: Path, pool_sample: int, passes: int, conditions: list[str], limit: int | None = None,
            unseen: list[str] | None = None) -> None:
    import torch
    from tqdm.auto import tqdm

    from training.augment import TrainTransform
    from training.data.cache import cache_images
    from training.predict import TorchPredictor, readable, run_samples

    torch.set_num_threads(2)
    out.mkdir(parents=True, exist_ok=True)
    pred = TorchPredictor(run / "best.pt", threads=2)
    net, spec, config = pred.network, pred.spec, pred.checkpoint.config
    pre = spec.preprocessing
    head = net.get_classifier()
    atomic_savez(out / "head.npz", weight=head.weight.detach().numpy(), bias=head.bias.detach().numpy(),
             labels=np.array(spec.labels))
    val, train = run_samples(pred.checkpoint, None)
    if limit:  # a smoke run
        val, train = val[::max(1, len(val) // limit)], train[::max(1, len(train) // limit)]
    index = {label: i for i, label in enumerate(spec.labels)}

    if not (out / "train.npz").is_file() or not (out / "train_grey.npz").is_file():
        main, pool = even_pool_sample(train, pred.checkpoint.data_roots, pool_sample, config.train.seed)
        main_px, main_kept, _ = cache_images(main, pre, config.data.min_side, 2, desc="caching train")
        pool_px, pool_kept, _ = cache_images(pool, pre, config.data.min_side, 2, desc="caching pool sample")
        pixels, kept = main_px + pool_px, main_kept + pool_kept
        y = np.array([index[s.label] for s in kept])
    if not (out / "train.npz").is_file():
        transform = TrainTransform(config.augment.train, pre, config.train.seed, views=config.train.consistency.views)
        transform.set_bank(pool_px)
        pics, views = [], []
        for p in range(passes):
            transform.set_seed(config.train.seed * 10_007 + 1000 + p)
            bar = tqdm(range(0, len(pixels), 32), desc=f"train features, pass {p + 1}", leave=False)
            for i in bar:
                pairs = [transform(px) for px in pixels[i:i + 32]]
                a = torch.stack([t for t, _ in pairs])
                b = torch.stack([v for _, v in pairs])
                f = features(net, [torch.cat([a, b])])
                pics.append(f[:len(a)])
                views.append(f[len(a):])
        atomic_savez(out / "train.npz", picture=np.concatenate(pics), view=np.concatenate(views),
                 y=np.tile(y, passes), pool=np.tile(np.array([s.pool for s in kept]), passes))
        print(f"train features: {len(kept)} photos x {passes} pass(es)", flush=True)
    if not (out / "train_grey.npz").is_file():  # the training photos in grey, as evaluation shows them
        batches = (torch.from_numpy(np.stack([pre.crop_and_normalize(grey(px)) for px in pixels[i:i + 32]]))
                   for i in range(0, len(pixels), 32))
        atomic_savez(out / "train_grey.npz", features=features(net, batches), y=y)
        print("train features in grey", flush=True)

    kept = readable(val, spec)
    y = np.array([index[s.label] for s, _ in kept])
    spread_file = out / "val_spread.npz"
    spreads = dict(np.load(spread_file)) if spread_file.is_file() else {}
    for name in conditions:
        target = out / f"val_{name}.npz"
        if target.is_file() and name in spreads:
            continue
        arrays = np.stack([pre(img) for img in condition_images(name, kept)])
        spreads[name] = input_spread(arrays, pre)
        if not target.is_file():
            f = features_of_arrays(net, arrays)
            atomic_savez(target, features=f, y=y)
            print(f"val features: {name}", flush=True)
    atomic_savez(spread_file, **{k: v for k, v in spreads.items() if k in CONDITIONS})
    if unseen and not (out / "val_unseen.npz").is_file():
        from training.data.sources import load_samples, select_split

        shown = [img for _, img in readable(select_split(load_samples(unseen), "val"), spec)]
        arrays = np.stack([pre(img) for img in shown])
        f = features_of_arrays(net, arrays)
        atomic_savez(out / "val_unseen.npz", features=f, spread=input_spread(arrays, pre))
        print(f"unseen features: {len(f)} photos", flush=True)


def screen(dirs: list[Path], lams: list[float], conditions: list[str], mix: str, label: str = "ivory") -> None:
    heads = {}
    val = {}
    for d in dirs:
        h = np.load(d / "head.npz")
        labels = list(h["labels"])
        tr = np.load(d / "train.npz")
        if mix == "views":
            x, y = np.concatenate([tr["picture"], tr["view"]]), np.concatenate([tr["y"], tr["y"]])
        else:
            x, y = tr["picture"], tr["y"]
        heads[(d.name, "trained")] = (h["weight"], h["bias"])
        for lam in lams:
            heads[(d.name, f"refit {lam:g}")] = fit_head(x, y, h["weight"], h["bias"], lam)
        val[d.name] = {c: np.load(d / f"val_{c}.npz") for c in conditions}
        if (d / "val_unseen.npz").is_file():
            val[d.name]["unseen"] = np.load(d / "val_unseen.npz")
    c = labels.index(label)
    positive = val[dirs[0].name][conditions[0]]["y"] == c

    with_unseen = all("unseen" in v for v in val.values())
    shown = conditions + ["unseen"] * with_unseen

    def logits(run: str, head: str) -> dict[str, np.ndarray]:
        w, b = heads[(run, head)]
        return {cond: val[run][cond]["features"] @ w.T + b for cond in shown}

    def row(runs: list[str], head: str) -> list[float]:
        score = {k: class_margin(np.mean([logits(r, head)[k] for r in runs], axis=0), c) for k in shown}
        return recall_at_budget(score, positive, conditions, unseen=score.get("unseen"))

    extra = " | unseen flagged | clean recall, budget over all" if with_unseen else ""
    print("| head | models | " + " | ".join(f"{cond} recall | {cond} flagged" for cond in conditions) + extra + " |")
    print("|---|---|" + "---|" * (2 * len(conditions) + 2 * with_unseen))
    for head in ["trained"] + [f"refit {lam:g}" for lam in lams]:
        print(f"| {head} | 1 ({len(dirs)}) | " + " | ".join(mean_sd([row([d.name], head) for d in dirs])) + " |")
        if len(dirs) > 1:
            cells = [f"{v:.3f}" for v in row([d.name for d in dirs], head)]
            print(f"| {head} | {len(dirs)} averaged | " + " | ".join(cells) + " |")


def routed(dirs: list[Path], lams: list[float], conditions: list[str], tolerance: float = 1.0,
           label: str = "ivory") -> None:
    """Colour-free photos scored by a head of their own: each run's second head fitted on its training photos shown
    in grey (``train_grey.npz``), used for an input whose colour spread (``input_spread``, of the preprocessed photo
    under each condition, as a route in the graph would see it) is below ``tolerance`` levels, the trained head
    for the rest."""
    h0 = {d: np.load(d / "head.npz") for d in dirs}
    grey_train = {d: dict(np.load(d / "train_grey.npz")) for d in dirs} if lams else {}
    c = list(h0[dirs[0]]["labels"]).index(label)
    val = {d: {k: np.load(d / f"val_{k}.npz")["features"] for k in conditions} for d in dirs}
    unseen = {d: np.load(d / "val_unseen.npz") for d in dirs}
    y = np.load(dirs[0] / f"val_{conditions[0]}.npz")["y"]
    spreads = np.load(dirs[0] / "val_spread.npz")
    grey_under = {k: spreads[k] < tolerance for k in conditions}
    unseen_grey = unseen[dirs[0]]["spread"] < tolerance
    print(f"grey by colour spread < {tolerance}: " + ", ".join(
        f"{k} {grey_under[k].sum()} ({(grey_under[k] & (y == c)).sum()} {label})" for k in conditions)
        + f" of {len(y)} validation photos; {unseen_grey.sum()} of {len(unseen_grey)} unseen")

    def logits(d: Path, grey_head) -> dict[str, np.ndarray]:
        w0, b0 = h0[d]["weight"], h0[d]["bias"]
        wg, bg = grey_head
        out = {}
        for k in conditions:
            out[k] = np.where(grey_under[k][:, None], val[d][k] @ wg.T + bg, val[d][k] @ w0.T + b0)
        f = unseen[d]["features"]
        out["unseen"] = np.where(unseen_grey[:, None], f @ wg.T + bg, f @ w0.T + b0)
        return out

    def row(parts: list[dict[str, np.ndarray]]) -> list[float]:
        score = {k: class_margin(np.mean([p[k] for p in parts], axis=0), c) for k in parts[0]}
        blocked = recall_at_budget(score, y == c, conditions, budget=BLOCK_BUDGET)[::2]  # recall at 0.1%
        return recall_at_budget(score, y == c, conditions, unseen=score["unseen"]) + [blocked[0]] + (
            [blocked[conditions.index("greyscale")]] if "greyscale" in conditions else [])

    print("| grey photos scored by | models | " + " | ".join(f"{k} recall | {k} flagged" for k in conditions)
          + " | unseen flagged | clean recall, budget over all | clean recall at a 0.1% budget"
          + (" | greyscale recall at a 0.1% budget" if "greyscale" in conditions else "")
          + " |\n|---|---|" + "---|" * (2 * len(conditions) + 3 + ("greyscale" in conditions)))
    for lam in [None] + lams:
        parts = []
        for d in dirs:
            w0, b0 = h0[d]["weight"], h0[d]["bias"]
            if lam is None:
                parts.append(logits(d, (w0, b0)))
            else:
                parts.append(logits(d, fit_head(grey_train[d]["features"], grey_train[d]["y"], w0, b0, lam)))
        name = "the trained head" if lam is None else f"a grey head, lam {lam:g}"
        print(f"| {name} | 1 ({len(dirs)}) | " + " | ".join(mean_sd([row([p]) for p in parts])) + " |")
        if len(dirs) > 1:
            print(f"| {name} | {len(dirs)} averaged | " + " | ".join(f"{v:.3f}" for v in row(parts)) + " |")


def crossfit(d: Path, lam: float, conditions: list[str], folds: int = 5, label: str = "ivory") -> None:
    """A diagnostic, not a recipe: heads fitted on the *validation* photos' features, each photo scored by the head of
    the folds it was left out of (photos split once, all their conditions on one side). Fitted on the clean photos
    alone: what held-out photos (not memorised by the backbone) would give a head; fitted on the photos under the
    screen's own conditions too: an upper bound (the conditions are the ones scored); one head per condition, each
    fitted on that condition's held-out photos: what a route per condition could give at best."""
    h = np.load(d / "head.npz")
    c = list(h["labels"]).index(label)
    val = {k: np.load(d / f"val_{k}.npz") for k in conditions}
    y = val[conditions[0]]["y"]
    fold = np.random.RandomState(0).randint(0, folds, len(y))
    rows = {"trained head": recall_at_budget({k: class_margin(v["features"] @ h["weight"].T + h["bias"], c)
                                              for k, v in val.items()}, y == c, conditions)}

    def out_of_fold(fitted_on: list[str], scored: list[str]) -> dict[str, np.ndarray]:
        """The logits of ``scored`` conditions' photos, each by the head fitted on ``fitted_on``'s photos of the
        other folds."""
        out = {k: np.zeros((len(y), len(h["bias"]))) for k in scored}
        for f in range(folds):
            keep = fold != f
            x = np.concatenate([val[k]["features"][keep] for k in fitted_on])
            w, b = fit_head(x, np.tile(y[keep], len(fitted_on)), h["weight"], h["bias"], lam)
            for k in scored:
                out[k][~keep] = val[k]["features"][~keep] @ w.T + b
        return out

    for fitted_on in (["clean"], conditions):
        out = out_of_fold(fitted_on, conditions)
        name = "out-of-fold head, clean photos" if fitted_on == ["clean"] else "out-of-fold head, photos under the conditions"
        rows[name] = recall_at_budget({k: class_margin(v, c) for k, v in out.items()}, y == c, conditions)
    if "clean" in conditions:
        # an oracle route: each condition's photos read by a head of their own, fitted on that condition's held-out
        # photos; clean photos keep the trained head (and so set the budget as before)
        out = {"clean": val["clean"]["features"] @ h["weight"].T + h["bias"]}
        for k in conditions:
            if k != "clean":
                out.update(out_of_fold([k], [k]))
        rows["out-of-fold head per condition (an oracle route)"] = recall_at_budget(
            {k: class_margin(v, c) for k, v in out.items()}, y == c, conditions)
    print(f"| {d.name}, ivory recall at 1% | " + " | ".join(conditions) + " |\n|---|" + "---|" * len(conditions))
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.3f}" for v in r[::2]) + " |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("extract")
    e.add_argument("run", type=Path)
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--pool-sample", type=int, default=3000)
    e.add_argument("--passes", type=int, default=1)
    e.add_argument("--conditions", default=",".join(CONDITIONS))
    e.add_argument("--unseen", action="append", default=[], help="negatives no run trained on (a root or CSV manifest)")
    e.add_argument("--limit", type=int, help="about this many training and validation photos (a smoke run)")
    s = sub.add_parser("screen")
    s.add_argument("dirs", type=Path, nargs="+")
    s.add_argument("--lam", type=float, action="append")
    s.add_argument("--mix", choices=["views", "pictures"], default="views")
    s.add_argument("--conditions", default=",".join(CONDITIONS))
    x = sub.add_parser("crossfit")
    x.add_argument("dir", type=Path)
    x.add_argument("--lam", type=float, default=1e-3)
    x.add_argument("--conditions", default=",".join(CONDITIONS))
    r = sub.add_parser("routed")
    r.add_argument("dirs", type=Path, nargs="+")
    r.add_argument("--lam", type=float, action="append")
    r.add_argument("--tolerance", type=float, default=1.0, help="colour spread (8-bit levels) below which a photo is grey")
    r.add_argument("--conditions", default=",".join(CONDITIONS))
    args = ap.parse_args()
    if args.cmd == "routed":
        routed(args.dirs, args.lam or [1e-3, 1e-2], args.conditions.split(","), args.tolerance)
    elif args.cmd == "crossfit":
        crossfit(args.dir, args.lam, args.conditions.split(","))
    elif args.cmd == "extract":
        extract(args.run, args.out, args.pool_sample, args.passes, args.conditions.split(","), args.limit,
                args.unseen)
    else:
        screen(args.dirs, args.lam or [1e-3, 1e-2], args.conditions.split(","), args.mix)
    return 0


if __name__ == "__main__":
    from _entry import run_main  # benchmarks/ is sys.path[0] here: one line for a user's mistake

    run_main(main)
