"""The image check itself, without HTTP: bytes in, decision out. Used by the service and the benchmarks."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass

import numpy as np

from serving.decision import DECISIONS, decide
from serving.imageio import DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, ImageError, decode_image
from serving.runtime import OnnxModel
from serving.tiling import combine, draft_size, predict_views, views

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


class ImageChecker:
    """Loads the ONNX model once; ``check`` is safe to call from several threads."""

    def __init__(self, model_path: str, threads: int = 1, limits: Limits = Limits(), max_concurrent: int = 1,
                 memory_arena: bool = True, gallery: str | None = None):
        self.model = OnnxModel(model_path, threads=threads, memory_arena=memory_arena)
        self.contract = self.model.contract
        self.pre = self.contract.preprocessing
        self.limits = limits
        self.thresholds = dict(self.contract.thresholds)
        self.never_block = list(self.contract.never_block)
        self.policy = {"source": "model"}
        self.gallery = None
        if gallery:  # refused here (GalleryError naming the file) when unreadable or built with another model
            from serving.gallery import Gallery

            self.gallery = Gallery.load(gallery, self.contract)
        # one inference at a time per worker: onnxruntime threads x concurrent runs must not exceed the cores
        self._slots = threading.Semaphore(max_concurrent)

    def apply_policy(self, path: str) -> None:
        """Override thresholds / never_block from a policy YAML (GET /v1/model shows what is in force)."""
        from serving.policy import PolicyError, load_policy, resolve_policy

        policy = load_policy(path)
        self.thresholds, self.never_block, notes = resolve_policy(policy, self.contract)
        if policy.gallery:
            if self.gallery is None:
                raise PolicyError(f"policy {path} has a gallery section but no gallery is served (--gallery)")
            from serving.gallery import GalleryError

            try:
                notes["gallery"] = self.gallery.apply_policy(policy.gallery)
            except GalleryError as exc:
                raise PolicyError(str(exc)) from exc
        self.policy = {"source": str(path), "notes": notes}

    def warm_up(self) -> None:
        rng = np.random.default_rng(0)
        batch = rng.standard_normal((1, 3, self.pre.input_size, self.pre.input_size), dtype=np.float32)
        for _ in range(3):
            self.model.predict_proba(batch)

    def prepare(self, data: bytes, content_type: str | None = None) -> tuple[np.ndarray, dict]:
        img, info = decode_image(data, max_pixels=self.limits.max_pixels, min_side=self.limits.min_side,
                                 draft_size=draft_size(self.pre, self.contract.tiling))
        check_content_type(content_type, info.format)
        meta = {"sha256": hashlib.sha256(data).hexdigest(), "width": info.width, "height": info.height,
                "format": info.format}
        if self.gallery is not None:  # the same views, each with its pHash
            from serving.gallery import views_and_hashes

            stack, hashes = views_and_hashes(img, self.pre, self.contract.tiling)
            meta["phash"] = f"{hashes[0]:016x}"
            meta["_view_hashes"] = hashes
            return stack, meta
        return views(img, self.pre, self.contract.tiling), meta

    def predict(self, stacks: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """Probabilities per picture, from the views ``prepare`` made of each (one forward pass), and with a
        gallery the embeddings of each picture's views (the whole picture first, then its tiles)."""
        with self._slots:
            if self.gallery is None:
                return predict_views(self.model, stacks, self.model.negative_index), None
            probs, emb = self.model.predict_with_embedding(np.concatenate(stacks))
        bounds = np.cumsum([0] + [len(s) for s in stacks])
        per_picture = [(probs[a:b], emb[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
        return (np.stack([combine(p, self.model.negative_index) for p, _ in per_picture]),
                [e for _, e in per_picture])

    def result(self, probs: np.ndarray, meta: dict, started: float, embedding: np.ndarray | None = None) -> dict:
        labels = self.contract.labels
        scores = {label: round(float(p), 6) for label, p in zip(labels, probs)}
        top = int(np.argmax(probs))
        decision, triggered = decide(scores, self.thresholds, self.never_block)
        matches, view_hashes = [], meta.pop("_view_hashes", None)  # internal: never in the answer
        if self.gallery is not None and embedding is not None:
            found = self.gallery.match(embedding, view_hashes)
            matches = [m.model_dump(exclude_none=True) for m in found]
            g_decision, g_triggered = self.gallery.decide(found)
            # the stricter decision wins; at equal strictness both sources are named, the model's first
            if DECISIONS.index(g_decision) < DECISIONS.index(decision):
                decision, triggered = g_decision, g_triggered
            elif g_decision == decision and g_triggered:
                triggered = triggered + g_triggered
        return {
            "decision": decision,
            "label": labels[top],
            "score": scores[labels[top]],
            "triggered_by": triggered,
            "scores": scores,
            "thresholds": {k: v.model_dump() for k, v in self.thresholds.items()},
            "model": {"name": self.contract.model_name, "version": self.contract.model_version},
            "image": meta,
            "elapsed_ms": round((time.perf_counter() - started) * 1000.0, 2),
            "matches": matches,
        }

    def check(self, data: bytes, content_type: str | None = None) -> dict:
        started = time.perf_counter()
        array, meta = self.prepare(data, content_type)
        probs, emb = self.predict([array])
        return self.result(probs[0], meta, started, None if emb is None else emb[0])

    def check_many(self, items: list[tuple[bytes, str | None]]) -> list[dict]:
        """One forward pass for the readable images; an error entry for each bad one, in request order."""
        started = time.perf_counter()
        prepared, results = [], [None] * len(items)
        for i, (data, content_type) in enumerate(items):
            try:
                prepared.append((i, *self.prepare(data, content_type)))
            except ImageError as exc:
                results[i] = {"error": {"code": exc.code, "message": exc.message, "status": exc.status}}
        if prepared:
            probs, embs = self.predict([p[1] for p in prepared])
            for j, ((i, _, meta), p) in enumerate(zip(prepared, probs)):
                results[i] = self.result(p, meta, started, None if embs is None else embs[j])
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
            "embedding": c.embedding.model_dump() if c.embedding else None,
            "gallery": self.gallery.describe() if self.gallery is not None else None,
        }
