"""Do test-time views help? Whole-photo ivory recall at a 1% flag budget when the model's logits are averaged
over turned, mirrored or greyscale copies of each photo, as is and under each listing condition.

    python benchmarks/tta_check.py models/wildcheck-ivory.onnx --cache runs/tta [--unseen ROOT_OR_CSV ...]
        [--conditions clean,rotate,greyscale,crop,phone,jpeg,thumbnail,banner,watermark]
        [--sets "none=id" --sets "turns=id,rot90,rot180,rot270" --sets "lean=id:0.8,rot90:0.1,rot270:0.1"
         --sets "pick=confident/id,rot90,rot270" ...]

The validation photos are Met val and the val splits of the negatives pools the model trained on
(``met_ivory.SHIPPABLE_POOLS``). Each photo under each condition (``training.conditions``, seeded per photo as
`wildcheck robustness` seeds them) is preprocessed once; every view (a function of the preprocessed array:
a quarter turn or mirror image as the exported graph makes it, luma, or ``sNNN``: resized to NNN px, for a run's
``best.pt``, whose network takes any size) is scored and its logits cached in ``--cache`` (one file per condition; views named in ``--sets`` that are not cached yet are added).
Each set of views then reports, like ``ensemble_check.py``: the ivory recall and the share of negatives
flagged at the score that flags 1% of the clean negatives, per condition; the share of ``--unseen`` photos
(sources no run trained on) flagged at it, and the clean recall when the budget counts them too.

A set is ``NAME=[RULE/]VIEW[:WEIGHT],...``: its views' logits are combined by RULE, ``mean`` (the default; with
weights, a weighted mean, as a graph could compute it), ``median`` (of the class margins) or ``confident`` (the
margin of the view farthest from zero, i.e. the view that is surest either way: a guess at the upright one).
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.ensemble_check import class_margin, condition_images, recall_at_budget  # noqa: E402
from training.fileio import atomic_savez  # noqa: E402

def view(name: str, x: np.ndarray) -> np.ndarray:
    """One view of a batch of preprocessed arrays (N, 3, S, S): ``id``, ``grey`` (luma, a screen-only view), or a
    test-time view of the contract, made by the code the exported graph runs (``training.models.view_of``)."""
    if name == "id":
        return x
    import torch

    if name == "grey":  # the size route's luma weights; the model's mean/std are per-channel equal
        from training.models import LUMA

        return np.repeat(np.einsum("c,nchw->nhw", np.asarray(LUMA, dtype=x.dtype), x)[:, None], 3, axis=1)

    if name.startswith("s") and name[1:].isdigit():  # the photo scored at another input size (a torch model only)
        size = int(name[1:])
        return torch.nn.functional.interpolate(torch.from_numpy(x), size=(size, size), mode="bilinear",
                                               antialias=True, align_corners=False).numpy()

    from training.models import view_of

    return np.ascontiguousarray(view_of(name, torch.from_numpy(x)).numpy())


@dataclass(frozen=True)
class ViewSet:
    """Views whose logits make one score per photo, and how they are combined (``NAME=[RULE/]VIEW[:WEIGHT],...``)."""

    name: str
    views: tuple[str, ...]
    weights: tuple[float, ...]
    rule: str = "mean"

    RULES: ClassVar[tuple[str, ...]] = ("mean", "median", "confident")

    @classmethod
    def parse(cls, spec: str) -> "ViewSet":
        name, eq, body = spec.partition("=")
        rule, slash, items = body.partition("/")
        rule, items = (rule, items) if slash else ("mean", body)
        if not eq or not name or not items or rule not in cls.RULES:
            raise SystemExit(f"--sets {spec!r}: give NAME=[RULE/]VIEW[:WEIGHT],... with RULE one of {cls.RULES}")
        views, weights = [], []
        for item in items.split(","):
            v, colon, w = item.partition(":")
            try:
                weights.append(float(w) if colon else 1.0)
            except ValueError:
                raise SystemExit(f"--sets {spec!r}: {w!r} is not a weight (VIEW:0.8)") from None
            views.append(v)
        if rule != "mean" and len(set(weights)) > 1:
            raise SystemExit(f"--sets {spec!r}: weights apply to the mean only")
        if not all(w >= 0 for w in weights) or sum(weights) <= 0:  # `not >= 0` also refuses nan
            raise SystemExit(f"--sets {spec!r}: weights must be >= 0 and not all 0")
        return cls(name, tuple(views), tuple(w / sum(weights) for w in weights), rule)

    def combine(self, logits: dict[str, np.ndarray], c: int) -> np.ndarray:
        """Class ``c``'s margin per photo from each view's (N, classes) logits."""
        if self.rule == "mean":
            return class_margin(sum(w * logits[v] for v, w in zip(self.views, self.weights)), c)
        margins = np.stack([class_margin(logits[v], c) for v in self.views])
        if self.rule == "median":
            return np.median(margins, axis=0)
        return margins[np.abs(margins).argmax(0), np.arange(margins.shape[1])]


def samples_of(shared: Path, cache: Path, labels: list[str], negative: str):
    from dataclasses import replace

    from benchmarks.met_ivory import SHIPPABLE_POOLS, pool_root
    from training.data.sources import load_samples, select_split

    val = [s for s in select_split(load_samples([shared / "met-ivory"]), "val") if s.label in labels]
    pools = [pool_root(p, shared, cache) for p in SHIPPABLE_POOLS]
    val += select_split([replace(s, label=negative) for s in load_samples(pools)], "val")
    return val


def decoded(samples, contract) -> list:
    """(sample, picture) pairs, decoded as the model's own views need (``training.predict.decode_sample``)."""
    from training.predict import decode_sample

    out = []
    for s in samples:
        img = decode_sample(s, contract)
        if isinstance(img, str):
            print(f"skipped {s.path}: {img}", flush=True)
        else:
            out.append((s, img))
    return out


