"""Serve-time policy: a platform overrides the model's thresholds without retraining or re-exporting.

```yaml
classes:
  ivory: {block: 0.97, review: 0.40}                        # explicit thresholds
  pangolin_scales: {block_precision: 0.99, review_recall: 0.9}  # targets, re-solved on the stored val curves
  tiger_skin: {block: null}                                  # never auto-block
never_block: [rhino_horn]
gallery:                                                     # labels of the served gallery (--gallery)
  pangolin_scales: {similar: 0.75, duplicate: 0.93, duplicate_hamming: 8, block: false}
```
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serving.contract import ModelContract
from serving.decision import ClassThresholds
from serving.thresholds import solve_class

_UNSET = object()


class ClassPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    block: float | None = Field(default=-1.0, description="threshold; null = never block; absent = from targets/model")
    review: float | None = None
    block_precision: float | None = Field(None, gt=0.0, le=1.0)
    review_recall: float | None = Field(None, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _ranges(self) -> "ClassPolicy":
        for name in ("block", "review"):
            v = getattr(self, name)
            if v is not None and v != -1.0 and not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1 (or null)")
        return self


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


class PolicyError(ValueError):
    pass


def load_policy(path: str | Path) -> Policy:
    path = Path(path)
    if not path.is_file():
        raise PolicyError(f"policy file {path} not found")
    try:
        return Policy.model_validate(yaml.safe_load(path.read_text()) or {})
    except (yaml.YAMLError, ValidationError) as exc:
        raise PolicyError(f"invalid policy {path}: {exc}") from exc


def resolve_policy(policy: Policy, contract: ModelContract) -> tuple[dict[str, ClassThresholds], list[str], dict]:
    """Thresholds and never_block in force, plus notes per class explaining where each number came from."""
    protected = set(contract.thresholds)
    unknown = (set(policy.classes) | set(policy.never_block)) - protected
    if unknown:
        raise PolicyError(f"policy names classes the model cannot block: {sorted(unknown)}; protected classes: {sorted(protected)}")
    thresholds = dict(contract.thresholds)
    never_block = sorted(set(contract.never_block) | set(policy.never_block))
    notes: dict[str, list[str]] = {}
    for label, rule in policy.classes.items():
        current = thresholds[label]
        block, review = current.block, current.review
        if rule.block_precision is not None or rule.review_recall is not None:
            curves = contract.val_curves.get(label)
            if not curves:
                raise PolicyError(f"{label}: the model stores no validation curves; give explicit block/review thresholds")
            scores = np.array(curves["pos"] + curves["neg"])
            positive = np.array([True] * len(curves["pos"]) + [False] * len(curves["neg"]))
            solved = solve_class(scores, positive, rule.block_precision or 0.98, rule.review_recall or 0.95)
            if rule.block_precision is not None:
                block = solved.thresholds.block
            if rule.review_recall is not None:
                review = solved.thresholds.review
            notes[label] = [f"re-solved on {len(scores)} validation scores"] + solved.notes
        if rule.block != -1.0:
            block = rule.block
        if rule.review is not None:
            review = rule.review
        try:
            thresholds[label] = ClassThresholds(block=block, review=review)
        except ValidationError as exc:
            raise PolicyError(f"{label}: {exc.errors()[0]['msg']}") from exc
    return thresholds, never_block, notes
