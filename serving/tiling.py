"""Tiled inference: score the whole picture and more views of it, keep the most suspicious view per class.

A product that fills one tile of a seller's collage, or a corner of a shelf photo, is a small part of the
whole picture, and the centre crop at model resolution may miss it or shrink it past recognition. Each
view is preprocessed like a whole picture (``Preprocessing``), so the model sees it at the scale it was
trained on. Two modes: ``grid`` scores a fixed grid of tiles of every picture; ``panels`` scores the
panels of a collage, only when ``serving.panels`` finds one (ordinary photos are scored whole, as without
tiling). Declared in the model contract, so evaluation, calibration, the robustness report and the
server all score the same views.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_serializer

from serving.panels import Box, find_panels
from serving.preprocess import Preprocessing

_PANEL_FIELDS = ("mode", "min_panel_fraction", "max_panels")


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

    @model_serializer(mode="wrap")
    def _grid_as_before(self, handler):
        """A grid tiling serialises exactly as before panels existed: older readers accept it and the
        contract hash of a grid model does not change."""
        data = handler(self)
        if self.mode == "grid":
            for key in _PANEL_FIELDS:
                data.pop(key, None)
        return data

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


def combine(view_probs: np.ndarray, negative_index: int | None) -> np.ndarray:
    """One probability vector from the views of one picture: each protected class takes its highest view
    score; the negative class keeps what is left (protected scores are rescaled if they sum above 1).
    With two classes this is exactly the view whose protected score is highest."""
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


def combine_pictures(view_probs: np.ndarray, stacks: list[np.ndarray], negative_index: int | None) -> np.ndarray:
    """One probability vector per picture (``combine``) from the probabilities of all pictures' views."""
    return np.stack([combine(p, negative_index) for p in per_picture(view_probs, stacks)])


def predict_views(predictor, stacks: list[np.ndarray], negative_index: int | None) -> np.ndarray:
    """One forward pass over every view of every picture (``stacks`` from ``views``), combined per picture."""
    if not stacks:
        return np.zeros((0, len(predictor.labels)), np.float32)
    return combine_pictures(predictor.predict_proba(np.concatenate(stacks)), stacks, negative_index)