def cached_views(path: Path) -> set[str]:
    return set(np.load(path).files) if path.is_file() else set()


def cache_condition(model, kept: list, name: str, path: Path, views: list[str]) -> None:
    """path.npz: the logits of each of ``views`` of every photo under condition ``name`` (view -> N x C); views
    cached before are kept."""
    todo = [v for v in views if v not in cached_views(path)]
    if not todo:
        return
    pre = model.contract.preprocessing
    with ThreadPoolExecutor(2) as pool:
        arrays = np.stack(list(pool.map(pre, condition_images(name, kept)))).astype(np.float32)
    logits = dict(np.load(path)) if path.is_file() else {}
    logits.update({v: np.concatenate([model.predict_logits(view(v, arrays[i:i + 32]))
                                      for i in range(0, len(arrays), 32)]) for v in todo})
    atomic_savez(path, **logits)
    print(f"cached {name}: {', '.join(todo)} ({len(arrays)} photos)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="an exported ONNX file, or a run dir (its best.pt, for views of another size)")
    ap.add_argument("--cache", required=True)
    ap.add_argument("--shared", default=str(REPO.parent / "shared" / "datasets"))
    ap.add_argument("--conditions", default="clean,rotate,greyscale,crop,phone,jpeg,thumbnail,banner,watermark")
    ap.add_argument("--unseen", action="append", default=[], help="negatives no run trained on (a root or CSV manifest)")
    ap.add_argument("--sets", action="append", default=None, help="NAME=[RULE/]VIEW[:WEIGHT],... (repeat)")
    ap.add_argument("--label", default="ivory")
    args = ap.parse_args()
    from training.data.sources import load_samples, select_split
    from benchmarks.ensemble_check import predictor_of

    model = predictor_of(Path(args.model))
    labels = list(model.contract.labels)
    c = labels.index(args.label)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    conditions = ["clean"] + [n for n in args.conditions.split(",") if n != "clean"]
    sets = args.sets or ["none=id", "mirror=id,hflip", "turns=id,rot90,rot180,rot270", "grey=id,grey",
                         "turns+mirror=id,rot90,rot180,rot270,hflip", "turns+grey=id,rot90,rot180,rot270,grey",
                         "all=id,rot90,rot180,rot270,hflip,grey"]
    view_sets = [ViewSet.parse(spec) for spec in sets]
    views = sorted({v for spec in view_sets for v in spec.views})
    if not (cache / "meta.npz").is_file() or any(set(views) - cached_views(cache / f"{n}.npz") for n in conditions):
        kept = decoded(samples_of(Path(args.shared), cache, labels, model.contract.negative_label), model.contract)
        y = np.array([labels.index(s.label) for s, _ in kept])
        if (cache / "meta.npz").is_file() and not np.array_equal(np.load(cache / "meta.npz")["y"], y):
            raise SystemExit(f"{cache} holds other photos: name a new --cache")
        atomic_savez(cache / "meta.npz", y=y)
        for name in conditions:
            cache_condition(model, kept, name, cache / f"{name}.npz", views)
    if args.unseen and set(views) - cached_views(cache / "unseen.npz"):
        cache_condition(model, decoded(select_split(load_samples(args.unseen), "val"), model.contract), "clean",
                        cache / "unseen.npz", views)
    positive = np.load(cache / "meta.npz")["y"] == c
    logits = {n: np.load(cache / f"{n}.npz") for n in conditions + (["unseen"] if args.unseen else [])}

    def margin(cond: str, spec: ViewSet) -> np.ndarray:
        return spec.combine({v: logits[cond][v] for v in spec.views}, c)

    head = " | ".join(f"{n} recall | {n} flagged" for n in conditions)
    head += " | unseen flagged | clean recall, budget over all" if args.unseen else ""
    print(f"| views | {head} |\n|---|" + "---|" * (2 * len(conditions) + 2 * bool(args.unseen)))
    for spec in view_sets:
        values = recall_at_budget({cond: margin(cond, spec) for cond in conditions}, positive, conditions,
                                  unseen=margin("unseen", spec) if args.unseen else None)
        # recall, negatives flagged per condition; then unseen flagged, clean recall with them in the budget
        cells = [f"{v:.3f}" if i % 2 == 0 else f"{v:.1%}" for i, v in enumerate(values[:2 * len(conditions)])]
        if args.unseen:
            cells += [f"{values[-2]:.1%}", f"{values[-1]:.3f}"]
        print(f"| {spec.name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    from _entry import run_main  # benchmarks/ is sys.path[0] here: one line for a user's mistake

    run_main(main)
