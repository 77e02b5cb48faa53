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
model: {name: ..., version: ..., fingerprint: ...}   # the model `traffic` was scored with (required with `traffic`)
max_recall_drop: 0.10      # how far below the model's own the policy may take a class's validation recall at review
```
Explicit thresholds are never moved by a budget. ``/v1/model`` shows, per threshold, the rule that set it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serving.contract import DecisionRules, ModelContract, calibration_hash
from serving.decision import ClassThresholds
from serving.errors import InvalidInput, WildcheckError
from serving.yamlio import load_yaml
from serving.thresholds import Budgets, Solved, TrafficScores, apply_budgets, curve_arrays, share_at, solve_class


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


DEFAULT_MAX_RECALL_DROP = 0.10
# a budget of 0 alone: no ordinary photo may be flagged, which fewer photos than this cannot show
ZERO_BUDGET_SAMPLE = 100


class PolicyModel(BaseModel):
    """The model a policy's ``traffic`` was scored with: scores of another model would move its thresholds blind."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str
    version: str
    fingerprint: str | None = Field(None, description="serving.contract.calibration_hash of the model's contract")

    @classmethod
    def of(cls, contract: ModelContract) -> "PolicyModel":
        return cls(name=contract.model_name, version=contract.model_version, fingerprint=calibration_hash(contract))

    def mismatch(self, contract: ModelContract) -> str | None:
        """What differs from ``contract`` (None: the same model)."""
        if (self.name, self.version) != (contract.model_name, contract.model_version):
            return f"it was written for {self.name} {self.version}, the served model is {contract.model_name} {contract.model_version}"
        if self.fingerprint is not None and self.fingerprint != calibration_hash(contract):
            return f"it was written for another calibration of {self.name} {self.version} (fingerprint differs)"
        return None


def _a_number_not_a_switch(value, what: str):
    # YAML's true/false would read as 1.0 / 0.0, and nan/inf compare False with every bound
    if isinstance(value, bool):
        raise ValueError(f"{what} is a number, not true/false (null: off)")
    if isinstance(value, (int, float)) and not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, not {value}")
    return value


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    classes: dict[str, ClassPolicy] = {}
    never_block: list[str] = []
    gallery: dict[str, GalleryLabelPolicy] = {}
    max_flag_rate: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False,
                                        description="share of negative traffic sent to review or block")
    max_block_rate: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False, description="share of negative traffic blocked")
    negative_weights: dict[str, float] | None = Field(None, description="weight per negatives pool (the traffic mix)")
    traffic: TrafficScores | None = Field(None, description="a platform's own negatives' scores (calibrate --traffic)")
    model: PolicyModel | None = Field(None, description="the model `traffic` was scored with")
    max_recall_drop: float = Field(DEFAULT_MAX_RECALL_DROP, ge=0.0, le=1.0, allow_inf_nan=False,
                                   description="largest drop of validation recall at review allowed below the model's")

    @field_validator("max_flag_rate", "max_block_rate", "max_recall_drop", mode="before")
    @classmethod
    def _rate_is_a_number(cls, value, info):
        return _a_number_not_a_switch(value, info.field_name)

    @field_validator("negative_weights", mode="before")
    @classmethod
    def _weights_are_numbers(cls, value):
        if isinstance(value, dict):
            for pool, w in value.items():
                _a_number_not_a_switch(w, f"negative_weights[{pool!r}]")
        return value

    @model_validator(mode="after")
    def _weights_not_negative(self) -> "Policy":
        if self.negative_weights and not all(math.isfinite(w) and w >= 0 for w in self.negative_weights.values()):
            raise ValueError(f"negative_weights must be finite numbers >= 0: {self.negative_weights}")
        return self

    @model_validator(mode="after")
    def _traffic_names_its_model(self) -> "Policy":
        if self.traffic is not None and self.model is None:
            raise ValueError("a policy with `traffic` scores needs `model: {name, version}`, the model that scored "
                             "them; re-run `wildcheck calibrate MODEL --traffic ROOT` to write it")
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
    if path.is_dir():
        raise PolicyError(f"policy {path} is a folder; give the policy YAML file, e.g. {path / 'policy.yaml'}")
    if not path.is_file():
        raise PolicyError(f"policy file {path} not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise PolicyError(f"policy {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8 YAML") from exc
    except OSError as exc:
        raise PolicyError(f"policy {path} cannot be read: {exc}") from exc
    try:
        values = load_yaml(text)
        if values is None:  # a 0-byte copy or a template that rendered nothing served the model's thresholds as a policy
            raise PolicyError(f"policy {path} is empty (no settings, only comments or blank lines); write its settings, "
                              "or serve without --policy / WILDCHECK_POLICY for the model's own thresholds")
        return Policy.model_validate(values)
    except (yaml.YAMLError, ValidationError) as exc:
        raise PolicyError(f"invalid policy {path}: {exc}") from exc


def check_sample_measures(negatives: int, budgets: dict[str, float | None]) -> None:
    """A budget below one photo's share cannot be measured: on 5 photos a 0.1% block budget binds nothing, so
    the threshold fell to what the precision target allows and the policy blocked more than the model did, while
    reporting the budget met. At least 1/budget ordinary photos are needed; a budget of 0 needs what the tightest
    other budget needs, or ``ZERO_BUDGET_SAMPLE`` photos alone."""
    given = {k: r for k, r in budgets.items() if r is not None}
    positive = [r for r in given.values() if r > 0]
    for option, rate in given.items():
        needed = math.ceil(1 / (rate or min(positive, default=1 / ZERO_BUDGET_SAMPLE)) - 1e-9)
        if negatives < needed:
            share = f"{1 / negatives:.1%} of them" if negatives else "all there is"
            raise InvalidInput(
                f"{negatives} ordinary photo(s) cannot measure {option} {rate:g}: one photo is already {share}; "
                f"give at least {needed:,} (or a larger {option})")


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
    _check_model(policy, contract)
    model = contract.decision or DecisionRules()
    given = policy.model_fields_set
    budgets = Budgets(
        policy.max_flag_rate if "max_flag_rate" in given else model.max_flag_rate,
        policy.max_block_rate if "max_block_rate" in given else model.max_block_rate,
        policy.negative_weights if "negative_weights" in given else (None if policy.traffic else model.negative_weights),
    )
    if policy.traffic is not None:
        try:
            check_sample_measures(_measured(policy.traffic, budgets.negative_weights),
                                  {"max_flag_rate": budgets.max_flag_rate, "max_block_rate": budgets.max_block_rate})
        except InvalidInput as exc:
            raise PolicyError(f"the policy's traffic: {exc}; measure more with `wildcheck calibrate MODEL --traffic ROOT`") from exc
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
    _check_recall_kept(solved, contract, policy)
    return Resolved({k: s.thresholds for k, s in solved.items()}, never_block, notes,
                    {k: dict(s.rules) for k, s in solved.items()}, report)


def _check_model(policy: Policy, contract: ModelContract) -> None:
    """Traffic scores (and the thresholds solved on them) belong to the model that scored them."""
    why = policy.model.mismatch(contract) if policy.model is not None else None
    if why:
        raise PolicyError(f"this policy does not fit the served model: {why}. Re-run `wildcheck calibrate MODEL "
                          "--traffic ROOT` for this model (or remove the `model:` and `traffic:` keys of a hand-written policy)")


