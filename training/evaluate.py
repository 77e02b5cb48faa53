"""Evaluate a checkpoint, run dir or ONNX file on labelled images: one code path for all three.

Images go through ``serving.imageio.decode_image`` and the model's ``Preprocessing`` exactly as the
server does; only the final forward pass differs (torch or onnxruntime).
"""

from __future__ import annotations

import csv
import json
import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from serving.decision import ClassThresholds, default_thresholds
from serving.imageio import ImageError, decode_image
from serving.preprocess import Preprocessing
from serving.runtime import softmax
from serving.tiling import Tiling, draft_size, predict_views, views
from training.data.sources import Sample, load_samples, select_split
from training.metrics import compute_metrics, decision_report, false_positive_report, format_decisions, summary_table

log = logging.getLogger(__name__)


class TorchPredictor:
    """A wildcheck checkpoint (``best.pt``) with the same interface as ``serving.runtime.OnnxModel``."""

    def __init__(self, checkpoint: str | Path, threads: int | None = None):
        import torch

        from training.fileio import load_checkpoint
        from training.models import create_model

        if threads:
            torch.set_num_threads(threads)
        state = load_checkpoint(checkpoint)
        self.path = Path(checkpoint)
        self.labels: list[str] = list(state["labels"])
        self.preprocessing = Preprocessing.model_validate(state["preprocessing"])
        self.temperature = float(state.get("temperature", 1.0))
        negative = (state.get("config") or {}).get("data", {}).get("negative_label", "other")
        self.negative_label = negative
        self.thresholds = {k: ClassThresholds(**v) for k, v in state["thresholds"].items()} if state.get("thresholds") \
            else default_thresholds(self.labels, negative)
        self.never_block = list(state.get("never_block", []))
        self.tiling = Tiling.model_validate(state["tiling"]) if state.get("tiling") else None
        self.negative_index = self.labels.index(negative) if negative in self.labels else None
        self.state = state
        self.model = create_model(state["architecture"], len(self.labels), pretrained="none")
        self.model.load_state_dict(state["model"])
        self.model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        self._torch = torch

    def predict_logits(self, batch: np.ndarray) -> np.ndarray:
        with self._torch.inference_mode():
            x = self._torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(next(self.model.parameters()).device)
            return self.model(x).float().cpu().numpy()

    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        return softmax(self.predict_logits(batch), self.temperature)


def resolve_checkpoint(model: str | Path) -> Path:
    path = Path(model)
    if path.is_dir():
        path = path / "best.pt"
    if not path.exists():
        raise FileNotFoundError(f"{model}: no such run dir, checkpoint or ONNX file")
    return path


def load_predictor(model: str | Path, threads: int | None = None):
    """A run dir, a ``.pt`` checkpoint or a ``.onnx`` file."""
    path = resolve_checkpoint(model)
    if path.suffix == ".onnx":
        from serving.runtime import OnnxModel

        return OnnxModel(path, threads=threads or 2)
    return TorchPredictor(path, threads=threads)


def run_samples(state: dict, data: list[str] | None) -> tuple[list[Sample], list[Sample]]:
    """(validation, training) samples of a run: its recorded data roots and negatives, or ``data``."""
    roots = data or state.get("data_roots") or []
    if not roots:
        raise ValueError("the run does not record its data; pass --data ROOT")
    negatives = (state.get("config") or {}).get("data", {}).get("negatives", []) if not data else []
    samples = load_samples(roots)
    labels = set(state["labels"])
    val = [s for s in select_split(samples, "val") if s.label in labels]
    train = [s for s in select_split(samples, "train") if s.label in labels]
    if negatives:
        negative_label = state["config"]["data"]["negative_label"]
        neg = [replace(s, label=negative_label) for s in load_samples(negatives)]  # keeps pool and source
        val += select_split(neg, "val")
        train += select_split(neg, "train")
    return val, train


