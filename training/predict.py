"""Models in, probabilities out: the prediction layer that evaluation, calibration, export and the reports share.

A checkpoint (``TorchPredictor``) and an ONNX file (``serving.runtime.OnnxModel``) are both
``serving.runtime.Predictor``s; images go through ``serving.imageio.decode_image`` and the model's
preprocessing and tiling exactly as the server does, so only the final forward pass differs.
torch is imported only when a checkpoint is loaded: scoring an ONNX file does not pay for it.
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from serving import runtime
from serving.contract import ModelContract, ModelSpec
from serving.errors import InvalidInput, MissingInput
from serving.imageio import ImageError, decode_image
from serving.runtime import OnnxModel, Predictor, SpecView, in_slices, softmax
from serving.tiling import draft_size, predict_views, views
from training.checkpoint import Checkpoint
from training.data.sources import Sample, load_samples, select_split

log = logging.getLogger(__name__)


class ModelNotFound(MissingInput):
    """No run dir, checkpoint or ONNX file at the path given."""


class NoRunData(InvalidInput):
    """The run does not say where its images are, and none were given."""


class TorchPredictor(SpecView):
    """A wildcheck checkpoint (``best.pt``) as a ``Predictor``, like ``serving.runtime.OnnxModel``."""

    def __init__(self, checkpoint: str | Path, threads: int | None = None):
        import torch

        from training.models import create_model

        if threads:
            torch.set_num_threads(threads)
        self.path = Path(checkpoint)
        self.checkpoint = Checkpoint.load(self.path)
        self.spec: ModelSpec = self.checkpoint.spec
        self.network = create_model(self.spec.architecture, len(self.spec.labels), pretrained="none")
        self.network.load_state_dict(self.checkpoint.weights)
        self.network.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        self._torch = torch
        self._scored: tuple[tuple, Any] | None = None

    @property
    def model(self):
        """What the spec scores: the trained network, with its size route, grey route and test-time views when the
        spec has them (the exported graph is this module)."""
        from training.models import with_grey_route, with_size_route, with_views

        key = (tuple(self.spec.test_time_views), self.spec.grey_route, self.spec.size_route)
        if self._scored is None or self._scored[0] != key:
            sized = with_size_route(self.network, self.spec.size_route, self.spec.preprocessing)
            routed = with_grey_route(sized, self.checkpoint.grey_head, self.spec.grey_route,
                                     self.spec.preprocessing)
            self._scored = (key, with_views(routed, list(key[0])))
        return self._scored[1]

    @cached_property
    def contract(self) -> ModelContract:
        """What ``wildcheck export`` would write for these weights (without the exported graph's outputs)."""
        return self.checkpoint.release(None, None, self.path.parent.name)

    def _input(self, batch: np.ndarray):
        x = self._torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32))
        return x.to(next(self.model.parameters()).device)

    def predict_logits(self, batch: np.ndarray) -> np.ndarray:
        def run(rows):
            with self._torch.inference_mode():
                return [self.model(self._input(rows)).float().cpu().numpy()]

        return in_slices(batch, run, copies=1 + len(self.spec.test_time_views))[0]

    def predict_proba(self, batch: np.ndarray) -> np.ndarray:
        return softmax(self.predict_logits(batch), self.temperature)

    @property
    def has_cam(self) -> bool:
        from training.cam import cam_unsupported

        return cam_unsupported(self.model) is None

    def predict_with_cam(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits, class activation maps): what the exported ``cam`` output computes (``training.cam``)."""
        from training.cam import WithCam

        def run(rows):
            with self._torch.inference_mode():
                return [out.float().cpu().numpy() for out in WithCam(self.model)(self._input(rows))]

        logits, cam = in_slices(batch, run, copies=1 + len(self.spec.test_time_views))
        return logits, cam


def resolve_checkpoint(model: str | Path) -> Path:
    """A run dir's ``best.pt``, or the file itself."""
    path = Path(model)
    if path.is_dir():
        path = path / "best.pt"
    if not path.exists():
        raise ModelNotFound(f"{model}: no such run dir, checkpoint or ONNX file")
    return path


def load_predictor(model: str | Path, threads: int | None = None) -> Predictor:
    """A run dir, a ``.pt`` checkpoint or a ``.onnx`` file."""
    path = resolve_checkpoint(model)
    if path.suffix.lower() == ".onnx":  # MODEL.ONNX is an ONNX file too
        return OnnxModel(path, threads=threads or 2)
    return TorchPredictor(path, threads=threads)


