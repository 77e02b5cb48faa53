"""``wildcheck robustness``: a model's decisions on a split as it is and under listing conditions.

Listing photos are screenshots, collages, thumbnails, recompressed and sideways; a model that only
holds up on museum photography cannot be switched on. Each image is decoded once; every condition
(``training.conditions``) is applied to that decoded picture with a generator seeded by (seed,
condition, image), then scored through ``training.predict.predict_images`` and decided by
``serving.decision.decide`` at the model's own thresholds, exactly like evaluation and serving.
"""

from __future__ import annotations

import json
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
from PIL import Image
from pydantic import BaseModel
from tqdm.auto import tqdm

from serving.decision import decide
from serving.errors import InvalidInput
from serving.imageio import ImageError, decode_image
from serving.tiling import draft_size
from training.conditions import Condition, condition_rng, default_conditions
from training.data.sources import Sample, load_samples, select_split
from training.metrics import compute_metrics, decision_report
from training.outputs import out_folder
from training.predict import load_predictor, predict_images

CLEAN = "clean"


class RobustnessError(InvalidInput):
    """The data cannot be used for the report (no images, no known label, too few negatives for a condition)."""


class ClassRobustness(BaseModel):
    support: int
    flag_recall: float | None  # review or block
    block_recall: float | None
    block_precision: float | None
    pr_auc: float | None


class Share(BaseModel):
    n: int
    flagged: float  # review or block
    blocked: float


class NegativesRobustness(Share):
    per_source: dict[str, Share]


class ConditionResult(BaseModel):
    kind: str
    description: str
    params: dict
    balanced_accuracy: float
    accuracy: float
    per_class: dict[str, ClassRobustness]
    negatives: NegativesRobustness | None
    decisions: dict[str, float]  # share of block / review / allow over all images


class RobustnessReport(BaseModel):
    model: str
    data: list[str]
    negatives: list[str]
    split: str | None
    seed: int
    limit: int | None
    labels: list[str]
    negative_label: str
    thresholds: dict[str, dict]
    never_block: list[str]
    counts: dict[str, int]
    sources: dict[str, int]
    skipped: list[dict[str, str]]
    shrunk: int = 0  # photos longer than MAX_SIDE px, measured shrunk to it
    unknown_labels: dict[str, int]
    conditions: dict[str, ConditionResult]
    seconds: float


def gather(data: list[str | Path], negatives: list[str | Path], split: str | None, labels: list[str],
           negative_label: str) -> tuple[list[Sample], list[str], dict[str, int]]:
    """(samples whose label the model knows, their source, counts of unknown labels left out). A root given twice
    is read once (``--data d --data ./d/``, as ``evaluate``); one given as both ``--data`` and ``--negatives`` (or
    inside the other) is refused: its protected photos would be counted again as negatives."""
    def overlap(a, b) -> bool:
        a, b = Path(a).resolve(), Path(b).resolve()
        return a.is_relative_to(b) or b.is_relative_to(a)

    both = [(n, d) for n in negatives for d in data if overlap(n, d)]
    if both:
        n, d = both[0]
        what = f"{n} is given as --data and as --negatives" if Path(n).resolve() == Path(d).resolve() else \
            f"--negatives {n} and --data {d} overlap (one is inside the other)"
        raise RobustnessError(f"{what}: its images would be counted twice, the labelled ones also as negatives. Give "
                              "each root once: --data for a labelled root, --negatives for a root of ordinary photos")
    samples, sources, unknown, seen = [], [], {}, set()
    for root, is_negative in [(r, False) for r in data] + [(r, True) for r in negatives]:
        root = Path(root)
        if root.resolve() in seen:
            continue
        seen.add(root.resolve())
        found = load_samples([root], default_split=split or "val")
        if split:
            found = select_split(found, split)
            if not found:
                raise RobustnessError(f"no images in split {split!r} of {root}")
        for s in found:
            if is_negative:
                s = replace(s, label=negative_label)
            if s.label not in labels:
                unknown[s.label] = unknown.get(s.label, 0) + 1
                continue
            samples.append(s)
            sources.append(s.origin)  # pool/source: where a false positive came from
    if not samples:
        raise RobustnessError(f"none of the images carries a label the model knows ({labels})")
    return samples, sources, unknown


