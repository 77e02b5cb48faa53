"""Do averaged seeds beat one seed? Whole-photo ivory recall at a 1% flag budget, as is and under conditions.

    python benchmarks/ensemble_check.py --arm "noise20=runs/N20a,runs/N20b,runs/N20c,runs/N20d" [--arm ...]
        [--conditions clean,greyscale,crop,phone] [--unseen ROOT_OR_CSV ...] [--budget-over clean|all] [--cache DIR]

For each run (its ``best.pt``, or an exported ONNX file: a shipped model), the logits of every validation photo of the run (Met val + its pools' val
splits, as calibration sees them) are computed once per condition (``training.conditions``, seeded) and
cached in ``--cache`` as RUN_NAME.npz, with the model file's sha256 (a file replaced under the same name is
scored again). Each arm then reports, over its runs taken alone, over every pair
(logits averaged, as ``wildcheck ensemble`` does) and over all of them: the ivory recall and the share of
negatives flagged at the score that flags 1% of the clean negatives, as is and under each condition
(mean ± sd over runs or pairs). ``--unseen``: negatives from sources no run trained on (their val split,
e.g. the pools' research-only sources), reported as the share flagged at that same score, and the clean
recall when the 1% budget counts them among the negatives. ``--budget-over all``: the budget is held over the
negatives of every condition and the unseen ones together (one threshold for all photos). Whole photo only (no
collage panels): a quick screen before the full ``wildcheck robustness`` report of the chosen ensemble.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.fileio import atomic_savez  # noqa: E402


SEEDING = "per-image"  # condition_rng(0, condition, image_key) per photo; caches before it drew from one generator


def key(run: Path) -> str:
    """A run's name in the cache: its folder's name, or for an ONNX file its folder's and its own."""
    return f"{run.parent.name}_{run.stem}" if run.suffix == ".onnx" else run.name


def predictor_of(run: Path):
    """A run dir's best.pt, or an ONNX file, as a predictor scoring at temperature 1 on the whole photo."""
    from training.predict import TorchPredictor, load_predictor

    if run.suffix == ".onnx":
        model = load_predictor(run, threads=2)
        model.contract = model.contract.model_copy(update={"temperature": 1.0, "tiling": None})
        return model
    model = TorchPredictor(run / "best.pt", threads=2)
    model.spec = model.spec.model_copy(update={"temperature": 1.0, "tiling": None})
    return model


def condition_images(name: str, kept: list, others: list | None = None) -> list:
    """The photos of ``kept`` ((sample, image) pairs) under condition ``name``, each drawn from its own generator
    as `wildcheck robustness` seeds it (seed 0): a photo looks the same whatever else is screened with it.
    ``others``: a collage's other photos (default: the first three of ``kept``)."""
    from training.conditions import condition_rng, default_conditions
    from training.robustness import image_key

    images = [img for _, img in kept]
    if name == "clean":
        return images
    condition = default_conditions()[name]
    others = images[:3] if others is None else others
    return [condition.apply(img, condition_rng(0, name, image_key(sample)), others) for sample, img in kept]


@functools.lru_cache(maxsize=None)
def checkpoint_of(run: Path):
    """A run dir's best.pt, loaded once however many checks read it."""
    from training.checkpoint import Checkpoint

    return Checkpoint.load(run / "best.pt")


def preprocessing_of(run: Path) -> str:
    """The run's (or ONNX file's) preprocessing as JSON: what its photos must be shown at."""
    if run.suffix == ".onnx":
        from serving.contract import read_contract

        return read_contract(run).preprocessing.model_dump_json()
    return checkpoint_of(run).spec.preprocessing.model_dump_json()


def fingerprint(run: Path) -> str:
    """sha256 of the model file (a run dir's best.pt, or the ONNX file): a cache entry is a run's name, and a
    name outlives its file (models/wildcheck-ivory.onnx was 1.4.0 when session 16 cached it, then 1.5.0)."""
    path = run if run.suffix == ".onnx" else run / "best.pt"
    stat = path.stat()
    return file_sha256(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=None)
def file_sha256(path: Path, size: int, mtime_ns: int) -> str:  # size and mtime: a rewritten file is read again
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()[:16]


def is_cached(path: Path, run: Path, wanted: set[str], roots: list[str] | None = None) -> bool:
    """``path`` holds ``run``'s logits of this very file (and of ``wanted``, and the same unseen ``roots``)."""
    if not path.is_file():
        return False
    with np.load(path) as cached:
        return ("fingerprint" in cached.files and str(cached["fingerprint"]) == fingerprint(run)
                and wanted <= set(cached.files)
                and (roots is None or ("roots" in cached.files and list(cached["roots"]) == sorted(roots))))


@functools.lru_cache(maxsize=None)
def validation_of(run: Path) -> str | None:
    """sha256 of a run dir's validation photos (path and label; Met val plus its recorded pools' val splits);
    None for an ONNX file, which records no data and is scored on the cache's photos."""
    if run.suffix == ".onnx":
        return None
    from training.predict import run_samples

    val, _ = run_samples(checkpoint_of(run), None)
    return hashlib.sha256("\n".join(sorted(f"{Path(s.path).resolve()},{s.label}" for s in val)).encode()).hexdigest()