def run_samples(checkpoint: Checkpoint, data: list[str] | None) -> tuple[list[Sample], list[Sample]]:
    """(validation, training) samples of a run: its recorded data roots and negatives, or ``data``."""
    roots = data or checkpoint.data_roots
    if not roots:
        raise NoRunData("the run does not record its data; pass --data ROOT")
    negatives = checkpoint.config.data.negatives if not data else []
    samples = load_samples(roots)
    labels = set(checkpoint.spec.labels)
    val = [s for s in select_split(samples, "val") if s.label in labels]
    train = [s for s in select_split(samples, "train") if s.label in labels]
    if negatives:
        negative_label = checkpoint.spec.negative_label
        neg = [replace(s, label=negative_label) for s in load_samples(negatives)]  # keeps pool and source
        val += select_split(neg, "val")
        train += select_split(neg, "train")
    return val, train


def decode_sample(sample: Sample, spec: ModelSpec):
    """The decoded RGB picture (kept large enough for the tiles, if any), or the reason it cannot be used."""
    try:
        img, _ = decode_image(sample.path, draft_size=draft_size(spec.preprocessing, spec.tiling))
        return img
    except ImageError as exc:
        return f"{exc.code}: {exc.message}"
    except OSError as exc:
        return f"unreadable: {exc}"


def readable(samples: list[Sample], spec: ModelSpec) -> list[tuple[Sample, Any]]:
    """(sample, decoded picture) of each sample that decodes, in order; the others are left out."""
    return [(s, img) for s in samples if not isinstance(img := decode_sample(s, spec), str)]


def predict_images(predictor: Predictor, images: list, pool: ThreadPoolExecutor | None = None) -> np.ndarray:
    """Decoded RGB pictures -> class probabilities (N x C): the model's own preprocessing, then its forward pass.

    The one "pictures to probabilities" step that evaluation, the robustness report and calibration share,
    so that any change to how a picture is scored (e.g. tiled inference) reaches all of them at once.
    ``pool``: a thread pool to preprocess in (PIL resizing releases the GIL). A few pictures at a time
    (``MAX_ROWS_PER_PASS``): their views are made, scored and dropped, so a batch of collages (ten views each,
    1.2 MB a view at 320 px) is never held whole.
    """
    spec = predictor.spec

    def inputs(img):
        return views(img, spec.preprocessing, spec.tiling)

    step = runtime.MAX_ROWS_PER_PASS
    probs = []
    for i in range(0, len(images), step):
        chunk = images[i : i + step]
        stacks = list(pool.map(inputs, chunk)) if pool is not None else [inputs(img) for img in chunk]
        probs.append(predict_views(predictor, stacks))
    return np.concatenate(probs) if probs else np.zeros((0, len(spec.labels)), np.float32)


def decoded_batches(samples: list[Sample], spec: ModelSpec, skipped: list[tuple[str, str]], batch_size: int = 32,
                    workers: int = 2, desc: str = "evaluating"):
    """Yields (the thread pool, decoded pictures, their samples) a batch at a time, decoding ahead in the pool
    (which the caller may use for preprocessing too); unreadable samples are logged and added to ``skipped``
    as (path, reason). At most two batches are decoded ahead of the one handed out: ``Executor.map`` would submit
    every sample at once and hold all of them decoded while the model catches up (a 50,000-photo evaluation in
    memory)."""
    ahead = 2 * batch_size
    with ThreadPoolExecutor(max_workers=workers) as pool, \
            tqdm(total=len(samples), desc=desc, unit="img", leave=False) as bar:
        queue, pending = iter(samples), deque()

        def top_up():
            while len(pending) < ahead and (sample := next(queue, None)) is not None:
                pending.append((sample, pool.submit(decode_sample, sample, spec)))

        top_up()
        batch, batch_samples = [], []
        while pending:
            sample, future = pending.popleft()
            img = future.result()
            top_up()
            bar.update()
            if isinstance(img, str):
                log.warning("skipping %s (%s)", sample.path, img)
                skipped.append((str(sample.path), img))
                continue
            batch.append(img), batch_samples.append(sample)
            if len(batch) == batch_size:
                yield pool, batch, batch_samples
                batch, batch_samples = [], []
        if batch:
            yield pool, batch, batch_samples


def predict_samples(predictor: Predictor, samples: list[Sample], batch_size: int = 32, workers: int = 2,
                    desc: str = "evaluating"):
    """Returns (probabilities for the readable samples, readable samples, [(path, reason)] for the others)."""
    probs, kept, skipped = [], [], []
    for pool, images, batch_samples in decoded_batches(samples, predictor.spec, skipped, batch_size, workers, desc):
        probs.append(predict_images(predictor, images, pool))
        kept.extend(batch_samples)
    n_labels = len(predictor.spec.labels)
    return (np.concatenate(probs) if probs else np.zeros((0, n_labels), np.float32)), kept, skipped