def _decode(sample: Sample, pre: Preprocessing, tiling: Tiling | None = None):
    """The decoded RGB picture (kept large enough for the tiles, if any), or the reason it cannot be used."""
    try:
        img, _ = decode_image(sample.path, draft_size=draft_size(pre, tiling))
        return img
    except ImageError as exc:
        return f"{exc.code}: {exc.message}"
    except OSError as exc:
        return f"unreadable: {exc}"


def predict_images(predictor, images: list, batch_size: int = 32, pool: ThreadPoolExecutor | None = None) -> np.ndarray:
    """Decoded RGB pictures -> class probabilities (N x C): the model's own preprocessing, then its forward pass.

    The one "pictures to probabilities" step that evaluation, the robustness report and calibration share,
    so that any change to how a picture is scored (e.g. tiled inference) reaches all of them at once.
    ``pool``: a thread pool to preprocess in (PIL resizing releases the GIL).
    """
    pre, tiling = predictor.preprocessing, getattr(predictor, "tiling", None)
    negative_index = getattr(predictor, "negative_index", None)

    def inputs(img):
        return views(img, pre, tiling)

    stacks = list(pool.map(inputs, images)) if pool is not None else [inputs(img) for img in images]
    if not stacks:
        return np.zeros((0, len(predictor.labels)), np.float32)
    return np.concatenate([predict_views(predictor, stacks[i : i + batch_size], negative_index)
                           for i in range(0, len(stacks), batch_size)])


def predict_samples(predictor, samples: list[Sample], batch_size: int = 32, workers: int = 2, desc: str = "evaluating"):
    """Returns (probabilities for the readable samples, readable samples, [(path, reason)] for the others)."""
    pre, tiling = predictor.preprocessing, getattr(predictor, "tiling", None)
    probs, kept, skipped, batch, batch_samples = [], [], [], [], []

    def flush():
        if batch:
            probs.append(predict_images(predictor, batch, batch_size, pool))
            kept.extend(batch_samples)
            batch.clear(), batch_samples.clear()

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for sample, img in tqdm(zip(samples, pool.map(lambda s: _decode(s, pre, tiling), samples)), total=len(samples),
                                desc=desc, unit="img", leave=False):
            if isinstance(img, str):
                log.warning("skipping %s (%s)", sample.path, img)
                skipped.append((str(sample.path), img))
                continue
            batch.append(img), batch_samples.append(sample)
            if len(batch) == batch_size:
                flush()
        flush()
    n_labels = len(predictor.labels)
    return (np.concatenate(probs) if probs else np.zeros((0, n_labels), np.float32)), kept, skipped


