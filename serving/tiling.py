"""Tiled inference: score the whole picture and more views of it, keep the most suspicious view per class.

A product that fills one tile of a seller's collage, or a corner of a shelf photo, is a small part of the
whole picture, and the centre crop at model resolution may miss it or shrink it past recognition. Each
view is preprocessed like a whole picture (``Preprocessing``), so the model sees it at the scale it was
trained on. Two modes: ``grid`` scores a fixed grid of tiles of every picture; ``panels`` scores the
panels of a collage, only when ``serving.panels`` finds one (ordinary photos are scored whole, as without
tiling). Declared in the model contract, so evaluation, calibration, the robustness report and the
server all score the same views.

A collage of k photos is k chances for a false positive, and the composite itself is no photo the model
was trained on. ``whole_with_panels: false`` scores a found collage by its panels only, and
``collage_rate: m`` holds each of its k panels to the thresholds at which the calibration negatives' flag
(and block) rate is min(m, k)/k of the whole-photo one (``ViewRule``; m = 1 is Bonferroni's correction),
so a collage of ordinary photos is flagged at most about m times as often as one ordinary photo.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_serializer

from serving.panels import Box, find_panels
from serving.preprocess import Preprocessing
from serving.thresholds import tail_threshold

_PANEL_FIELDS = ("mode", "min_panel_fraction", "max_panels")
_PANEL_RULE_DEFAULTS = {"whole_with_panels": True, "collage_rate": None}  # what 1.1.0 contracts did


class Tiling(BaseModel):
    """Score the whole picture plus a ``grid`` x ``grid`` grid of tiles (``mode: grid``), or plus the panels
    of a collage when the picture is one (``mode: panels``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["grid", "panels"] = Field(
        "grid", description="grid: a fixed grid of tiles of every picture; panels: a collage's panels, when found")
    grid: int = Field(2, ge=2, le=4, description="tiles per side (grid mode)")
    min_tile_side: int = Field(
        64, ge=16, description="no tile or panel whose shorter side would be below this (thumbnails: whole picture only)"
    )
    min_panel_fraction: float = Field(
        0.2, gt=0.0, le=0.5, description="panels mode: a panel is at least this share of the picture's width and height")
    max_panels: int = Field(9, ge=2, le=16, description="panels mode: more panels than this is scored whole (bounded work)")
    whole_with_panels: bool = Field(
        True, description="panels mode: also score the whole composite when a collage is found (false: its panels only)")
    collage_rate: float | None = Field(
        None, ge=1.0, description="panels mode: a collage of k panels may be flagged (blocked) about this many times as "
        "often as one ordinary photo: each panel is held to the thresholds at which the calibration negatives' flag and "
        "block rates are min(this, k)/k of the whole-photo ones (1: Bonferroni; null: the whole-photo thresholds)")

    @model_serializer(mode="wrap")
    def _as_before(self, handler):
        """A grid tiling serialises exactly as before panels existed, and a panels tiling with the 1.1.0 rule
        as 1.1.0 wrote it: older readers accept them and those models' contract hashes do not change."""
        data = handler(self)
        if self.mode == "grid":
            for key in (*_PANEL_FIELDS, *_PANEL_RULE_DEFAULTS):
                data.pop(key, None)
        else:
            for key, default in _PANEL_RULE_DEFAULTS.items():
                if data.get(key) == default:
                    data.pop(key)
        return data

    @property
    def max_views(self) -> int:
        """The most views one picture makes (forward passes): the whole picture, then its panels or tiles."""
        return 1 + (self.max_panels if self.mode == "panels" else self.grid ** 2)

    def boxes(self, img: Image.Image) -> list[Box]:
        """The views besides the whole picture (left, top, right, bottom): the grid's tiles, or the panels."""
        if self.mode == "panels":
            return find_panels(img, min_side=self.min_tile_side, min_fraction=self.min_panel_fraction,
                               max_panels=self.max_panels)
        return self.tiles(img.size)

    def tiles(self, size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
        """Tile boxes (left, top, right, bottom) for a picture of ``size`` (w, h); empty when it is too small."""
        w, h = size
        if min(w, h) // self.grid < self.min_tile_side:
            return []
        xs = [round(i * w / self.grid) for i in range(self.grid + 1)]
        ys = [round(i * h / self.grid) for i in range(self.grid + 1)]
        return [(xs[c], ys[r], xs[c + 1], ys[r + 1]) for r in range(self.grid) for c in range(self.grid)]

    def decode_size(self, pre: Preprocessing) -> int | None:
        """The JPEG draft size that keeps each tile (each panel of a 2x2 collage) at least at the model's resize size."""
        return pre.resize_size * (2 if self.mode == "panels" else self.grid) if pre.jpeg_draft else None


def draft_size(pre: Preprocessing, tiling: Tiling | None) -> int | None:
    """How large ``decode_image`` must keep a JPEG for these views."""
    return tiling.decode_size(pre) if tiling is not None else pre.draft_size


def view_boxes(img: Image.Image, tiling: Tiling | None) -> list[Box]:
    """The boxes of the views of one picture, in order: the whole picture first, then tiles or panels."""
    return [(0, 0, *img.size)] + (tiling.boxes(img) if tiling is not None else [])


def views(img: Image.Image, pre: Preprocessing, tiling: Tiling | None, boxes: list[Box] | None = None) -> np.ndarray:
    """Model inputs for one RGB picture: (number of views, 3, S, S); the whole picture first. ``boxes``: the
    picture's ``view_boxes`` when the caller already has them."""
    boxes = view_boxes(img, tiling) if boxes is None else boxes
    return np.stack([pre(img)] + [pre(img.crop(box)) for box in boxes[1:]])


@dataclass(frozen=True)
class ViewRule:
    """How the scores of a picture's views become the picture's scores (``ViewRule.of(spec)``).

    ``panel_knots[k]``: for a collage of k panels, per class index, the piecewise-linear map of a panel's
    score (xs) onto the whole-photo scale (ys) that sends the k-panel review and block thresholds onto the
    model's own, so the one decision rule (``serving.decision.decide``) applies unchanged."""

    negative_index: int | None
    panels_only: bool = False  # a found collage is scored by its panels, not its whole composite
    panel_knots: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = field(default_factory=dict)

    @classmethod
    def of(cls, spec: Any) -> "ViewRule":
        """From a ``ModelSpec``-like object (labels, negative_index, tiling, thresholds, negative_scores). The
        correction needs the calibration negatives' scores: without them (before calibration) panels keep
        the whole-photo thresholds, which flags more, never less."""
        tiling = spec.tiling
        if tiling is None or tiling.mode != "panels":
            return cls(spec.negative_index)
        knots = {}
        if tiling.collage_rate is not None and spec.negative_scores is not None:
            knots = panel_knots(spec.labels, spec.thresholds, spec.negative_scores, tiling.max_panels, tiling.collage_rate)
        return cls(spec.negative_index, panels_only=not tiling.whole_with_panels, panel_knots=knots)


def panel_knots(labels: list[str], thresholds: dict, negatives, max_panels: int, collage_rate: float = 1.0
                ) -> dict[int, dict[int, tuple[np.ndarray, np.ndarray]]]:
    """Per number of panels k (2..max_panels) and protected class: the knots that map the thresholds whose
    weighted share of calibration negatives at or above them is min(collage_rate, k)/k of the model's
    (review, block) shares onto the model's thresholds."""
    scores, weights, _, _ = negatives.weighted()
    floor = max((p.floor for p in negatives.pools.values()), default=0.0)
    columns = {}  # class index -> (its negatives' scores, [(threshold, share of negatives at or above it)])
    for label, t in thresholds.items():
        if label in negatives.classes and label in labels:
            col = scores[:, negatives.classes.index(label)]
            columns[labels.index(label)] = (col, [(b, float(weights[col >= b].sum())) for b in (t.review, t.block)
                                                  if b is not None])
    out: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    for k in range(2, max_panels + 1):
        per_class = {}
        for c, (col, bases) in columns.items():
            xs, ys = [0.0], [0.0]
            for base, share in bases:
                stricter = tail_threshold(col, weights, share * min(collage_rate, k) / k, floor) if share > 0 else base
                x = 1.0 if stricter is None else min(1.0, max(base, stricter))
                if x >= 1.0:  # no panel score below 1 may reach this threshold: all of (0, 1) maps below it
                    xs.append(1.0)
                    ys.append(base)
                    break
                if x >= xs[-1]:  # equal: block's share leaves out no more negatives than review's, so a panel
                    xs.append(x)  # at x clears both; the repeated knot is a step (np.interp takes the last
                    ys.append(base)  # knot at x), where dropping it sent such a panel to review only
            per_class[c] = (np.array(xs + [1.0]), np.array(ys + [1.0]))
        out[k] = per_class
    return out


def first_scored_view(tiling: Tiling | None, n_views: int) -> int:
    """Index of the first view of a picture that its scores come from (``combine``): a found collage (two
    panels or more) under ``whole_with_panels: false`` is scored by its panels alone, not by view 0, the
    whole composite (what a heat map may show, too)."""
    panels_only = tiling is not None and tiling.mode == "panels" and not tiling.whole_with_panels
    return 1 if panels_only and n_views - 1 >= 2 else 0


def combine(view_probs: np.ndarray, rule: ViewRule) -> np.ndarray:
    """One probability vector from the views of one picture (the whole picture first): each protected class
    takes its highest view score; the negative class keeps what is left (protected scores are rescaled if
    they sum above 1). With two classes this is exactly the view whose protected score is highest. For a
    collage the rule may leave out the whole composite and map panel scores (``ViewRule``)."""
    negative_index = rule.negative_index
    k = len(view_probs) - 1
    if k >= 2 and (rule.panels_only or rule.panel_knots):
        panels = view_probs[1:].astype(np.float64)
        for c, (xs, ys) in rule.panel_knots.get(k, {}).items():
            panels[:, c] = np.interp(panels[:, c], xs, ys)
        view_probs = panels if rule.panels_only else np.concatenate([view_probs[:1], panels])
    if len(view_probs) == 1 or negative_index is None:
        return view_probs[0] if len(view_probs) == 1 else view_probs.max(axis=0)
    out = view_probs.max(axis=0).astype(np.float64)
    protected = np.ones(len(out), dtype=bool)
    protected[negative_index] = False
    total = out[protected].sum()
    if total > 1.0:
        out[protected] /= total
        total = 1.0
    out[negative_index] = 1.0 - total
    return out.astype(np.float32)


def per_picture(outputs: np.ndarray, stacks: list[np.ndarray]) -> list[np.ndarray]:
    """The rows of one forward pass over ``np.concatenate(stacks)``, split back into each picture's views."""
    bounds = np.cumsum([0] + [len(stack) for stack in stacks])
    return [outputs[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def combine_pictures(view_probs: np.ndarray, stacks: list[np.ndarray], rule: ViewRule) -> np.ndarray:
    """One probability vector per picture (``combine``) from the probabilities of all pictures' views."""
    return np.stack([combine(p, rule) for p in per_picture(view_probs, stacks)]).astype(np.float32)


def predict_views(predictor, stacks: list[np.ndarray], rule: ViewRule | None = None) -> np.ndarray:
    """One forward pass over every view of every picture (``stacks`` from ``views``), combined per picture
    (``rule``: the predictor's spec's ``ViewRule`` unless given)."""
    if not stacks:
        return np.zeros((0, len(predictor.labels)), np.float32)
    rule = predictor.view_rule if rule is None else rule
    return combine_pictures(predictor.predict_proba(np.concatenate(stacks)), stacks, rule)
