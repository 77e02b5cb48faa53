"""Evaluate a checkpoint, run dir or ONNX file on labelled images: one code path for all three.

Prediction is ``training.predict``'s (the server's decoding and preprocessing); this module turns
probabilities into an ``Evaluation`` report, which the CLI prints with ``format_evaluation``.
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from serving.errors import InvalidInput
from serving.errors import printable
from training.data.sources import Sample, load_samples, select_split
from training.metrics import compute_metrics, decision_report, false_positive_report, format_decisions, summary_table
from training.fileio import atomic_path, atomic_write_text
from training.outputs import out_file, out_folder
from training.predict import load_predictor, predict_samples

log = logging.getLogger(__name__)


class EvaluationError(InvalidInput):
    """The data cannot be evaluated with this model (no images in the split, no label it knows)."""


class Evaluation(BaseModel):
    """What ``evaluate`` measured: ``training.metrics.compute_metrics``'s fields, the decisions at the model's
    thresholds, false-positive rates and sources on negatives, and what was left out. metrics.json is its dump."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    labels: list[str]
    n: int
    accuracy: float
    balanced_accuracy: float | None
    macro_f1: float
    nll: float
    per_class: dict[str, dict[str, Any]]
    confusion_matrix: list[list[int]]
    decisions: dict[str, Any]
    false_positives: dict[str, Any] | None = None
    per_source: dict[str, Any] | None = None
    model: str
    data: list[str]
    split: str | None
    skipped: list[dict[str, str]]
    unknown_labels: dict[str, int]
    out_dir: str | None = None  # where metrics.json and the plots went ...
    written: list[str] = []  # ... and their names, for the CLI's last line

    def to_json(self) -> str:
        dump = self.model_dump(mode="json", exclude={"out_dir", "written"})
        return json.dumps({k: v for k, v in dump.items() if v is not None or k not in ("false_positives", "per_source")},
                          indent=2)


# what ``evaluate --out DIR`` writes into DIR besides predictions.csv (a folder name ends in /)
EVALUATION_FILES = ("metrics.json", "confusion_matrix.png", "pr_curves.png", "false_positives.png",
                    "false_positives_by_source/")


def _predictions_apart(predictions: str | Path, out_dir: str | Path) -> None:
    """Refuse ``--predictions`` that is ``--out`` itself or one of the files evaluate writes there: the CSV replaced
    metrics.json (exit 0, the metrics lost), or failed on the folder (IsADirectoryError) after all the scoring."""
    where, out = Path(predictions).resolve(), Path(out_dir).resolve()
    if where == out:
        raise InvalidInput(f"--predictions {predictions} is the --out folder; name a file, e.g. --predictions "
                           f"{Path(out_dir) / 'predictions.csv'} (the default), or leave --predictions out")
    for name in EVALUATION_FILES:
        if where == out / name.rstrip("/") or (name.endswith("/") and where.is_relative_to(out / name)):
            raise InvalidInput(f"--predictions {predictions} is {'in ' if name.endswith('/') else ''}{name}, which "
                               f"evaluate writes into --out {out_dir}; name another file, e.g. --predictions "
                               f"{Path(out_dir) / 'predictions.csv'} (the default)")


