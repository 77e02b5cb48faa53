"""``wildcheck explain``: heat-map overlays for image files, computed exactly as the endpoint's ``explain``.

Decoding, preprocessing, the ``cam`` output and the grid all come from ``serving`` (``serving.explain``),
so the grid written here equals the one ``/v1/check?explain=true`` answers for the same file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from serving.explain import Explanation, explain, explained_label, overlay, png_bytes, predict_views_with_cam
from serving.errors import InvalidInput, MissingInput
from serving.imageio import IMAGE_EXTENSIONS, ImageError, decode_image, images_under
from serving.runtime import Predictor
from serving.tiling import draft_size, view_boxes, views
from training.predict import load_predictor
from training.fileio import atomic_path
from training.outputs import out_folder


class NoCamError(InvalidInput):
    """The model cannot draw heat maps."""


class UnknownLabel(InvalidInput):
    """A label to explain that the model does not have."""


def _require_cam(predictor: Predictor) -> None:
    if not predictor.has_cam:
        raise NoCamError(f"{predictor.path} has no class activation map output (exported before heat maps existed); "
                         "re-export the run with `wildcheck export RUN --out MODEL.onnx`, or pass the run dir")


def explain_image(predictor: Predictor, img: Image.Image, label: str | None = None) -> tuple[Explanation, dict[str, float]]:
    """Heat map of ``label`` (default: the top protected class) for a decoded RGB picture, and the scores."""
    labels = predictor.labels
    if label is not None and label not in labels:
        raise UnknownLabel(f"label {label!r} is not one of the model's labels {labels}")
    spec = predictor.spec
    pre, tiling = spec.preprocessing, spec.tiling
    boxes = view_boxes(img, tiling)
    probs, cams = predict_views_with_cam(predictor, [views(img, pre, tiling, boxes)])
    chosen = explained_label(probs[0], labels, spec.negative_label, label)
    scores = {name: round(float(p), 6) for name, p in zip(labels, probs[0])}
    return explain(cams[0], chosen, labels, pre, *img.size, tiling=tiling, boxes=boxes), scores


def _decode(predictor: Predictor, path: str | Path) -> Image.Image:
    """Decoded as the server decodes it (JPEG draft size included), so the grids agree."""
    return decode_image(path, draft_size=draft_size(predictor.spec.preprocessing, predictor.spec.tiling))[0]


def heat_grids(predictor: Predictor, paths: list[str | Path], labels: list[str] | None = None) -> list[np.ndarray | None]:
    """Each image's grid for ``labels[i]`` (default: its top protected class); None when the image is
    unreadable or the model has no ``cam`` output."""
    if not predictor.has_cam:
        return [None] * len(paths)
    grids = []
    for path, label in zip(paths, labels or [None] * len(paths)):
        try:
            img = _decode(predictor, path)
        except (ImageError, OSError):
            grids.append(None)
            continue
        grids.append(np.asarray(explain_image(predictor, img, label)[0].grid, dtype=np.float32))
    return grids


OVERLAY_STEM_BYTES = 200  # an image's name may take the file system's 255 bytes; its overlay's adds "-2.png"


def _unique_name(path: Path, taken: set[str]) -> str:
    """``p.jpg`` -> ``p.png`` (``p-2.png`` for a second ``p``), the stem cut to ``OVERLAY_STEM_BYTES`` bytes."""
    stem = path.stem
    while len(os.fsencode(stem)) > OVERLAY_STEM_BYTES:
        stem = stem[:-1]
    name, n = f"{stem}.png", 2
    while name in taken:
        name, n = f"{stem}-{n}.png", n + 1
    taken.add(name)
    return name


def image_paths(images: list[str | Path]) -> list[Path]:
    """Files as given (a missing one is reported with the others), each folder as the images under it."""
    paths = []
    for item in map(Path, images):
        if item.is_dir():
            found = images_under(item)
            if not found:
                raise MissingInput(f"no images under {item} (files ending {', '.join(sorted(IMAGE_EXTENSIONS))}; hidden ones "
                                   "are left out)")
            paths += found
        else:
            paths.append(item)
    return paths


def _file_folders(images: list[str | Path]) -> list[Path]:
    """The folders that files given one by one stand for: one holding several of them (a shell glob, ``DIR/*.jpg``)
    or a dataset's label folder (``SPLIT/LABEL/x.jpg``). Overlays written inside them join the data."""
    from training.data.sources import KNOWN_SPLITS

    parents = [p.parent for p in map(Path, images) if p.is_file()]
    return sorted({d for d in parents if parents.count(d) > 1 or d.parent.name in KNOWN_SPLITS})


def _dataset_roots(images: list[Path]) -> list[Path]:
    """The dataset roots the images lie in: ``ROOT`` of ``ROOT/SPLIT/LABEL/x.jpg`` or ``ROOT/SPLIT/LABEL/SOURCE/x.jpg``
    (SPLIT one of train, val, test; a negatives pool's layout). Overlays written anywhere in ROOT join the data
    (``ROOT/val/heatmaps/`` is a new label to ``data check`` and ``train``), not only in the image's own folder. An
    image straight in a split folder is no dataset image, nor is one deeper (a ``test`` folder far up the path is
    no split)."""
    from training.data.sources import KNOWN_SPLITS

    roots = set()
    for folder in {p.parent.absolute() for p in images}:
        split = next((d for d in (folder.parent, folder.parent.parent) if d.name in KNOWN_SPLITS), None)
        if split is not None:
            roots.add(split.parent)
    return sorted(roots)


def explain_files(model: str | Path, images: list[str | Path], out: str | Path, label: str | None = None,
                  max_side: int = 768) -> list[dict]:
    """One overlay PNG per readable image (``images``: files or folders) in ``out`` (atomic writes) plus
    ``out/explanations.json`` with the grids. Each record goes to the file as it is made (a grid is up to 64 x 64
    numbers, ~90 KiB as Python floats: 10,000 photos held 0.9 GB until the end); the returned records, one per
    image, leave the grid out."""
    folders = [p for p in map(Path, images) if p.is_dir()] + _file_folders(images)
    images = image_paths(images)
    folders += _dataset_roots(images)
    # overlays are named after their image (p.jpg -> p.png): among the images they would replace a PNG input, and
    # a later run on the folder would explain the overlays too
    out_folder(out, reads=folders, holding=images, holding_what="images being explained")
    predictor = load_predictor(model)
    _require_cam(predictor)
    if label is not None and label not in predictor.labels:
        raise UnknownLabel(f"--label {label!r} is not one of the model's labels {predictor.labels}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records, taken = [], set()
    with atomic_path(out / "explanations.json") as tmp, tmp.open("w", encoding="utf-8") as fh:
        fh.write("[")
        for path in tqdm(images, desc="explaining", unit="img"):
            record = _explain_file(predictor, path, label, max_side, out, taken)
            fh.write(("," if records else "") + "\n" + json.dumps(record))  # a record a line (indent: 10x slower)
            records.append({k: v for k, v in record.items() if k != "grid"})
        fh.write("\n]\n")
    return records


def _explain_file(predictor: Predictor, path: Path, label: str | None, max_side: int, out: Path, taken: set[str]) -> dict:
    """One image's record for explanations.json; its overlay written to ``out`` (an error record when unreadable)."""
    if not path.is_file():
        return {"image": str(path), "error": "not found: no such file"}
    try:
        img = _decode(predictor, path)
    except ImageError as exc:
        return {"image": str(path), "error": f"{exc.code}: {exc.message}"}
    except OSError as exc:
        return {"image": str(path), "error": f"unreadable: {exc}"}
    explanation, scores = explain_image(predictor, img, label)
    if min(img.size) < max_side:  # the model's decode may be a JPEG draft; draw on a sharper copy
        img, _ = decode_image(path, draft_size=max_side)
    name = _unique_name(path, taken)
    try:
        with atomic_path(out / name) as tmp:
            tmp.write_bytes(png_bytes(overlay(img, explanation.grid, max_side)))
    except OSError as exc:  # this overlay only (a name the file system refuses): the other images are still explained
        taken.discard(name)
        return {"image": str(path), "error": f"overlay not written: {exc}"}
    return {"image": str(path), "overlay": name, "scores": scores, **explanation.model_dump(exclude={"png"})}