def check_runs(runs: list[Path], cache: Path) -> None:
    """Every run must take the photos as the cache's were preprocessed (once, by the first run's spec): a 320 px
    model screened on 256 px arrays is scored on photos it never sees in use. And every run dir must record the
    cache's validation photos: a run recovered without its pools screened first made the budget Met val's alone."""
    meta = np.load(cache / "meta.npz")
    recorded = str(meta["preprocessing"])
    other = [str(r) for r in runs if preprocessing_of(r) != recorded]
    if other:
        raise SystemExit(f"{', '.join(other)} preprocess photos unlike the runs cached in {cache} "
                         f"({recorded}): screen them with their own --cache")
    if "validation" in meta.files:
        other = [str(r) for r in runs if validation_of(r) not in (None, str(meta["validation"]))]
        if other:
            raise SystemExit(f"{', '.join(other)} validate on other photos than the runs cached in {cache} "
                             "(other negatives pools?): screen runs that record the same data, or name a new --cache")


def cache_logits(runs: list[Path], conditions: list[str], cache: Path) -> None:
    """RUN.npz (one array of logits per condition) for each run not cached yet; meta.npz (labels, pools, the
    preprocessing every run must share)."""
    import torch

    from training.predict import TorchPredictor, readable, run_samples

    if (cache / "meta.npz").is_file():
        check_runs(runs, cache)
    todo = [r for r in runs if not is_cached(cache / f"{key(r)}.npz", r, set(conditions))]
    if not todo:
        return
    torch.set_num_threads(2)
    first_run = next((r for r in runs if r.suffix != ".onnx"), None)
    if first_run is None:
        raise SystemExit("name at least one run dir: its checkpoint says which validation photos to score")
    first = TorchPredictor(first_run / "best.pt", threads=2)
    val, _ = run_samples(first.checkpoint, None)
    kept = readable(val, first.spec)
    labels = first.spec.labels
    atomic_savez(cache / "meta.npz", y=np.array([labels.index(s.label) for s, _ in kept]),
             pools=np.array([s.pool or "validation" for s, _ in kept]), labels=np.array(labels),
             seeding=np.array(SEEDING), preprocessing=np.array(first.spec.preprocessing.model_dump_json()),
             validation=np.array(validation_of(first_run)))
    check_runs(runs, cache)
    pre, arrays = first.spec.preprocessing, {}
    with ThreadPoolExecutor(2) as pool:
        for name in conditions:
            shown = condition_images(name, kept)
            arrays[name] = np.stack(list(pool.map(pre, shown))).astype(np.float16)  # preprocessed once for all runs
    for run in todo:
        predictor = predictor_of(run)
        logits = {name: np.concatenate([predictor.predict_logits(a[i:i + 64].astype(np.float32))
                                        for i in range(0, len(a), 64)]) for name, a in arrays.items()}
        atomic_savez(cache / f"{key(run)}.npz", fingerprint=np.array(fingerprint(run)), **logits)
        print(f"cached {key(run)}", flush=True)


def cache_unseen(runs: list[Path], roots: list[str], cache: Path) -> None:
    """RUN.unseen.npz: clean logits of the val images under ``roots`` (all taken as negatives), per run."""
    import torch

    from training.data.sources import load_samples, select_split
    from training.predict import predict_samples

    todo = [r for r in runs if not is_cached(cache / f"{key(r)}.unseen.npz", r, {"logits"}, roots)]
    samples = select_split(load_samples(roots), "val")
    torch.set_num_threads(2)
    for run in todo:  # temperature 1: the cached logits' scale
        probs, kept, _ = predict_samples(predictor_of(run), samples, desc=f"unseen {key(run)}")
        sources = np.array([s.source or str(Path(s.path).parent.name) for s in kept])
        atomic_savez(cache / f"{key(run)}.unseen.npz", logits=np.log(np.clip(probs, 1e-12, 1)), sources=sources,
                 fingerprint=np.array(fingerprint(run)), roots=np.array(sorted(roots)))


def class_margin(logits: np.ndarray, c: int) -> np.ndarray:
    """Class ``c``'s logit minus the highest other one: the score a budget is set on (log-probabilities work alike)."""
    return logits[:, c] - np.delete(logits, c, axis=1).max(1)


def budget_threshold(negatives: np.ndarray, budget: float) -> float:
    """The score above which at most ``budget`` of ``negatives`` lie."""
    ordered = np.sort(negatives)
    return ordered[int(np.ceil((1 - budget) * len(ordered))) - 1]


