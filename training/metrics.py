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

from serving.decision import ScoresNotFinite


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
    if not np.isfinite(probs).all():
        raise ScoresNotFinite(f"the model's scores are not finite (NaN or inf) on {int((~np.isfinite(probs).all(1)).sum())} "
                              f"of {len(probs)} images: its weights are broken. A training whose loss turned NaN "
                              "diverged: train again with a lower --set train.lr (see the run's history.csv)")
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


def decision_report(probs: np.ndarray, y_true: np.ndarray, labels: list[str], thresholds: dict, never_block,
                    negative_label: str) -> dict:
    """What the decision rule would do on these images: shares, block precision, block+review recall, workload."""
    from serving.decision import decide

    decisions = []
    for p in probs:
        decision, triggered = decide(dict(zip(labels, p.tolist())), thresholds, never_block)
        decisions.append((decision, triggered[0] if triggered else None))
    kinds = np.array([d for d, _ in decisions])
    n = len(kinds)
    per_class = {}
    for i, label in enumerate(labels):
        if label == negative_label:
            continue
        positives = np.asarray(y_true) == i
        blocked_as = np.array([d == "block" and t == label for d, t in decisions])
        flagged = np.isin(kinds, ["block", "review"])
        per_class[label] = {
            "support": int(positives.sum()),
            "blocked": int(blocked_as.sum()),
            "block_precision": float(positives[blocked_as].mean()) if blocked_as.any() else None,
            "block_recall": float(blocked_as[positives].mean()) if positives.any() else None,
            "flag_recall": float(flagged[positives].mean()) if positives.any() else None,
        }
    negatives = np.asarray(y_true) == labels.index(negative_label) if negative_label in labels else np.zeros(n, bool)
    return {
        "share": {k: float((kinds == k).mean()) for k in ("block", "review", "allow")},
        "review_per_1000": float((kinds == "review").mean() * 1000),
        "negatives_blocked": float((kinds[negatives] == "block").mean()) if negatives.any() else None,
        "negatives_flagged": float(np.isin(kinds[negatives], ["block", "review"]).mean()) if negatives.any() else None,
        "per_class": per_class,
    }


def format_decisions(report: dict) -> str:
    s = report["share"]
    fmt = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
    lines = [f"decisions: block {s['block']:.1%}  review {s['review']:.1%}  allow {s['allow']:.1%}  "
             f"(moderator workload {report['review_per_1000']:.0f} reviews per 1,000 images)"]
    for label, m in report["per_class"].items():
        lines.append(f"  {label}: block precision {fmt(m['block_precision'])}, block recall {fmt(m['block_recall'])}, "
                     f"block+review recall {fmt(m['flag_recall'])} (support {m['support']})")
    if report["negatives_flagged"] is not None:
        lines.append(f"  negatives: {report['negatives_blocked']:.1%} blocked, {report['negatives_flagged']:.1%} blocked or reviewed")
    return "\n".join(lines)


def false_positive_report(probs: np.ndarray, y_true: np.ndarray, labels: list[str], thresholds: dict,
                          negative_label: str) -> dict | None:
    """Per product class: share of negative images scored at or above 0.5, the review and the block threshold."""
    if negative_label not in labels:
        return None
    negatives = np.asarray(y_true) == labels.index(negative_label)
    if not negatives.any():
        return None
    per_class = {}
    for i, label in enumerate(labels):
        if label == negative_label or label not in thresholds:
            continue
        t = thresholds[label]
        scores = probs[negatives, i]
        per_class[label] = {
            "at_0.5": float((scores >= 0.5).mean()), "review": t.review, "at_review": float((scores >= t.review).mean()),
            "block": t.block, "at_block": float((scores >= t.block).mean()) if t.block is not None else 0.0,
        }
    return {"negatives": int(negatives.sum()), "per_class": per_class}