def _measured(traffic: TrafficScores, weights: dict[str, float] | None) -> int:
    """Ordinary photos the budgets are measured on: those of the pools that carry weight."""
    return sum(p.n for name, p in traffic.pools.items() if not weights or weights.get(name, 0) > 0)


def _check_recall_kept(solved: dict[str, Solved], contract: ModelContract, policy: Policy) -> None:
    """A policy that flags far fewer protected photos than the model fails open: a 1% flag budget on traffic full of
    ivory took validation recall at review 0.951 -> 0.007 and allowed every ivory photo. A class's own
    ``review_recall`` target is a recall the platform chose: the bound counts from it when it is lower."""
    bound = policy.max_recall_drop
    for label, s in solved.items():
        pos = np.asarray(contract.val_curves.get(label, {}).get("pos", []), float)
        if len(pos) == 0:
            continue
        before = share_at(pos, contract.thresholds[label].review)
        target = (policy.classes.get(label) or ClassPolicy()).review_recall
        before = min(before, target) if target is not None else before
        after = share_at(pos, s.thresholds.review)
        if before - after > bound + 1e-9:
            raise PolicyError(
                f"{label}: this policy keeps validation recall at review {after:.3f}, down from {before:.3f} at the "
                f"model's own thresholds (or the policy's review_recall) (review {contract.thresholds[label].review:g} -> {s.thresholds.review:g}); "
                f"more than max_recall_drop {bound:g} below, so that many more {label} photos would be allowed. Loosen the "
                "budgets or explicit thresholds, check that the traffic holds no protected items, or, if this is "
                f"intended, set `max_recall_drop: {math.ceil((before - after) * 100 - 1e-6) / 100:g}` in the policy")