def evaluate(
    model: str | Path,
    data: list[str | Path],
    split: str | None = "val",
    out_dir: str | Path | None = None,
    predictions: str | Path | None = None,
    batch_size: int = 32,
    threads: int | None = None,
) -> Evaluation:
    """Metrics (and, with ``out_dir``, metrics.json, predictions.csv and PNG plots) for ``model`` on ``data``."""
    if out_dir is not None:  # before any work: never a file, never among the images evaluated
        out_folder(out_dir, reads=data)
    if predictions is not None:  # never the model, the data or an image: a CSV it replaces must be one
        out_file(predictions, "--predictions", "predictions.csv", reads=data, protect=[model], kinds=(".csv",))
        if out_dir is not None:
            _predictions_apart(predictions, out_dir)
    predictor = load_predictor(model, threads=threads)
    spec = predictor.spec
    samples = load_samples(data, default_split=split or "val")
    if split:
        chosen = select_split(samples, split)
        if not chosen:
            raise EvaluationError(f"no images in split {split!r} of {data}; splits present: {sorted({s.split for s in samples})}")
        samples = chosen
    labels, negative = spec.labels, spec.negative_label
    unknown = Counter(s.label for s in samples if s.label not in labels)
    probs, kept, skipped = predict_samples(predictor, samples, batch_size)
    known = np.array([s.label in labels for s in kept], dtype=bool)
    if not kept:
        raise EvaluationError(f"none of the {len(samples)} images could be read ({skipped[0][0]}: {skipped[0][1]}, ...); "
                              "fix or remove them (wildcheck data check lists them) and run again")
    if not known.any():
        raise EvaluationError(f"none of the images carries a label the model knows ({labels})")
    index = {label: i for i, label in enumerate(labels)}
    y_true = np.array([index[s.label] for s, k in zip(kept, known) if k])
    known_probs = probs[known]  # the images whose label the model knows; indexed once
    known_samples = [s for s, k in zip(kept, known) if k]
    fp = false_positive_report(known_probs, y_true, labels, spec.thresholds, negative)
    report = Evaluation(
        **compute_metrics(y_true, known_probs, labels),
        decisions=decision_report(known_probs, y_true, labels, spec.thresholds, spec.never_block, negative),
        false_positives=fp or None,
        per_source=source_report(known_probs, known_samples, labels, spec.thresholds, spec.never_block, negative) or None,
        model=str(model), data=[str(d) for d in data], split=split,
        skipped=[{"path": p, "reason": r} for p, r in skipped], unknown_labels=dict(unknown),
    )
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "metrics.json", report.to_json())
        default = out_dir / "predictions.csv"
        if predictions is not None and Path(predictions).resolve() != default.resolve() and default.is_file():
            default.unlink()  # an earlier evaluation's rows beside this one's metrics.json would be read as its own
        predictions = predictions or default
        report.out_dir = str(out_dir)
        report.written = ["metrics.json"] + _write_plots(report, predictor, y_true, known_probs, known_samples, out_dir)
    if predictions is not None:
        write_predictions(predictions, kept, probs, labels)
    return report


def _write_plots(report: Evaluation, predictor, y_true: np.ndarray, probs: np.ndarray, samples: list[Sample],
                 out_dir: Path) -> list[str]:
    from training.explain import heat_grids
    from training.plots import plot_confusion_matrix, plot_image_grid, plot_pr_curves, plot_source_false_positives

    labels, negative = report.labels, predictor.spec.negative_label
    plot_confusion_matrix(np.array(report.confusion_matrix), labels, out_dir / "confusion_matrix.png")
    plot_pr_curves(y_true, probs, labels, out_dir / "pr_curves.png")
    written = ["confusion_matrix.png", "pr_curves.png"]
    _remove_stale(out_dir, bool(report.false_positives), bool(report.per_source))
    if report.false_positives:
        negatives = [i for i, s in enumerate(samples) if s.label == negative]
        product = [i for i, label in enumerate(labels) if label != negative]
        worst = sorted(negatives, key=lambda i: -probs[i, product].max())[:16]
        worst_paths = [str(samples[i].path) for i in worst]
        plot_image_grid(worst_paths, [", ".join(f"{labels[j]} {probs[i, j]:.2f}" for j in product) for i in worst],
                        out_dir / "false_positives.png", title=f"most confident false positives ({negative} images)"
                        + (", with heat maps of the top class" if predictor.has_cam else ""),
                        heatmaps=heat_grids(predictor, worst_paths))
        written.append("false_positives.png")
    if report.per_source:
        plot_source_false_positives(report.per_source, out_dir / "false_positives_by_source")
        written.append("false_positives_by_source/")
    return written


