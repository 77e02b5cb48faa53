"""The image check itself, without HTTP: bytes in, decision out. Used by the service and the benchmarks."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from serving.decision import decide
from serving.explain import OVERLAY_MAX_SIDE, explain, explained_label, overlay_base64, predict_views_with_cam
from serving.imageio import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, ImageError, decode_image
from serving.runtime import OnnxModel
from serving.tiling import draft_size, predict_views, views

ExplainMode = Literal["false", "true", "png"]

# Declared content types we accept, and the decoded format each one promises.
CONTENT_TYPES = {
    "image/jpeg": {"JPEG", "MPO"},
    "image/png": {"PNG"},
    "image/webp": {"WEBP"},
    "image/gif": {"GIF"},
    "image/bmp": {"BMP"},
    "image/tiff": {"TIFF"},
}
GENERIC_TYPES = {"", "application/octet-stream"}


@dataclass(frozen=True)
class Limits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE


def check_content_type(declared: str | None, fmt: str) -> None:
    """A declared type must be a real image type and match the bytes; none or octet-stream means 'sniff'."""
    declared = (declared or "").split(";")[0].strip().lower()
    if declared in GENERIC_TYPES:
        return
    if declared not in CONTENT_TYPES:
        hint = " (the registered type is image/jpeg)" if declared in ("image/jpg", "image/pjpeg") else ""
        raise ImageError(
            "unsupported_content_type",
            f"content type {declared!r} is not accepted{hint}; use one of {sorted(CONTENT_TYPES)} or application/octet-stream",
            status=415,
        )
    if fmt not in CONTENT_TYPES[declared]:
        raise ImageError(
            "content_type_mismatch", f"declared {declared} but the bytes are a {fmt} image; send the right type", status=415
        )


@dataclass
class Prepared:
    views: np.ndarray  # the model inputs: the whole picture, then its tiles (serving.tiling.views)
    meta: dict
    size: tuple[int, int]  # the decoded, upright picture that was preprocessed (what a heat map covers)
    thumbnail: Image.Image | None = None  # kept only for explain=png


class ImageChecker:
    """Loads the ONNX model once; ``check`` is safe to call from several threads."""

    def __init__(self, model_path: str, threads: int = 1, limits: Limits = Limits(), max_concurrent: int = 1,
                 memory_arena: bool = True):
        self.model = OnnxModel(model_path, threads=threads, memory_arena=memory_arena)
        self.contract = self.model.contract
        self.pre = self.contract.preprocessing
        self.limits = limits
        self.thresholds = dict(self.contract.thresholds)
        self.never_block = list(self.contract.never_block)
        self.policy = {"source": "model"}
        # one inference at a time per worker: onnxruntime threads x concurrent runs must not exceed the cores
        self._slots = threading.Semaphore(max_concurrent)

    def apply_policy(self, path: str) -> None:
        """Override thresholds / never_block from a policy YAML (GET /v1/model shows what is in force)."""
        from serving.policy import load_policy, resolve_policy

        self.thresholds, self.never_block, notes = resolve_policy(load_policy(path), self.contract)
        self.policy = {"source": str(path), "notes": notes}

    def warm_up(self) -> None:
        rng = np.random.default_rng(0)
        batch = rng.standard_normal((1, 3, self.pre.input_size, self.pre.input_size), dtype=np.float32)
        for _ in range(3):
            self.model.predict_proba(batch)

    def prepare(self, data: bytes, content_type: str | None = None) -> tuple[np.ndarray, dict]:
        prepared = self._prepare(data, content_type)
        return prepared.views, prepared.meta

    def _prepare(self, data: bytes, content_type: str | None = None, thumbnail: bool = False) -> Prepared:
        img, info = decode_image(data, max_pixels=self.limits.max_pixels, min_side=self.limits.min_side,
                                 draft_size=draft_size(self.pre, self.contract.tiling))
        check_content_type(content_type, info.format)
        meta = {"sha256": hashlib.sha256(data).hexdigest(), "width": info.width, "height": info.height,
                "format": info.format}
        thumb = None
        if thumbnail:  # a small copy, so a batch does not hold every full-size picture until the forward pass
            thumb = img.copy()
            thumb.thumbnail((OVERLAY_MAX_SIDE, OVERLAY_MAX_SIDE), Image.Resampling.BILINEAR)
        return Prepared(views(img, self.pre, self.contract.tiling), meta, img.size, thumb)

    def predict(self, stacks: list[np.ndarray]) -> np.ndarray:
        """Probabilities per picture, from the views ``prepare`` made of each (one forward pass)."""
        with self._slots:
            return predict_views(self.model, stacks, self.model.negative_index)

    def predict_with_cam(self, stacks: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """``predict`` plus each picture's cam outputs (one per view)."""
        with self._slots:
            return predict_views_with_cam(self.model, stacks, self.model.negative_index, self.model.temperature)

    def check_explain_request(self, mode: ExplainMode, label: str | None) -> bool:
        """Whether to explain; a request the model cannot serve is a client error (4xx), before any decoding."""
        if mode not in ("false", "true", "png"):
            raise ImageError("invalid_request", f"explain must be false, true or png, not {mode!r}")
        if mode == "false":
            if label is not None:
                raise ImageError("invalid_request", "explain_label needs explain=true or explain=png")
            return False
        if not self.model.has_cam:
            raise ImageError(
                "explain_unavailable",
                f"the served model {self.contract.model_name} {self.contract.model_version} has no class activation "
                "map output (exported before heat maps existed); re-export it with `wildcheck export` to use explain",
                status=422,
            )
        if label is not None and label not in self.contract.labels:
            raise ImageError("unknown_label", f"explain_label {label!r} is not one of the model's labels {self.contract.labels}")
        return True

    def explanation(self, probs: np.ndarray, cam: np.ndarray, prepared: Prepared, label: str | None) -> dict:
        c = self.contract
        chosen = explained_label(probs, c.labels, c.negative_label, label)
        result = explain(cam, chosen, c.labels, self.pre, *prepared.size, tiling=c.tiling)
        if prepared.thumbnail is not None:
            result.png = overlay_base64(prepared.thumbnail, result.grid)
        return result.model_dump()

    def result(self, probs: np.ndarray, meta: dict, started: float, explanation: dict | None = None) -> dict:
        labels = self.contract.labels
        scores = {label: round(float(p), 6) for label, p in zip(labels, probs)}
        top = int(np.argmax(probs))
        decision, triggered = decide(scores, self.thresholds, self.never_block)
        return {
            "decision": decision,
            "label": labels[top],
            "score": scores[labels[top]],
            "triggered_by": triggered,
            "scores": scores,
            "thresholds": {k: v.model_dump() for k, v in self.thresholds.items()},
            "model": {"name": self.contract.model_name, "version": self.contract.model_version},
            "image": meta,
            **({"explanation": explanation} if explanation is not None else {}),
            "elapsed_ms": round((time.perf_counter() - started) * 1000.0, 2),
        }

    def check(self, data: bytes, content_type: str | None = None, explain: ExplainMode = "false",
              explain_label: str | None = None) -> dict:
        """With ``explain`` true/png the result carries an ``explanation`` (heat map) for the top protected class."""
        return self.check_many([(data, content_type)], explain, explain_label, single=True)[0]

    def check_many(self, items: list[tuple[bytes, str | None]], explain: ExplainMode = "false",
                   explain_label: str | None = None, single: bool = False) -> list[dict]:
        """One forward pass for the readable images; an error entry for each bad one, in request order.

        ``single``: raise a bad image's ``ImageError`` instead of returning an error entry (``check``).
        """
        started = time.perf_counter()
        explaining = self.check_explain_request(explain, explain_label)
        prepared: list[tuple[int, Prepared]] = []
        results: list[dict | None] = [None] * len(items)
        for i, (data, content_type) in enumerate(items):
            try:
                prepared.append((i, self._prepare(data, content_type, thumbnail=explain == "png")))
            except ImageError as exc:
                if single:
                    raise
                results[i] = {"error": {"code": exc.code, "message": exc.message, "status": exc.status}}
        if prepared:
            stacks = [p.views for _, p in prepared]
            if explaining:
                probs, cams = self.predict_with_cam(stacks)
            else:
                probs, cams = self.predict(stacks), [None] * len(stacks)
            for (i, p), prob, cam in zip(prepared, probs, cams):
                explanation = self.explanation(prob, cam, p, explain_label) if explaining else None
                results[i] = self.result(prob, p.meta, started, explanation)
        return results

    def describe(self) -> dict:
        c = self.contract
        return {
            "name": c.model_name, "version": c.model_version, "architecture": c.architecture, "labels": c.labels,
            "negative_label": c.negative_label, "precision": c.precision,
            "thresholds": {k: v.model_dump() for k, v in self.thresholds.items()}, "never_block": self.never_block,
            "policy": self.policy, "temperature": c.temperature, "preprocessing": c.preprocessing.model_dump(),
            "tiling": c.tiling.model_dump() if c.tiling else None, "metrics": c.metrics,
            "created_at": c.created_at, "training_data": c.training_data, "wildcheck_version": c.wildcheck_version,
            "explain": {"available": self.model.has_cam, "cam": c.cam.model_dump() if self.model.has_cam else None},
        }
