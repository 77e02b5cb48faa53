"""Tiled inference: score the whole picture and a grid of tiles, keep the most suspicious view per class.

A product that fills one tile of a seller's collage, or a corner of a shelf photo, is a small part of the
whole picture, and the centre crop at model resolution may miss it or shrink it past recognition. Each
tile is preprocessed like a whole picture (``Preprocessing``), so the model sees it at the scale it was
trained on. Declared in the model contract, so evaluation, calibration, the robustness report and the
server all score the same views.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from serving.preprocess import Preprocessing


class Tiling(BaseModel):
    """Score the whole picture plus a ``grid`` x ``grid`` grid of tiles."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    grid: int = Field(2, ge=2, le=4, description="tiles per side")
    min_tile_side: int = Field(
        64, ge=16, description="no tiles when a tile's shorter side would be below this (thumbnails: whole picture only)"
    )

    def tiles(self, size: tuple[int, int]) -> list[tuple[int, int, int, int]]:
        """Tile boxes (left, top, right, bottom) for a picture of ``size`` (w, h); empty when it is too small."""
        w, h = size
        if min(w, h) // self.grid < self.min_tile_side:
            return []
        xs = [round(i * w / self.grid) for i in range(self.grid + 1)]
        ys = [round(i * h / self.grid) for i in range(self.grid + 1)]
        return [(xs[c], ys[r], xs[c + 1], ys[r + 1]) for r in range(self.grid) for c in range(self.grid)]

    def decode_size(self, pre: Preprocessing) -> int | None:
        """The JPEG draft size that keeps each tile at least at the model's resize size."""
        return pre.resize_size * self.grid if pre.jpeg_draft else None


def draft_size(pre: Preprocessing, tiling: Tiling | None) -> int | None:
    """How large ``decode_image`` must keep a JPEG for these views."""
    return tiling.decode_size(pre) if tiling is not None else pre.draft_size


def views(img: Image.Image, pre: Preprocessing, tiling: Tiling | None) -> np.ndarray:
    """Model inputs for one RGB picture: (1 + number of tiles, 3, S, S); the whole picture first."""
    arrays = [pre(img)]
    if tiling is not None:
        arrays += [pre(img.crop(box)) for box in tiling.tiles(img.size)]
    return np.stack(arrays)


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


def predict_views(predictor, stacks: list[np.ndarray], negative_index: int | None) -> np.ndarray:
    """One forward pass over every view of every picture (``stacks`` from ``views``), combined per picture."""
    if not stacks:
        return np.zeros((0, len(predictor.labels)), np.float32)
    probs = predictor.predict_proba(np.concatenate(stacks))
    out, start = [], 0
    for stack in stacks:
        out.append(combine(probs[start : start + len(stack)], negative_index))
        start += len(stack)
    return np.stack(out)
