"""Heat maps for moderators: where in the photo a class's score came from (numpy + PIL, no torch).

The model's ``cam`` output (``training.cam``) covers only the centre crop the model saw, at the feature
map's resolution (7 x 7 for 224 px). ``heat_grid`` maps it back onto the *whole* picture through the same
resize + centre-crop geometry as ``serving.preprocess`` (areas the model never saw are 0), so a client can
draw it over the photo it sent. ``overlay`` draws it.
"""

from __future__ import annotations

import base64
import io

import numpy as np
from PIL import Image
from pydantic import BaseModel, Field

from serving.preprocess import Preprocessing
from serving.runtime import softmax
from serving.tiling import Tiling, combine_pictures, first_scored_view, per_picture

GRID_CELLS_PER_MAP_CELL = 4  # grid cells across one feature-map cell (7 x 7 map -> 28 cells over the crop)
MAX_GRID_SIDE = 64  # bounds the response size for very elongated pictures
OVERLAY_MAX_SIDE = 384
OVERLAY_ALPHA = 0.6


class Explanation(BaseModel):
    """A heat map over the whole picture, rows top to bottom, columns left to right."""

    label: str = Field(description="the class explained: the top protected class, or explain_label")
    rows: int
    cols: int
    grid: list[list[float]] = Field(
        description="rows x cols values in [0, 1]: 1 = the strongest evidence for `label` in this picture, "
        "0 = none or outside the centre crop the model sees"
    )
    png: str | None = Field(None, description="with explain=png: base64 PNG of the photo with the heat map overlaid")


def class_evidence(cam: np.ndarray, index: int) -> np.ndarray:
    """One image's (C, h, w) maps -> evidence for class ``index`` against the others (h, w).

    ``cam[index]`` minus the mean of the other classes' maps: with two classes this is the log-odds map
    (its mean is the logit margin), so a region that looks like both classes does not light up.
    """
    cam = np.asarray(cam, dtype=np.float32)
    if cam.shape[0] == 1:
        return cam[0]
    return cam[index] - np.delete(cam, index, axis=0).mean(axis=0)


def grid_shape(pre: Preprocessing, map_side: int, width: int, height: int) -> tuple[int, int]:
    """(rows, cols): cells about a quarter of a feature-map cell, square in resized pixels, at most 64 a side."""
    resized_w, resized_h = pre.resized_size(width, height)
    cell = pre.input_size / (GRID_CELLS_PER_MAP_CELL * map_side)
    rows, cols = resized_h / cell, resized_w / cell
    shrink = min(1.0, MAX_GRID_SIDE / max(rows, cols))
    return max(1, round(rows * shrink)), max(1, round(cols * shrink))


