"""Classification metrics from probabilities (scikit-learn), shared by training, evaluation and export."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)


def compute_metrics(y_true: np.ndarray, probs: np.ndarray, labels: list[str]) -> dict:
    """Metrics for targets ``y_true`` (indices into ``labels``) and class probabilities ``probs`` (N x C).

    Classes absent from ``y_true`` get support 0 and null AUCs; a single-class split still evaluates.
    """
    y_true = np.asarray(y_true, dtype=int)
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / np.maximum(probs.sum(axis=1, keepdims=True), 1e-12)  # float32 softmax rounding
    n_classes = len(labels)
    if len(y_true) == 0:
        raise ValueError("no images to evaluate")
    pred = probs.argmax(axis=1)
    idx = list(range(n_classes))
    present = sorted(set(y_true.tolist()))
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, pred, labels=idx, zero_division=0
    )
    per_class = {}
    for i, label in enumerate(labels):
        positives = y_true == i
        both = 0 < positives.sum() < len(y_true)
        per_class[label] = {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
            "pr_auc": float(average_precision_score(positives, probs[:, i])) if both else None,
            "roc_auc": float(roc_auc_score(positives, probs[:, i])) if both else None,
        }
    eps = 1e-7
    return {
        "labels": list(labels),
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, pred)),
        # over the classes present in the data: a negatives-only set has balanced accuracy = its accuracy
        "balanced_accuracy": float(balanced_accuracy_score(y_true, pred)) if len(present) > 1
        else float(recall[present[0]]),
        "macro_f1": float(f1_score(y_true, pred, labels=present, average="macro", zero_division=0)),
        "nll": float(-np.mean(np.log(np.clip(probs[np.arange(len(y_true)), y_true], eps, 1.0)))),
        "per_class": per_class,
        "confusion_matrix": confusion_matrix(y_true, pred, labels=idx).tolist(),
    }


def summary_table(metrics: dict) -> str:
    """A short plain-text table for stdout."""
    lines = [
        f"n={metrics['n']}  accuracy={metrics['accuracy']:.4f}  balanced_accuracy={metrics['balanced_accuracy']:.4f}"
        f"  macro_f1={metrics['macro_f1']:.4f}",
        f"{'label':<20}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}{'pr_auc':>9}{'roc_auc':>9}",
    ]
    fmt = lambda v: f"{v:.4f}" if v is not None else "-"  # noqa: E731
    for label, m in metrics["per_class"].items():
        lines.append(
            f"{label:<20}{m['precision']:>10.4f}{m['recall']:>10.4f}{m['f1']:>10.4f}{m['support']:>9}"
            f"{fmt(m['pr_auc']):>9}{fmt(m['roc_auc']):>9}"
        )
    return "\n".join(lines)