def seeded_subset(n: int, limit: int | None, seed: int) -> np.ndarray:
    """The indices ``--limit`` keeps of ``n`` images: a seeded random subset, in order (all when no limit)."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:limit])


def image_key(sample: Sample) -> str:
    """What seeds an image's conditions: stable across machines and across --limit."""
    return "/".join(sample.path.parts[-3:])


# The longest side a photo is measured at. Conditions cost memory in proportion to the picture (a frame is 9x its
# area, phone noise 24 bytes a pixel): one 6000 x 6000 PNG took the report to 6.9 GB. A JPEG is already decoded near
# the model's size (``draft_size``); a larger PNG/WebP/TIFF is shrunk to this first. Listing photos are ~1000 px.
MAX_SIDE = 2048


class _Decoder:
    """Decodes images the way evaluation does (shrunk to ``MAX_SIDE`` when larger); remembers which ones cannot be
    used, and how many were shrunk."""

    def __init__(self, draft_size: int | None):
        self.draft_size = draft_size
        self.bad: dict[int, str] = {}
        self.shrunk: set[int] = set()

    def __call__(self, sample: Sample, index: int):
        if index in self.bad:
            return None
        try:
            img = decode_image(sample.path, draft_size=self.draft_size)[0]
            if max(img.size) > MAX_SIDE:
                img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.BICUBIC)
                self.shrunk.add(index)
            return img
        except ImageError as exc:
            self.bad[index] = f"{exc.code}: {exc.message}"
        except OSError as exc:
            self.bad[index] = f"unreadable: {exc}"
        return None


def _others(condition: Condition, rng: np.random.Generator, index: int, pool: np.ndarray, samples: list[Sample],
            decoder: _Decoder) -> list:
    """``condition.others`` readable photos from ``pool`` (sample indices), never the image itself."""
    if not condition.others:
        return []
    picked = []
    for j in rng.permutation(pool):
        if j == index:
            continue
        img = decoder(samples[j], int(j))
        if img is not None:
            picked.append(img)
            if len(picked) == condition.others:
                return picked
    raise RobustnessError(f"a {condition.kind} needs {condition.others} other readable negative "
                     "images in the evaluated set; add --negatives ROOT or leave the condition out with --conditions")


def _enough_fillers(conditions: dict[str, Condition], pool: np.ndarray, samples: list[Sample], decoder: "_Decoder",
                    negative: str) -> None:
    """Before any scoring: a condition that needs other photos (a collage) finds enough readable negatives. Counting
    the pool is not enough when some are unreadable: the run failed part-way, its work lost. Stops decoding once
    there are enough (a few decodes on a real pool)."""
    need = max((c.others for c in conditions.values()), default=0)
    if not need:
        return
    readable = 0
    for j in pool:
        if decoder(samples[j], int(j)) is not None:
            readable += 1
            if readable > need:  # a negative's collage needs others besides itself
                return
    name = next(n for n, c in conditions.items() if c.others == need)
    raise RobustnessError(f"{name} needs more than {need} readable {negative!r} images in the evaluated set, found "
                          f"{readable} ({len(pool) - readable} unreadable); add --negatives ROOT or leave {name} out "
                          "with --conditions")