def _axis(n_cells: int, picture: int, start: int, end: int, resized: int, offset: int, crop: int,
          map_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """Along one axis: feature-map coordinates of the grid cells' centres for the view [start, end) of the
    picture, and whether each centre falls inside the centre crop the model saw of that view."""
    centres = (np.arange(n_cells) + 0.5) * picture / n_cells  # picture pixels
    in_crop = (centres - start) * resized / (end - start) - offset  # resized view pixels, relative to the crop
    inside = (in_crop >= 0) & (in_crop < crop)
    return np.clip(in_crop / crop * map_cells - 0.5, 0, map_cells - 1), inside


def _bilinear(values: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    y0 = np.floor(ys).astype(int)
    x0 = np.floor(xs).astype(int)
    y1 = np.minimum(y0 + 1, values.shape[0] - 1)
    x1 = np.minimum(x0 + 1, values.shape[1] - 1)
    wy = (ys - y0)[:, None]
    wx = (xs - x0)[None, :]
    top = values[np.ix_(y0, x0)] * (1 - wx) + values[np.ix_(y0, x1)] * wx
    bottom = values[np.ix_(y1, x0)] * (1 - wx) + values[np.ix_(y1, x1)] * wx
    return top * (1 - wy) + bottom * wy


def heat_grid(evidence: np.ndarray, pre: Preprocessing, width: int, height: int,
              boxes: list[tuple[int, int, int, int]] | None = None) -> np.ndarray:
    """Evidence over the model's crop(s) -> (rows, cols) heat in [0, 1] over the whole ``width`` x ``height`` picture.

    ``evidence``: (h, w) for the whole picture, or (views, h, w) for the views ``serving.tiling.views`` made,
    whose boxes (left, top, right, bottom) are ``boxes`` (the whole picture first); where views overlap the
    stronger evidence counts, as tiling keeps the most suspicious view. Positive evidence only, scaled so the
    strongest cell is 1 (all 0 when nothing speaks for the class). ``width`` x ``height`` is the decoded,
    upright picture that went through ``pre``.
    """
    maps = [evidence] if evidence.ndim == 2 else list(evidence)
    boxes = boxes or [(0, 0, width, height)]
    if len(boxes) != len(maps):
        raise ValueError(f"{len(maps)} evidence maps for {len(boxes)} views")
    map_h, map_w = maps[0].shape
    rows, cols = grid_shape(pre, max(map_h, map_w), width, height)
    grid = np.zeros((rows, cols), np.float32)
    crop = pre.input_size
    for values, (left, top, right, bottom) in zip(maps, boxes):
        resized_w, resized_h = pre.resized_size(right - left, bottom - top)
        offset_x, offset_y = pre.crop_offsets(resized_w, resized_h)
        ys, inside_y = _axis(rows, height, top, bottom, resized_h, offset_y, crop, map_h)
        xs, inside_x = _axis(cols, width, left, right, resized_w, offset_x, crop, map_w)
        view = _bilinear(np.maximum(values, 0.0), ys, xs) * (inside_y[:, None] & inside_x[None, :])
        grid = np.maximum(grid, view)
    peak = float(grid.max())
    return (grid / peak if peak > 0 else grid).astype(np.float32)


def view_boxes(tiling: Tiling | None, width: int, height: int) -> list[tuple[int, int, int, int]]:
    """The boxes of the views ``serving.tiling.views`` makes of a ``width`` x ``height`` picture, in order
    (grid tiling; a collage's panels depend on the picture: ``serving.tiling.view_boxes``)."""
    if tiling is not None and tiling.mode == "panels":
        raise ValueError("panel views depend on the picture: pass the boxes serving.tiling.view_boxes gave")
    return [(0, 0, width, height)] + (tiling.tiles((width, height)) if tiling is not None else [])


def explain(cams: np.ndarray, label: str, labels: list[str], pre: Preprocessing, width: int, height: int,
            tiling: Tiling | None = None, boxes: list[tuple[int, int, int, int]] | None = None) -> Explanation:
    """One picture's ``cam`` outputs (views, C, h, w) -> the ``Explanation`` of ``label`` (values rounded to 4 decimals).
    ``boxes``: the views' boxes (``serving.tiling.view_boxes``); needed for panels, derived for a grid. Only the
    views the scores come from are drawn: a collage scored by its panels alone does not show the whole
    composite's evidence (it pointed where the decision never looked)."""
    cams = np.asarray(cams)
    if cams.ndim == 3:
        cams = cams[None]
    boxes = boxes if boxes is not None else view_boxes(tiling, width, height)
    first = first_scored_view(tiling, len(cams))
    index = labels.index(label)
    evidence = np.stack([class_evidence(c, index) for c in cams[first:]])
    grid = heat_grid(evidence, pre, width, height, boxes[first:])
    return Explanation(label=label, rows=grid.shape[0], cols=grid.shape[1], grid=np.round(grid, 4).tolist())


def predict_views_with_cam(model, stacks: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """``serving.tiling.predict_views`` plus each picture's cam outputs: (probabilities N x C, [views x C x h x w])."""
    logits, cam = model.predict_with_cam(np.concatenate(stacks))
    return combine_pictures(softmax(logits, model.temperature), stacks, model.view_rule), per_picture(cam, stacks)


def explained_label(probs: np.ndarray, labels: list[str], negative_label: str, requested: str | None = None) -> str:
    """The requested label, else the protected class (any but the negative one) with the highest score."""
    if requested is not None:
        return requested
    protected = [i for i, label in enumerate(labels) if label != negative_label] or list(range(len(labels)))
    return labels[max(protected, key=lambda i: probs[i])]


# jet-like colour ramp, blue (weak) -> cyan -> yellow -> red (strong), as 256-entry lookup tables
_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_COLOURS = np.array([[0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 128, 0], [255, 0, 0]], dtype=np.float32)
_LEVELS = np.linspace(0.0, 1.0, 256)
_COLOUR_LUT = np.stack([np.interp(_LEVELS, _STOPS, _COLOURS[:, c]) for c in range(3)], axis=-1).astype(np.float32)
_ALPHA_LUT = (OVERLAY_ALPHA * np.sqrt(_LEVELS)).astype(np.float32)[:, None]  # weak evidence tinted lightly


def overlay(img: Image.Image, grid: np.ndarray | list[list[float]], max_side: int = OVERLAY_MAX_SIDE) -> Image.Image:
    """The photo (shrunk to ``max_side``) with the heat map blended in; cold areas keep the photo visible."""
    img = img.convert("RGB")
    img.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    heat = Image.fromarray(np.ascontiguousarray(grid, dtype=np.float32)).resize(img.size, Image.Resampling.BILINEAR)
    level = (np.clip(np.asarray(heat), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    alpha = _ALPHA_LUT[level]
    out = np.asarray(img, dtype=np.float32) * (1 - alpha) + _COLOUR_LUT[level] * alpha
    return Image.fromarray((out + 0.5).astype(np.uint8))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", compress_level=1)  # 3-4x faster than the default level, ~20% larger
    return buf.getvalue()


def overlay_base64(img: Image.Image, grid: list[list[float]]) -> str:
    return base64.b64encode(png_bytes(overlay(img, grid))).decode("ascii")
