"""Operating points per class from validation scores (numpy only: serving re-solves them for a policy).

``block``: the lowest score at which precision >= ``block_precision`` (auto-removal must be almost surely
right). ``review``: the highest score at which recall >= ``review_recall`` (the review band must catch
nearly everything). When a target cannot be met the fallback is explicit and reported: an unreachable
block precision means the class never auto-blocks (everything above review goes to moderators); an
unreachable review recall (no positives in validation) keeps the documented default review threshold.

Traffic budgets come after the targets: ``max_flag_rate`` (share of ordinary, negative traffic sent to
review or block) and ``max_block_rate`` (share blocked), measured on the negatives' scores
(``TrafficScores``: per pool, each pool weighted as the platform's traffic mix). A budget only ever
raises a threshold; when it overrides a target the budget wins and the conflict is reported with the
recall that is left. Every threshold records the rule that set it (``RULES``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serving.decision import DEFAULT_BLOCK, DEFAULT_REVIEW, ClassThresholds
from serving.errors import InvalidInput

# what can set a threshold (shown per threshold by GET /v1/model)
RULES = {
    "review_recall": "recall target",
    "block_precision": "precision target",
    "max_flag_rate": "flag budget",
    "max_block_rate": "block budget",
    "explicit": "explicit value",
    "never_block": "never_block",
    "default": "documented default (nothing to fit on)",
    "model": "as stored in the model",
}


@dataclass
class Solved:
    thresholds: ClassThresholds
    notes: list[str] = field(default_factory=list)
    block_precision: float | None = None  # achieved on the fitting data
    review_recall: float | None = None
    rules: dict[str, str] = field(default_factory=lambda: {"block": "block_precision", "review": "review_recall"})
    block_recall: float | None = None


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
    rules = {"block": "never_block" if never_block else "block_precision", "review": "review_recall"}
    review, recall = review_threshold(scores, positive, review_recall)
    if review is None:
        review = DEFAULT_REVIEW
        rules["review"] = "default"
        notes.append(f"review recall {review_recall} unreachable: no positives in the data; review kept at the default {DEFAULT_REVIEW}")
    block, precision = (None, None) if never_block else block_threshold(scores, positive, block_precision)
    if never_block:
        notes.append("never_block: this class always goes to review")
    elif not (~np.asarray(positive, bool)).any():  # precision over positives alone is 1.0 at any threshold
        block, precision = DEFAULT_BLOCK, None
        rules["block"] = "default"
        notes.append(f"block precision {block_precision} unmeasurable: no images of other classes in the data; "
                     f"block kept at the default {DEFAULT_BLOCK} (calibrate on a split with negatives)")
    elif block is None:
        best = f" (best precision {precision:.3f})" if precision is not None else ""
        notes.append(f"block precision {block_precision} unreachable{best}: the class never auto-blocks; "
                     "everything above the review threshold goes to moderators")
    if block is not None and review > block:
        notes.append(f"review threshold {review:.4f} above block {block:.4f}: review lowered to the block threshold")
        review = block
        rules["review"] = "block_precision"
    return Solved(ClassThresholds(block=block, review=review), notes, precision, recall, rules)


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


def curve_arrays(curves: dict[str, list[float]]) -> tuple[np.ndarray, np.ndarray]:
    """(scores, positive) from a stored validation curve ``{"pos": [...], "neg": [...]}``."""
    pos, neg = curves.get("pos", []), curves.get("neg", [])
    return np.array(list(pos) + list(neg), float), np.array([True] * len(pos) + [False] * len(neg))


# ---------------------------------------------------------------------------------------------------------
# Traffic budgets


class PoolScores(BaseModel):
    """One pool of negatives: ``n`` images, of which ``rows`` hold every one whose highest protected score is
    >= ``floor`` (the rest are below any threshold worth setting), as the protected classes' scores."""

    model_config = ConfigDict(extra="forbid")

    n: int = Field(ge=1, description="images in the pool")
    floor: float = Field(0.0, ge=0.0, le=1.0, description="images scoring below this on every class are counted, not stored")
    rows: list[list[float]] = Field(default_factory=list, description="scores per stored image, in `classes` order")

    @model_validator(mode="after")
    def _not_more_rows_than_images(self) -> "PoolScores":
        if len(self.rows) > self.n:
            raise ValueError(f"{len(self.rows)} rows for a pool of n={self.n} images")
        return self

    @field_validator("rows")
    @classmethod
    def _scores_are_probabilities(cls, rows: list[list[float]]) -> list[list[float]]:
        # a score of 5.0 or nan moved a budget's threshold to 1.0: the server allowed every photo
        for i, row in enumerate(rows):
            if not all(0.0 <= v <= 1.0 for v in row):  # False for nan too
                raise ValueError(f"row {i} has a score outside [0, 1]: {row}; write it with `wildcheck calibrate --traffic`")
        return rows