def _metrics(name: str, condition: Condition | None, probs: np.ndarray, y_true: np.ndarray, sources: list[str],
             labels: list[str], thresholds, never_block, negative: str) -> ConditionResult:
    with warnings.catch_warnings():  # classes the data lacks (a 3-class model on ivory data) are expected
        warnings.simplefilter("ignore", UserWarning)
        base = compute_metrics(y_true, probs, labels)
    report = decision_report(probs, y_true, labels, thresholds, never_block, negative)
    per_class = {
        label: ClassRobustness(pr_auc=base["per_class"][label]["pr_auc"], **{
            k: m[k] for k in ("support", "flag_recall", "block_recall", "block_precision")})
        for label, m in report["per_class"].items()
    }
    negatives = None
    if negative in labels and (y_true == labels.index(negative)).any():
        kinds = np.array([decide(dict(zip(labels, p.tolist())), thresholds, never_block)[0] for p in probs])
        is_neg = y_true == labels.index(negative)

        def share(mask: np.ndarray) -> dict:
            return {"n": int(mask.sum()), "flagged": float(np.isin(kinds[mask], ["block", "review"]).mean()),
                    "blocked": float((kinds[mask] == "block").mean())}

        src = np.array(sources)
        per_source = {s: Share(**share(is_neg & (src == s))) for s in sorted(set(src[is_neg].tolist()))}
        negatives = NegativesRobustness(**share(is_neg), per_source=per_source)
    return ConditionResult(
        kind=CLEAN if condition is None else condition.kind,
        description="the photo as it is" if condition is None else condition.description,
        params={} if condition is None else condition.params(),
        balanced_accuracy=base["balanced_accuracy"], accuracy=base["accuracy"], per_class=per_class,
        negatives=negatives, decisions=report["share"],
    )


def robustness(
    model: str | Path,
    data: list[str | Path],
    negatives: list[str | Path] = (),
    split: str | None = "val",
    conditions: dict[str, Condition] | None = None,
    seed: int = 0,
    limit: int | None = None,
    out_dir: str | Path | None = None,
    batch_size: int = 32,
    workers: int = 2,
    threads: int | None = None,
) -> RobustnessReport:
    """Score ``data`` (+ ``negatives``, labelled as the model's negative class) clean and under each condition."""
    if out_dir is not None:  # before any work: never a file, never among the images scored
        out_folder(out_dir, reads=[*data, *negatives])
    started = time.perf_counter()
    conditions = default_conditions() if conditions is None else conditions
    predictor = load_predictor(model, threads=threads)
    labels = list(predictor.labels)
    spec = predictor.spec
    thresholds, never_block, negative = spec.thresholds, spec.never_block, spec.negative_label
    samples, sources, unknown = gather(list(data), list(negatives), split, labels, negative)
    if limit is not None and limit < len(samples):
        keep = seeded_subset(len(samples), limit, seed)
        samples, sources = [samples[i] for i in keep], [sources[i] for i in keep]
    if unknown:
        print(f"labels unknown to the model (left out): {unknown}")
    pool = np.array([i for i, s in enumerate(samples) if s.label == negative], dtype=np.int64)
    for name, condition in conditions.items():
        if condition.others and len(pool) <= condition.others:  # a negative's collage needs others besides itself
            raise RobustnessError(f"{name} needs more than {condition.others} {negative!r} images in the evaluated set, "
                             f"found {len(pool)}; add --negatives ROOT or leave {name} out with --conditions")
    decoder = _Decoder(draft_size(spec.preprocessing, spec.tiling))
    _enough_fillers(conditions, pool, samples, decoder, negative)
    names = [CLEAN, *conditions]
    probs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    kept: list[int] = []

    def transformed(args):
        name, img, index = args
        if name == CLEAN:
            return img
        condition = conditions[name]
        rng = condition_rng(seed, name, image_key(samples[index]))
        others = _others(condition, rng, index, pool, samples, decoder)
        try:
            return condition.apply(img, rng, others)
        except Exception as exc:  # a bug in a condition: say where, so it can be reproduced (same seed, same image)
            raise ValueError(f"condition {name!r} failed on {samples[index].path} (seed {seed}): {exc}") from exc

    with ThreadPoolExecutor(max_workers=workers) as threads_pool, \
            tqdm(total=len(samples), desc=f"robustness ({len(names)} conditions)", unit="img") as bar:
        for start in range(0, len(samples), batch_size):
            chunk = list(range(start, min(start + batch_size, len(samples))))
            decoded = list(threads_pool.map(lambda i: decoder(samples[i], i), chunk))
            chunk = [i for i, img in zip(chunk, decoded) if img is not None]
            images = [img for img in decoded if img is not None]
            for name in names:
                if not chunk:
                    break
                shown = list(threads_pool.map(transformed, [(name, img, i) for img, i in zip(images, chunk)]))
                probs[name].append(predict_images(predictor, shown, threads_pool))
            kept += chunk
            bar.update(min(batch_size, len(samples) - start))
    if not kept:
        raise RobustnessError("none of the images could be read")
    index = {label: i for i, label in enumerate(labels)}
    y_true = np.array([index[samples[i].label] for i in kept])
    kept_sources = [sources[i] for i in kept]
    results = {
        name: _metrics(name, None if name == CLEAN else conditions[name], np.concatenate(probs[name]), y_true,
                       kept_sources, labels, thresholds, never_block, negative)
        for name in names
    }
    skipped = [{"path": str(samples[i].path), "reason": r} for i, r in sorted(decoder.bad.items())]
    counts: dict[str, int] = {}
    source_counts: dict[str, int] = {}
    for i in kept:
        counts[samples[i].label] = counts.get(samples[i].label, 0) + 1
        source_counts[sources[i]] = source_counts.get(sources[i], 0) + 1
    report = RobustnessReport(
        model=str(model), data=[str(d) for d in data], negatives=[str(n) for n in negatives], split=split, seed=seed,
        limit=limit, labels=labels, negative_label=negative,
        thresholds={k: v.model_dump() for k, v in thresholds.items()}, never_block=list(never_block),
        counts=counts, sources=dict(sorted(source_counts.items())), skipped=skipped,
        shrunk=len(decoder.shrunk & set(kept)), unknown_labels=unknown,
        conditions=results, seconds=round(time.perf_counter() - started, 1),
    )
    print(format_report(report))
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s)")
    if report.shrunk:
        print(f"{report.shrunk} photo(s) longer than {MAX_SIDE} px were measured shrunk to {MAX_SIDE} px")
    if out_dir is not None:
        write_report(report, out_dir)
    return report


