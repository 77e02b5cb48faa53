"""Operating points per class from validation scores (numpy only: serving re-solves them for a policy).

``block``: the lowest score at which precision >= ``block_precision`` (auto-removal must be almost surely
right). ``review``: the highest score at which recall >= ``review_recall`` (the review band must catch
nearly everything). When a target cannot be met the fallback is explicit and reported: an unreachable
block precision means the class never auto-blocks (everything above review goes to moderators); an
unreachable review recall (no positives in validation) keeps the documented default review threshold.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from serving.decision import DEFAULT_REVIEW, ClassThresholds


@dataclass
class Solved:
    thresholds: ClassThresholds
    notes: list[str] = field(default_factory=list)
    block_precision: float | None = None  # achieved on the fitting data
    review_recall: float | None = None


def block_threshold(scores: np.ndarray, positive: np.ndarray, target: float) -> tuple[float | None, float | None]:
    """Lowest threshold t (a score value) with precision(score >= t) >= target; (None, best precision) if none."""
    scores, positive = np.asarray(scores, float), np.asarray(positive, bool)
    if positive.sum() == 0:
        return None, None
    order = np.argsort(-scores, kind="stable")
    s, p = scores[order], positive[order]
    tp = np.cumsum(p)
    predicted = np.arange(1, len(s) + 1)
    # thresholds are distinct score values: evaluate at the last index of each run of equal scores
    last_of_run = np.r_[s[1:] != s[:-1], True]
    precision = tp[last_of_run] / predicted[last_of_run]
    candidates = s[last_of_run]
    ok = precision >= target - 1e-12
    if not ok.any():
        return None, float(precision.max())
    i = np.nonzero(ok)[0].max()  # lowest score (scores are descending)
    return float(candidates[i]), float(precision[i])


def review_threshold(scores: np.ndarray, positive: np.ndarray, target: float) -> tuple[float | None, float | None]:
    """Highest threshold t with recall(score >= t) >= target; (None, None) without positives."""
    pos_scores = np.sort(np.asarray(scores, float)[np.asarray(positive, bool)])[::-1]
    if len(pos_scores) == 0:
        return None, None
    k = max(1, math.ceil(target * len(pos_scores) - 1e-9))
    t = float(pos_scores[k - 1])
    return t, float((pos_scores >= t).mean())


def solve_class(scores: np.ndarray, positive: np.ndarray, block_precision: float, review_recall: float,
                never_block: bool = False) -> Solved:
    notes = []
    review, recall = review_threshold(scores, positive, review_recall)
    if review is None:
        review = DEFAULT_REVIEW
        notes.append(f"review recall {review_recall} unreachable: no positives in the data; review kept at the default {DEFAULT_REVIEW}")
    block, precision = (None, None) if never_block else block_threshold(scores, positive, block_precision)
    if never_block:
        notes.append("never_block: this class always goes to review")
    elif block is None:
        best = f" (best precision {precision:.3f})" if precision is not None else ""
        notes.append(f"block precision {block_precision} unreachable{best}: the class never auto-blocks; "
                     "everything above the review threshold goes to moderators")
    if block is not None and review > block:
        notes.append(f"review threshold {review:.4f} above block {block:.4f}: review lowered to the block threshold")
        review = block
    return Solved(ClassThresholds(block=block, review=review), notes, precision, recall)


def solve_all(probs: np.ndarray, y_true: np.ndarray, labels: list[str], negative_label: str,
              block_precision: float, review_recall: float, never_block: list[str] = ()) -> dict[str, Solved]:
    """One Solved per protected class (every label but the negative one)."""
    out = {}
    for i, label in enumerate(labels):
        if label == negative_label:
            continue
        out[label] = solve_class(probs[:, i], np.asarray(y_true) == i, block_precision, review_recall,
                                 never_block=label in never_block)
    return out