def evaluate(
    model: str | Path,
    data: list[str | Path],
    split: str | None = "val",
    out_dir: str | Path | None = None,
    predictions: str | Path | None = None,
    batch_size: int = 32,
    threads: int | None = None,
) -> dict:
    """Metrics (and, with ``out_dir``, metrics.json, predictions.csv and PNG plots) for ``model`` on ``data``."""
    predictor = load_predictor(model, threads=threads)
    samples = load_samples(data, default_split=split or "val")
    if split:
        chosen = select_split(samples, split)
        if not chosen:
            raise ValueError(f"no images in split {split!r} of {data}; splits present: {sorted({s.split for s in samples})}")
        samples = chosen
    labels = predictor.labels
    unknown = Counter(s.label for s in samples if s.label not in labels)
    if unknown:
        print(f"labels unknown to the model (left out of the metrics, still predicted): {dict(unknown)}")
    probs, kept, skipped = predict_samples(predictor, samples, batch_size)
    known = np.array([s.label in labels for s in kept], dtype=bool)
    if not known.any():
        raise ValueError(f"none of the images carries a label the model knows ({labels})")
    index = {label: i for i, label in enumerate(labels)}
    y_true = np.array([index[s.label] for s, k in zip(kept, known) if k])
    known_probs = probs[known]  # the images whose label the model knows; indexed once
    metrics = compute_metrics(y_true, known_probs, labels)
    thresholds, never_block, negative = _decision_settings(predictor)
    metrics["decisions"] = decision_report(known_probs, y_true, labels, thresholds, never_block, negative)
    known_samples = [s for s, k in zip(kept, known) if k]
    fp = false_positive_report(known_probs, y_true, labels, thresholds, negative)
    if fp:
        metrics["false_positives"] = fp
    metrics["model"] = str(model)
    metrics["data"] = [str(d) for d in data]
    metrics["split"] = split
    metrics["skipped"] = [{"path": p, "reason": r} for p, r in skipped]
    metrics["unknown_labels"] = dict(unknown)
    print(summary_table(metrics))
    print(format_decisions(metrics["decisions"]))
    if fp:
        for label, r in fp["per_class"].items():
            print(f"  false-positive rate on {fp['negatives']} negatives, {label}: {r['at_0.5']:.2%} at 0.5, "
                  f"{r['at_review']:.2%} at review ({r['review']:.3f}), "
                  + (f"{r['at_block']:.2%} at block ({r['block']:.3f})" if r["block"] is not None else "never blocks"))
    sources = source_report(known_probs, known_samples, labels, thresholds, never_block, negative)
    if sources:
        metrics["per_source"] = sources
        print(format_sources(sources))
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s)")
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        predictions = predictions or out_dir / "predictions.csv"
        from training.plots import plot_confusion_matrix, plot_pr_curves

        plot_confusion_matrix(np.array(metrics["confusion_matrix"]), labels, out_dir / "confusion_matrix.png")
        plot_pr_curves(y_true, known_probs, labels, out_dir / "pr_curves.png")
        if fp:
            from training.plots import plot_image_grid

            negatives = [i for i, s in enumerate(known_samples) if s.label == negative]
            product = [i for i, label in enumerate(labels) if label != negative]
            worst = sorted(negatives, key=lambda i: -known_probs[i, product].max())[:16]
            plot_image_grid([str(known_samples[i].path) for i in worst],
                            [", ".join(f"{labels[j]} {known_probs[i, j]:.2f}" for j in product) for i in worst],
                            out_dir / "false_positives.png", title=f"most confident false positives ({negative} images)")
        if sources:
            plot_source_false_positives(sources, out_dir / "false_positives_by_source")
        print(f"wrote {out_dir}/metrics.json, confusion_matrix.png, pr_curves.png"
              + (", false_positives_by_source/" if sources else ""))
    if predictions is not None:
        write_predictions(predictions, kept, probs, labels)
    return metrics


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


def plot_source_false_positives(sources: dict, folder: Path) -> None:
    """One PNG per source: its most confident negatives with score and decision."""
    import re

    from training.plots import plot_image_grid

    for origin, r in sources.items():
        name = re.sub(r"[^A-Za-z0-9._-]+", "_", origin).strip("_") or "data"
        plot_image_grid([t["path"] for t in r["top"]], [f"{t['label']} {t['score']:.3f} ({t['decision']})" for t in r["top"]],
                        folder / f"{name}.png", title=f"{origin}: most confident negatives "
                        f"(flag {r['flag_rate']:.1%}, block {r['block_rate']:.1%} of {r['n']})")


def _decision_settings(predictor):
    contract = getattr(predictor, "contract", None)
    if contract is not None:  # ONNX: the contract's thresholds
        return contract.thresholds, contract.never_block, contract.negative_label
    return predictor.thresholds, predictor.never_block, predictor.negative_label


def write_predictions(path: str | Path, samples: list[Sample], probs: np.ndarray, labels: list[str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "pred"] + [f"p_{label}" for label in labels])
        for sample, p in zip(samples, probs):
            writer.writerow([str(sample.path), sample.label, labels[int(p.argmax())]] + [f"{v:.6f}" for v in p])