def write_report(report: RobustnessReport, out_dir: str | Path) -> None:
    from training.fileio import atomic_write_text
    from training.plots import plot_robustness

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "robustness.json", json.dumps(report.model_dump(mode="json"), indent=2))
    plot_robustness(chart_series(report), list(report.conditions), out_dir / "robustness.png", CLEAN)
    print(f"wrote {out_dir}/robustness.json and robustness.png")


def chart_series(report: RobustnessReport) -> dict[str, dict[str, float | None]]:
    """metric name -> condition -> value: what the table and the chart show."""
    series: dict[str, dict[str, float | None]] = {}
    for name, r in report.conditions.items():
        for label, m in r.per_class.items():
            if not m.support:  # a class the evaluated data does not contain
                continue
            series.setdefault(f"{label} flagged", {})[name] = m.flag_recall
            series.setdefault(f"{label} blocked", {})[name] = m.block_recall
            series.setdefault(f"{label} block precision", {})[name] = m.block_precision
        if r.negatives is not None:
            series.setdefault("negatives flagged", {})[name] = r.negatives.flagged
            series.setdefault("negatives blocked", {})[name] = r.negatives.blocked
        series.setdefault("balanced accuracy", {})[name] = r.balanced_accuracy
    return series


def format_report(report: RobustnessReport) -> str:
    """One row per metric, one column per condition (``clean`` first)."""
    series = chart_series(report)
    names = list(report.conditions)
    first = max(len(m) for m in series) + 2
    widths = [max(len(n), 5) + 2 for n in names]
    lines = [f"{report.counts} images ({report.split or 'all'} split), seed {report.seed}, {report.seconds:.0f}s",
             f"{'':<{first}}" + "".join(f"{n:>{w}}" for n, w in zip(names, widths))]
    for metric, values in series.items():
        cells = [values.get(n) for n in names]
        lines.append(f"{metric:<{first}}" + "".join(f"{'-' if v is None else f'{v:.3f}':>{w}}" for v, w in zip(cells, widths)))
    return "\n".join(lines)