class TrafficScores(BaseModel):
    """Negatives' scores by pool (validation negatives in the model; a platform's own traffic in a policy)."""

    model_config = ConfigDict(extra="forbid")

    classes: list[str] = Field(min_length=1, description="the protected classes, the column order of every row")
    pools: dict[str, PoolScores] = Field(min_length=1)

    @model_validator(mode="after")
    def _rows_match_classes(self) -> "TrafficScores":
        for name, pool in self.pools.items():
            if any(len(r) != len(self.classes) for r in pool.rows):
                raise ValueError(f"pool {name!r}: every row needs one score per class {self.classes}")
        return self

    @classmethod
    def from_arrays(cls, classes: list[str], scores: np.ndarray, pools: list[str], floor: float = 0.0,
                    decimals: int = 6) -> "TrafficScores":
        """``scores``: (images, classes) probabilities; ``pools``: each image's pool name. Six decimals, as the
        server rounds scores: a budget threshold just above a stored score is above the image's real score."""
        scores = np.round(np.asarray(scores, float).reshape(len(pools), len(classes)), decimals)
        out = {}
        for name in sorted(set(pools)):
            mine = scores[np.array([p == name for p in pools])]
            keep = mine[mine.max(axis=1) >= floor] if floor > 0 else mine
            keep = keep[np.argsort(-keep.max(axis=1), kind="stable")]
            out[name] = PoolScores(n=len(mine), floor=floor, rows=keep.tolist())
        return cls(classes=list(classes), pools=out)

    def weighted(self, weights: dict[str, float] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
        """(scores (rows x classes), each row's share of traffic, each row's pool index, notes).

        Without ``weights`` every image counts the same (pools in proportion to their size). With them, a
        pool's images share its weight (weights are normalised): the mix mimics a platform's traffic.
        """
        names = list(self.pools)
        notes = []
        if weights:
            unknown = sorted(set(weights) - set(names))
            if unknown:
                raise InvalidInput(f"negative_weights names pools that are not there: {unknown}; pools: {names}")
            shares = {p: float(weights.get(p, 0.0)) for p in names}
            left_out = [p for p in names if shares[p] == 0.0]
            if left_out:
                notes.append(f"pools weighted 0 (not in negative_weights): {left_out}")
        else:
            shares = {p: float(self.pools[p].n) for p in names}
        total = sum(shares.values())
        if total <= 0:
            raise InvalidInput("negative_weights give every pool weight 0")
        rows, w, idx = [], [], []
        for i, p in enumerate(names):
            pool = self.pools[p]
            rows += pool.rows
            w += [shares[p] / total / pool.n] * len(pool.rows)
            idx += [i] * len(pool.rows)
        k = len(self.classes)
        return (np.array(rows, float).reshape(len(rows), k), np.array(w, float), np.array(idx, int), notes)


def _next_up(x: float) -> float:
    """The smallest number on the 1e-6 grid above ``x``: a threshold that just leaves ``x`` out."""
    return round(math.floor(x * 1e6 + 1e-6) / 1e6 + 1e-6, 6)


def tail_threshold(scores: np.ndarray, weights: np.ndarray, share: float, floor: float = 0.0) -> float | None:
    """Lowest threshold t with weighted share(scores >= t) <= ``share``; None when only t > 1 would do."""
    order = np.argsort(-scores, kind="stable")
    s, cw = scores[order], np.cumsum(weights[order])
    last_of_run = np.r_[s[1:] != s[:-1], True] if len(s) else np.zeros(0, bool)
    values, shares = s[last_of_run], cw[last_of_run]  # share flagged at t = values[i]
    ok = shares <= share + 1e-12
    if not ok.any():  # even the top score alone is over budget: leave it out
        t = _next_up(float(values[0])) if len(values) else floor
        return None if t > 1.0 else t
    i = int(np.nonzero(ok)[0].max())
    if i == len(values) - 1:  # every stored score fits the budget
        return floor
    t = min(float(values[i]), _next_up(float(values[i + 1])))  # just above the highest score left out
    return max(t, floor)


def fit_budget(scores: np.ndarray, weights: np.ndarray, classes: list[str], base: dict[str, float | None],
               fixed: set[str], budget: float, unreachable: float | None, floor: float = 0.0
               ) -> tuple[dict[str, float | None], float]:
    """Raise the thresholds of ``base`` (not the ``fixed`` ones) until the weighted share of rows with any
    class at or above its threshold is <= ``budget``; returns (thresholds, that share).

    Classes whose threshold is None take no part. Every free class gets the same share q of traffic on its
    own (its tail), q as large as the union allows: with one class, q is the budget itself.
    """
    active = [c for c in base if base[c] is not None]
    cols = {c: scores[:, classes.index(c)] for c in active}

    def union(th: dict) -> float:
        hit = np.zeros(len(scores), bool)
        for c in active:
            if th[c] is not None:
                hit |= cols[c] >= th[c]
        return float(weights[hit].sum())

    if union(base) <= budget + 1e-12:
        return dict(base), union(base)
    free = [c for c in active if c not in fixed]

    def at(q: float) -> dict:
        th = dict(base)
        for c in free:
            if (weights[cols[c] >= base[c]]).sum() <= q + 1e-12:
                continue  # already within its share
            t = tail_threshold(cols[c], weights, q, floor)
            th[c] = unreachable if t is None else max(base[c], t)
        return th

    if union(at(budget)) <= budget + 1e-12:
        best = at(budget)
    else:
        lo, hi = 0.0, budget
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if union(at(mid)) <= budget + 1e-12 else (lo, mid)
        best = at(lo)
    return best, union(best)


@dataclass
class Budgets:
    max_flag_rate: float | None = None
    max_block_rate: float | None = None
    negative_weights: dict[str, float] | None = None

    @property
    def any(self) -> bool:
        return self.max_flag_rate is not None or self.max_block_rate is not None


def share_at(values: np.ndarray, t: float | None) -> float | None:
    """The share of ``values`` at or above threshold ``t`` (a recall, on positives' scores); None: no threshold."""
    return None if t is None or len(values) == 0 else float((values >= t).mean())


def _per_pool(hit: np.ndarray, w: np.ndarray, idx: np.ndarray, traffic: TrafficScores) -> dict[str, float]:
    """Share of each pool's images flagged (unweighted: a rate a person can check by counting)."""
    return {p: round(float(hit[idx == i].sum()) / traffic.pools[p].n, 6) for i, p in enumerate(traffic.pools)}


def apply_budgets(solved: dict[str, Solved], curves: dict[str, dict[str, list[float]]], traffic: TrafficScores | None,
                  budgets: Budgets, never_block: list[str] = (), fixed: dict[str, set[str]] | None = None) -> dict:
    """Raise ``solved``'s thresholds (in place) to meet the budgets on ``traffic``; returns the budget report:
    the flag/block rates reached (weighted, and per pool), and each conflict with a target and the recall
    left. Thresholds named in ``fixed`` (``{label: {"block", "review"}}``: explicit values) are not moved."""
    fixed = fixed or {}
    report: dict = {"max_flag_rate": budgets.max_flag_rate, "max_block_rate": budgets.max_block_rate,
                    "negative_weights": budgets.negative_weights, "conflicts": [], "notes": []}
    if traffic is None:
        if budgets.any:
            raise InvalidInput("traffic budgets need the negatives' validation scores, and none are stored; "
                             "recalibrate (wildcheck calibrate RUN) or measure your traffic (wildcheck calibrate MODEL --traffic ROOT)")
        return report
    missing = sorted(set(solved) - set(traffic.classes))
    if missing:
        raise InvalidInput(f"the negatives' scores lack classes {missing} (they hold {traffic.classes})")
    scores, w, idx, notes = traffic.weighted(budgets.negative_weights)
    report["notes"] += notes
    floor = max((p.floor for p in traffic.pools.values()), default=0.0)
    before = {label: s.thresholds.model_copy() for label, s in solved.items()}
    review = {label: s.thresholds.review for label, s in solved.items()}
    if budgets.max_flag_rate is not None:
        fixed_r = {label for label in solved if "review" in fixed.get(label, ())}
        review, _ = fit_budget(scores, w, traffic.classes, review, fixed_r, budgets.max_flag_rate, 1.0, floor)
    block, block_rule, after_flag = {}, {}, {}
    for label, s in solved.items():
        b = s.thresholds.block
        if b is not None and review[label] > b:  # the flag budget pushed review above block: no review band left
            if "block" in fixed.get(label, ()):
                review[label] = b
                report["notes"].append(f"{label}: the explicit block threshold {b} caps review; the flag budget may be exceeded")
            else:
                b, block_rule[label] = review[label], "max_flag_rate"
        after_flag[label] = b
        block[label] = None if label in never_block else b
    if budgets.max_block_rate is not None:
        fixed_b = {label for label in solved if "block" in fixed.get(label, ())}
        raised, _ = fit_budget(scores, w, traffic.classes, block, fixed_b, budgets.max_block_rate, None, floor)
        block_rule.update({label: "max_block_rate" for label in block if raised[label] != block[label]})
        block = raised
    for label, s in solved.items():
        new_block = after_flag[label] if label in never_block else block[label]
        old = before[label]
        if review[label] != old.review:
            _record(report, s, label, "review", old.review, review[label], "max_flag_rate", budgets.max_flag_rate, curves)
        if new_block != old.block:
            rule = block_rule[label]
            _record(report, s, label, "block", old.block, new_block, rule, getattr(budgets, rule), curves)
            if new_block is None:
                s.notes.append(f"max_block_rate {budgets.max_block_rate} unreachable (negatives score 1.0): the class never auto-blocks")
        s.thresholds = ClassThresholds(block=new_block, review=review[label])
        pos = np.asarray(curves.get(label, {}).get("pos", []), float)
        s.review_recall, s.block_recall = share_at(pos, s.thresholds.review), share_at(pos, s.thresholds.block)
        if s.thresholds.block is not None and label in curves:
            sc, positive = curve_arrays(curves[label])
            hit = sc >= s.thresholds.block
            s.block_precision = float(positive[hit].mean()) if hit.any() else s.block_precision
    _rates(report, solved, traffic, scores, w, idx, never_block)
    for key, rate in (("max_flag_rate", "flag_rate"), ("max_block_rate", "block_rate")):
        if report[key] is not None and report[rate] > report[key] + 1e-9:
            report["notes"].append(f"{key} {report[key]} not met ({report[rate]:.4%}): explicit thresholds, or negatives "
                                   "scoring 1.0, flag more than the budget allows")
    return report


def _record(report: dict, s: Solved, label: str, which: str, old: float | None, new: float | None, rule: str,
            budget: float | None, curves: dict) -> None:
    """A budget moved a threshold: note it; when it overrode a target that is a conflict, with the recall left."""
    was = s.rules[which]
    s.rules[which] = rule
    pos = np.asarray(curves.get(label, {}).get("pos", []), float)
    before, after = share_at(pos, old), share_at(pos, new)
    fmt = lambda v: "never" if v is None else f"{v:.4f}"  # noqa: E731
    rec = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    s.notes.append(f"{rule} {budget} raised {which} {fmt(old)} -> {fmt(new)}; validation recall at {which} "
                   f"{rec(before)} -> {rec(after)}")
    if was in ("review_recall", "block_precision"):
        report["conflicts"].append({"class": label, "threshold": which, "target": was, "budget": rule,
                                    "from": old, "to": new, "recall_before": before, "recall_left": after})


def _rates(report: dict, solved: dict[str, Solved], traffic: TrafficScores, scores: np.ndarray, w: np.ndarray,
           idx: np.ndarray, never_block: list[str]) -> None:
    flag = np.zeros(len(scores), bool)
    blocked = np.zeros(len(scores), bool)
    for label, s in solved.items():
        col = scores[:, traffic.classes.index(label)]
        flag |= col >= s.thresholds.review  # review <= block: everything blocked is flagged too
        if s.thresholds.block is not None and label not in never_block:
            blocked |= col >= s.thresholds.block
    report.update(flag_rate=round(float(w[flag].sum()), 6), block_rate=round(float(w[blocked].sum()), 6),
                  flag_rate_per_pool=_per_pool(flag, w, idx, traffic), block_rate_per_pool=_per_pool(blocked, w, idx, traffic),
                  negatives={p: pool.n for p, pool in traffic.pools.items()})
