"""Serve-time policy: a platform overrides the model's thresholds without retraining or re-exporting.

```yaml
classes:
  ivory: {block: 0.97, review: 0.40}                        # explicit thresholds
  pangolin_scales: {block_precision: 0.99, review_recall: 0.9}  # targets, re-solved on the stored val curves
  tiger_skin: {block: null}                                  # never auto-block
never_block: [rhino_horn]
gallery:                                                     # labels of the served gallery (--gallery)
  pangolin_scales: {similar: 0.75, duplicate: 0.93, duplicate_hamming: 8, block: false}
max_flag_rate: 0.01        # traffic budgets (null: off; absent: the model's own), re-solved on the negatives'
max_block_rate: 0.001      # scores stored in the model, or on `traffic` when present
negative_weights: {listings-everyday: 3, generic-products: 1}   # traffic mix over those pools
traffic: {classes: [ivory, ...], pools: {...}}   # a platform's own traffic, written by `wildcheck calibrate --traffic`
```
Explicit thresholds are never moved by a budget. ``/v1/model`` shows, per threshold, the rule that set it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serving.contract import DecisionRules, ModelContract
from serving.decision import ClassThresholds
from serving.errors import WildcheckError
from serving.yamlio import load_yaml
from serving.thresholds import Budgets, Solved, TrafficScores, apply_budgets, curve_arrays, solve_class


class ClassPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    block: float | None = Field(None, ge=0.0, le=1.0, description="threshold; null = never block; absent = from targets/model")
    review: float | None = Field(None, ge=0.0, le=1.0)
    block_precision: float | None = Field(None, gt=0.0, le=1.0)
    review_recall: float | None = Field(None, gt=0.0, le=1.0)

    @field_validator("block", "review", mode="before")
    @classmethod
    def _a_score_not_a_switch(cls, value):
        # YAML's true/false would read as 1.0 / 0.0: `block: false` blocked every listing, `review: true`
        # flagged none
        if isinstance(value, bool):
            raise ValueError("is a score threshold between 0 and 1, not true/false (null: never block)")
        return value

    @property
    def block_given(self) -> bool:
        """``block`` written in the policy (null included); absent: from targets or the model."""
        return "block" in self.model_fields_set

    @property
    def has_targets(self) -> bool:
        return self.block_precision is not None or self.review_recall is not None


class GalleryLabelPolicy(BaseModel):
    """Overrides of a gallery label's thresholds; absent keys keep the gallery's."""

    model_config = ConfigDict(extra="forbid")

    similar: float | None = Field(None, ge=-1.0, le=1.0, description="cosine similarity -> review")
    duplicate: float | None = Field(None, ge=-1.0, le=1.0, description="cosine similarity -> duplicate")
    duplicate_hamming: int | None = Field(None, ge=-1, le=64, description="pHash bits -> duplicate; -1: never")
    block: bool | None = Field(None, description="false: a duplicate goes to review instead of block")


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    classes: dict[str, ClassPolicy] = {}
    never_block: list[str] = []
    gallery: dict[str, GalleryLabelPolicy] = {}
    max_flag_rate: float | None = Field(None, ge=0.0, le=1.0, description="share of negative traffic sent to review or block")
    max_block_rate: float | None = Field(None, ge=0.0, le=1.0, description="share of negative traffic blocked")
    negative_weights: dict[str, float] | None = Field(None, description="weight per negatives pool (the traffic mix)")
    traffic: TrafficScores | None = Field(None, description="a platform's own negatives' scores (calibrate --traffic)")

    @model_validator(mode="after")
    def _weights_not_negative(self) -> "Policy":
        if self.negative_weights and any(w < 0 for w in self.negative_weights.values()):
            raise ValueError("negative_weights must be >= 0")
        return self


class PolicyError(WildcheckError, ValueError):
    pass


@dataclass
class Resolved:
    thresholds: dict[str, ClassThresholds]
    never_block: list[str]
    notes: dict[str, list[str]]
    rules: dict[str, dict[str, str]]  # per class, the rule that set each threshold
    budgets: dict = field(default_factory=dict)  # rates reached on the negatives and conflicts (thresholds.apply_budgets)


def load_policy(path: str | Path) -> Policy:
    path = Path(path)
    if not path.is_file():
        raise PolicyError(f"policy file {path} not found")
    try:
        return Policy.model_validate(load_yaml(path.read_text()) or {})
    except (yaml.YAMLError, ValidationError) as exc:
        raise PolicyError(f"invalid policy {path}: {exc}") from exc


def resolve_policy(policy: Policy, contract: ModelContract) -> tuple[dict[str, ClassThresholds], list[str], dict]:
    """Thresholds and never_block in force, plus notes per class explaining where each number came from."""
    r = resolve(policy, contract)
    return r.thresholds, r.never_block, r.notes


def resolve(policy: Policy, contract: ModelContract) -> Resolved:
    """The policy on top of the model: per-class targets and explicit values, then the traffic budgets."""
    protected = set(contract.thresholds)
    unknown = (set(policy.classes) | set(policy.never_block)) - protected
    if unknown:
        raise PolicyError(f"policy names classes the model cannot block: {sorted(unknown)}; protected classes: {sorted(protected)}")
    model = contract.decision or DecisionRules()
    given = policy.model_fields_set
    budgets = Budgets(
        policy.max_flag_rate if "max_flag_rate" in given else model.max_flag_rate,
        policy.max_block_rate if "max_block_rate" in given else model.max_block_rate,
        policy.negative_weights if "negative_weights" in given else (None if policy.traffic else model.negative_weights),
    )
    never_block = sorted(set(contract.never_block) | set(policy.never_block))
    notes: dict[str, list[str]] = {}
    solved: dict[str, Solved] = {}
    fixed: dict[str, set[str]] = {}
    for label in contract.thresholds:
        rule = policy.classes.get(label) or ClassPolicy()
        curves = contract.val_curves.get(label)
        stored_rules = contract.threshold_rules.get(label, {})
        set_by_budget = bool({"max_flag_rate", "max_block_rate"} & set(stored_rules.values()))
        if rule.has_targets or (curves and (budgets.any or set_by_budget)):
            if not curves:
                raise PolicyError(f"{label}: the model stores no validation curves; give explicit block/review thresholds")
            s = solve_class(*curve_arrays(curves), rule.block_precision or model.block_precision,
                            rule.review_recall or model.review_recall)
            if contract.thresholds[label].block is None and rule.block_precision is None:  # the model never blocks it
                s.thresholds = ClassThresholds(block=None, review=s.thresholds.review)
                s.rules["block"] = stored_rules.get("block", "model")
            notes[label] = [f"re-solved on {sum(map(len, curves.values()))} validation scores"] + s.notes
        else:
            s = Solved(contract.thresholds[label], rules={"block": stored_rules.get("block", "model"),
                                                          "review": stored_rules.get("review", "model")})
        block, review = s.thresholds.block, s.thresholds.review
        if rule.block_given:
            block, s.rules["block"] = rule.block, "explicit"
            fixed.setdefault(label, set()).add("block")
        if rule.review is not None:
            review, s.rules["review"] = rule.review, "explicit"
            fixed.setdefault(label, set()).add("review")
        if block is not None and "review" not in fixed.get(label, ()) and review > block:
            review, s.rules["review"] = block, s.rules["block"]
        try:
            s.thresholds = ClassThresholds(block=block, review=review)
        except ValidationError as exc:
            raise PolicyError(f"{label}: {exc.errors()[0]['msg']}") from exc
        solved[label] = s
    traffic = policy.traffic or contract.negative_scores
    try:
        report = apply_budgets(solved, contract.val_curves, traffic, budgets, never_block, fixed)
    except ValueError as exc:
        raise PolicyError(str(exc)) from exc
    for label, s in solved.items():
        budget_notes = [n for n in s.notes if n.startswith(("max_flag_rate", "max_block_rate"))]
        if budget_notes:
            notes.setdefault(label, []).extend(n for n in budget_notes if n not in notes.get(label, []))
    return Resolved({k: s.thresholds for k, s in solved.items()}, never_block, notes,
                    {k: dict(s.rules) for k, s in solved.items()}, report)