def _remove_stale(out_dir: Path, fp_plot: bool, source_plots: bool) -> None:
    """An earlier evaluation's plots this one does not draw would be read as this one's: remove them."""
    if not fp_plot and (out_dir / "false_positives.png").is_file():
        (out_dir / "false_positives.png").unlink()
    if not source_plots and (out_dir / "false_positives_by_source").is_dir():
        import shutil

        shutil.rmtree(out_dir / "false_positives_by_source")


def format_evaluation(report: Evaluation) -> str:
    """The report as the CLI prints it."""
    lines = []
    if report.unknown_labels:
        lines.append(f"labels unknown to the model (left out of the metrics, still predicted): {report.unknown_labels}")
    lines += [summary_table(report.model_dump()), format_decisions(report.decisions)]
    fp = report.false_positives
    for label, r in (fp["per_class"].items() if fp else ()):
        lines.append(f"  false-positive rate on {fp['negatives']} negatives, {label}: {r['at_0.5']:.2%} at 0.5, "
                     f"{r['at_review']:.2%} at review ({r['review']:.3f}), "
                     + (f"{r['at_block']:.2%} at block ({r['block']:.3f})" if r["block"] is not None else "never blocks"))
    if report.per_source:
        lines.append(format_sources(report.per_source))
    if report.skipped:
        lines.append(f"skipped {len(report.skipped)} unreadable image(s)")
    if report.out_dir:
        lines.append(f"wrote {report.out_dir}/" + ", ".join(report.written))
    return printable("\n".join(lines))


def source_report(probs: np.ndarray, samples: list[Sample], labels: list[str], thresholds, never_block,
                  negative: str, top: int = 8) -> dict:
    """Per source of the negatives (``pool/source``: the root, then the first folder under the label or a
    manifest's ``source``): images, flag rate (review or block), block rate, and the most confident ones."""
    from serving.decision import decide

    product = [j for j, label in enumerate(labels) if label in thresholds]
    groups: dict[str, list[tuple[float, str, str, str]]] = {}
    for i, s in enumerate(samples):
        if s.label != negative or not product:
            continue
        scores = {labels[j]: float(probs[i, j]) for j in product}
        decision, _ = decide(scores, thresholds, never_block)
        best = max(scores, key=scores.get)
        groups.setdefault(s.origin or "data", []).append((scores[best], best, decision, str(s.path)))
    out = {}
    for origin, rows in groups.items():
        rows.sort(key=lambda r: -r[0])
        n = len(rows)
        out[origin] = {"n": n, "flag_rate": sum(r[2] != "allow" for r in rows) / n,
                       "block_rate": sum(r[2] == "block" for r in rows) / n,
                       "top": [{"score": round(sc, 4), "label": lb, "decision": d, "path": p} for sc, lb, d, p in rows[:top]]}
    return dict(sorted(out.items(), key=lambda kv: (-kv[1]["flag_rate"], kv[0])))


def format_sources(sources: dict) -> str:
    lines = ["false positives by source (negatives; flag = review or block):",
             f"  {'source':<42} {'images':>7} {'flag':>7} {'block':>7}  top score"]
    for origin, r in sources.items():
        top = r["top"][0] if r["top"] else None
        lines.append(f"  {origin:<42} {r['n']:>7} {r['flag_rate']:>7.2%} {r['block_rate']:>7.2%}  "
                     + (f"{top['score']:.3f} {top['label']}" if top else ""))
    return "\n".join(lines)


def write_predictions(path: str | Path, samples: list[Sample], probs: np.ndarray, labels: list[str]) -> None:
    """Written atomically: a failed write keeps the earlier file. A file name that is not UTF-8 (a Latin-1 name
    from a Windows archive) is written as its own bytes (``surrogateescape``), so the row still names that file."""
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "pred"] + [f"p_{label}" for label in labels])
        for sample, p in zip(samples, probs):
            writer.writerow([str(sample.path), sample.label, labels[int(p.argmax())]] + [f"{v:.6f}" for v in p])