def recall_at_budget(score: dict[str, np.ndarray], positive: np.ndarray, conditions: list[str],
                     budget: float = 0.01, unseen: np.ndarray | None = None, over_all: bool = False) -> list[float]:
    """[recall, negatives flagged] per condition at the clean score that flags ``budget`` of the negatives
    (then the share of ``unseen`` negatives' scores above it). ``over_all``: the budget is held over every
    negative score at once (clean, each condition's, the unseen ones), as a platform meets degraded photos too, so
    a model that buys recall with false flags on degraded photos pays for it in its threshold."""
    negatives = [score["clean"][~positive]]
    if over_all:
        negatives += [score[name][~positive] for name in conditions if name != "clean"]
        negatives += [unseen] if unseen is not None else []
    threshold = budget_threshold(np.concatenate(negatives), budget)
    out = []
    for name in conditions:
        out += [float(np.mean(score[name][positive] > threshold)), float(np.mean(score[name][~positive] > threshold))]
    if unseen is not None:  # then the clean recall with the unseen photos counted among the budget's negatives
        wide = budget_threshold(np.concatenate([score["clean"][~positive], unseen]), budget)
        out += [float(np.mean(unseen > threshold)), float(np.mean(score["clean"][positive] > wide))]
    return out


def mean_sd(rows: list[list[float]]) -> list[str]:
    """One table cell per column of ``rows`` (one row per run or group): its mean, ± its sd when there are several."""
    return [f"{statistics.mean(col):.3f}" + (f" ± {statistics.stdev(col):.3f}" if len(col) > 1 else "")
            for col in zip(*rows)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arm", action="append", required=True, help="NAME=RUN1,RUN2,... (runs of one recipe)")
    ap.add_argument("--conditions", default="clean,greyscale,crop,phone")
    ap.add_argument("--cache", default=str(REPO / "runs" / "ensemble_check"))
    ap.add_argument("--label", default="ivory", help="the protected class scored")
    ap.add_argument("--unseen", action="append", default=[], help="negatives no run trained on (a root or CSV manifest)")
    ap.add_argument("--budget-over", choices=["clean", "all"], default="clean",
                    help="the negatives the 1%% budget is held over: the clean ones (default), or every condition's "
                         "and the unseen ones together")
    args = ap.parse_args()
    conditions = args.conditions.split(",")
    if conditions[0] != "clean":
        conditions = ["clean"] + [c for c in conditions if c != "clean"]
    arms = {}
    for spec in args.arm:
        name, _, runs = spec.partition("=")
        arms[name] = [Path(r) for r in runs.split(",")]
    named: dict[str, Path] = {}
    for run in (r for runs in arms.values() for r in runs):
        if named.setdefault(key(run), run).resolve() != run.resolve():
            raise SystemExit(f"{named[key(run)]} and {run} share the cache name {key(run)}: "
                             "screen them with separate --cache folders, or link one under another name")
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    if (cache / "meta.npz").is_file() and not {"seeding", "preprocessing", "validation"} <= set(np.load(cache / "meta.npz").files):
        raise SystemExit(f"{cache} holds logits of conditions seeded the old way (one generator for all photos) "
                         "or of photos whose input size or validation set it does not record: name a new --cache")
    cache_logits([r for runs in arms.values() for r in runs], conditions, cache)
    if args.unseen:
        cache_unseen([r for runs in arms.values() for r in runs], args.unseen, cache)
    meta = np.load(cache / "meta.npz")
    labels = list(meta["labels"])
    c = labels.index(args.label)
    positive = meta["y"] == c
    logits = {key(r): np.load(cache / f"{key(r)}.npz") for runs in arms.values() for r in runs}

    def score(names: tuple[str, ...]) -> dict[str, np.ndarray]:  # averaged logits -> the class's margin
        return {cond: class_margin(np.mean([logits[n][cond] for n in names], axis=0), c) for cond in conditions}

    def unseen(names: tuple[str, ...]) -> np.ndarray | None:  # log-probabilities average like logits for 2 classes
        if not args.unseen:
            return None
        return class_margin(np.mean([np.load(cache / f"{n}.unseen.npz")["logits"] for n in names], axis=0), c)

    over_all = args.budget_over == "all"
    header = " | ".join(f"{cond} recall | {cond} negatives flagged" for cond in conditions)
    header += " | unseen negatives flagged | clean recall, budget over clean + unseen negatives" if args.unseen else ""
    print(f"| arm | models | {header} |\n|---|---|" + "---|" * (2 * len(conditions) + 2 * bool(args.unseen)))
    for name, runs in arms.items():
        names = [key(r) for r in runs]
        for what, groups in (("1", [(n,) for n in names]), ("2 averaged", list(itertools.combinations(names, 2))),
                             (f"{len(names)} averaged", [tuple(names)] if len(names) > 2 else [])):
            if not groups:
                continue
            rows = [recall_at_budget(score(g), positive, conditions, unseen=unseen(g), over_all=over_all) for g in groups]
            print(f"| {name} | {what} ({len(groups)}) | " + " | ".join(mean_sd(rows)) + " |")
    return 0


if __name__ == "__main__":
    from _entry import run_main  # benchmarks/ is sys.path[0] here: one line for a user's mistake

    run_main(main)
