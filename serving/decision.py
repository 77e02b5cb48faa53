"""The decision rule platforms act on, shared by evaluation and serving.

``block`` when any protected class's score reaches its block threshold; else ``review`` when any reaches
its review threshold; else ``allow``. The negative class (``other``) and classes marked ``never_block``
never block.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serving.errors import WildcheckError

DECISIONS = ("block", "review", "allow")
# Documented defaults until thresholds are fitted on validation data (the calibration issue):
# a product class is blocked at >= 0.90 and sent to review at >= 0.50.
DEFAULT_BLOCK = 0.90
DEFAULT_REVIEW = 0.50


class ClassThresholds(BaseModel):
    model_config = ConfigDict(extra="forbid")

    block: float | None = Field(DEFAULT_BLOCK, ge=0.0, le=1.0, description="None: never blocks")
    review: float = Field(DEFAULT_REVIEW, ge=0.0, le=1.0)

    @field_validator("block", "review", mode="before")
    @classmethod
    def _a_number(cls, value):
        """``true`` or ``"0.9"`` in a contract or policy is a mistake, not 1.0 or 0.9 (pydantic would coerce it)."""
        if isinstance(value, (bool, str)):
            raise ValueError(f"a threshold is a number from 0 to 1, not {value!r}")
        return value

    @model_validator(mode="after")
    def _review_not_above_block(self) -> "ClassThresholds":
        if self.block is not None and self.review > self.block:
            raise ValueError(f"review threshold {self.review} is above block threshold {self.block}")
        return self


def default_thresholds(labels: Sequence[str], negative_label: str = "other") -> dict[str, ClassThresholds]:
    """Thresholds for every protected class (all labels but the negative one)."""
    return {label: ClassThresholds() for label in labels if label != negative_label}


class ScoresNotFinite(WildcheckError, RuntimeError):
    """The model gave NaN or inf: a server answers 500 rather than an ``allow`` it cannot stand behind."""

    exit_code = 1


def decide(
    scores: Mapping[str, float],
    thresholds: Mapping[str, ClassThresholds],
    never_block: Sequence[str] = (),
) -> tuple[str, list[str]]:
    """Return the decision and the classes that triggered it (highest score first). A score that is not a
    finite number (a broken model) raises ``ScoresNotFinite``: NaN is below every threshold, so deciding on it
    would allow the photo."""
    blocking, reviewing = [], []
    for label, rule in thresholds.items():
        score = scores.get(label)
        if score is None:
            continue
        if not math.isfinite(score):
            raise ScoresNotFinite(f"the model scored {label} as {score}: its weights are broken (a diverged "
                                  "training?); no decision is given. Export a model from a healthy run")
        if rule.block is not None and label not in never_block and score >= rule.block:
            blocking.append(label)
        elif score >= rule.review:
            reviewing.append(label)
    if blocking:
        return "block", sorted(blocking, key=lambda k: -scores[k])
    if reviewing:
        return "review", sorted(reviewing, key=lambda k: -scores[k])
    return "allow", []
