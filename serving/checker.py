"""The image check itself, without HTTP: bytes in, decision out. Used by the service and the benchmarks."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass
from typing import Literal
from pathlib import Path

import numpy as np
from PIL import Image

from serving.decision import DECISIONS, decide
from serving.errors import shown
from serving.imageio import (DEFAULT_MAX_DECODE_BYTES, DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE, FORMATS, MIME_ALIASES,
                             ImageError, decode_image)
from serving.explain import OVERLAY_MAX_SIDE, explain, explained_label, overlay_base64, predict_views_with_cam
from serving.runtime import OnnxModel, Predictor
from serving.tiling import combine_pictures, draft_size, per_picture, predict_views, view_boxes, views

GENERIC_TYPES = {"", "application/octet-stream"}


def content_type_info(declared: str | None, fmt: str) -> dict:
    """Declared vs detected type. The bytes decide how we decode: a wrong or sloppy declared type (a PNG sent
    as image/jpeg, the unregistered image/jpg) must not make a photo go unchecked, so it is only reported."""
    raw = (declared or "").split(";")[0].strip().lower()[:100]
    detected = FORMATS[fmt].mime if fmt in FORMATS else "application/octet-stream"
    normalized = MIME_ALIASES.get(raw, raw)
    return {"declared_type": raw or None, "detected_type": detected,
            "type_mismatch": normalized not in GENERIC_TYPES and normalized != detected}


@dataclass(frozen=True)
class Limits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES


class Abandoned(Exception):
    """The request this work was for has timed out or disconnected."""


def item_error(exc: Exception) -> dict:
    """A batch entry for an image that could not be checked."""
    if not isinstance(exc, ImageError):
        exc = ImageError("corrupt", f"the image could not be decoded: {type(exc).__name__}: {exc}")
    return {"error": {"code": exc.code, "message": exc.message, "status": exc.status}}


ExplainMode = Literal["false", "true", "png"]


@dataclass
class Prepared:
    views: np.ndarray  # the model inputs: the whole picture, then its tiles (serving.tiling.views)
    meta: dict
    size: tuple[int, int]  # the decoded, upright picture that was preprocessed (what a heat map covers)
    thumbnail: Image.Image | None = None  # kept only for explain=png
    gallery_views: np.ndarray | None = None  # the same views preprocessed for a separate embedder (--embedder)
    boxes: list[tuple[int, int, int, int]] | None = None  # each view's box in that picture (serving.tiling.view_boxes)


def _thumbnail(img: Image.Image, side: int = OVERLAY_MAX_SIDE) -> Image.Image:
    """A copy of ``img`` at most ``side`` px a side, made without a full-size copy first (``img.copy().thumbnail()``
    doubled the decoded picture's memory for explain=png, outside the decode budget)."""
    scale = side / max(img.size)
    if scale >= 1:
        return img.copy()
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return img.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0)


class ImageChecker:
    """Loads the ONNX model once (or takes any ``Predictor``, e.g. a checkpoint's); ``check`` is safe to call
    from several threads."""

    def __init__(self, model: str | Path | Predictor, threads: int = 1, limits: Limits = Limits(),
                 max_concurrent: int = 1, release_above_rows: int | None = None, gallery: str | None = None,
                 embedder: str | None = None):
        self.model = model if isinstance(model, Predictor) else \
            OnnxModel(model, threads=threads, release_above_rows=release_above_rows)
        self.contract = self.model.contract
        self.pre = self.contract.preprocessing
        self.limits = limits
        self.thresholds = dict(self.contract.thresholds)
        self.never_block = list(self.contract.never_block)
        self.policy = {"source": "model"}
        self.threshold_rules = {k: dict(v) for k, v in self.contract.threshold_rules.items()}
        self.gallery = None
        self.embedder: OnnxModel | None = None  # a separate model whose embedding the gallery was built with
        if embedder:
            from serving.gallery import GalleryError

            if not gallery:
                raise GalleryError(f"an embedder ({embedder}) only serves a gallery's matches: give the gallery too "
                                   "(--gallery / WILDCHECK_GALLERY)")
            self.embedder = OnnxModel(embedder, threads=threads, release_above_rows=release_above_rows)
            if self.embedder.embedding_output is None:
                raise GalleryError(f"{embedder} has no embedding output: give a model from `wildcheck export-embedder`")
        if gallery:  # refused here (GalleryError naming the file) when unreadable or built with another model
            from serving.gallery import Gallery

            self.gallery = Gallery.load(gallery, self.gallery_model.contract,
                                        served_as="embedder" if self.embedder is not None else "model")
        # one inference at a time per worker: onnxruntime threads x concurrent runs must not exceed the cores
        self._slots = threading.Semaphore(max_concurrent)

    @property
    def gallery_model(self) -> OnnxModel:
        """The model whose embedding the gallery is matched with: the embedder if one is served, else the classifier."""
        return self.embedder if self.embedder is not None else self.model

    def apply_policy(self, path: str) -> None:
        """Override thresholds / never_block from a policy YAML (GET /v1/model shows what is in force)."""
        from serving.policy import PolicyError, load_policy, resolve

        policy = load_policy(path)
        r = resolve(policy, self.contract)
        self.thresholds, self.never_block, self.threshold_rules = r.thresholds, r.never_block, r.rules
        notes = dict(r.notes)
        if policy.gallery:
            if self.gallery is None:
                raise PolicyError(f"policy {path} has a gallery section but no gallery is served (--gallery)")
            from serving.gallery import GalleryError

            try:
                notes["gallery"] = self.gallery.apply_policy(policy.gallery)
            except GalleryError as exc:
                raise PolicyError(str(exc)) from exc
        # name and hash, not the server's absolute path (which tells a client about the host's file system)
        sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        self.policy = {"source": Path(path).name, "sha256": sha, "notes": notes,
                       "budgets": {k: v for k, v in r.budgets.items() if v not in (None, [], {})}}

    def warm_up(self) -> None:
        rng = np.random.default_rng(0)
        batch = rng.standard_normal((1, 3, self.pre.input_size, self.pre.input_size), dtype=np.float32)
        for _ in range(3):
            self.model.predict_proba(batch)
        if self.embedder is not None:
            size = self.embedder.preprocessing.input_size
            for _ in range(3):
                self.embedder.embed(rng.standard_normal((1, 3, size, size), dtype=np.float32))

    def prepare(self, data: bytes, content_type: str | None = None) -> tuple[np.ndarray, dict]:
        prepared = self.prepare_full(data, content_type)
        return prepared.views, prepared.meta

    def prepare_full(self, data: bytes, content_type: str | None = None, thumbnail: bool = False) -> Prepared:
        """Decode and preprocess one image; any failure is an ImageError (never a 500 for a hostile file)."""
        try:
            return self._prepare(data, content_type, thumbnail)
        except ImageError:
            raise
        except Exception as exc:
            raise ImageError("corrupt", f"the image could not be decoded: {type(exc).__name__}: {exc}") from exc

    def _prepare(self, data: bytes, content_type: str | None, thumbnail: bool = False) -> Prepared:
        img, info = decode_image(data, max_pixels=self.limits.max_pixels, min_side=self.limits.min_side,
                                 draft_size=draft_size(self.pre, self.contract.tiling),
                                 max_decode_bytes=self.limits.max_decode_bytes)
        meta = {"sha256": hashlib.sha256(data).hexdigest(), "width": info.width, "height": info.height,
                "format": info.format, **content_type_info(content_type, info.format)}
        thumb = _thumbnail(img) if thumbnail else None  # so a batch does not hold every full-size picture
        boxes = view_boxes(img, self.contract.tiling)  # a collage's panels are found once, here
        if self.gallery is not None:  # the same views, each with its pHash (taken after the gallery model's resize)
            from serving.gallery import views_and_hashes

            g = self.gallery_model.contract
            gallery_tiling = g.tiling or self.contract.tiling
            stack, hashes = views_and_hashes(img, g.preprocessing, gallery_tiling,
                                             boxes if gallery_tiling == self.contract.tiling else None)
            meta["phash"] = f"{hashes[0]:016x}"
            meta["_view_hashes"] = hashes
            if self.embedder is not None:
                return Prepared(views(img, self.pre, self.contract.tiling, boxes), meta, img.size, thumb,
                                gallery_views=stack, boxes=boxes)
            return Prepared(stack, meta, img.size, thumb, boxes=boxes)
        return Prepared(views(img, self.pre, self.contract.tiling, boxes), meta, img.size, thumb, boxes=boxes)

    def predict(self, stacks: list[np.ndarray], gallery_stacks: list[np.ndarray] | None = None,
                ) -> tuple[np.ndarray, list[np.ndarray] | None]:
        """Probabilities per picture, from the views ``prepare`` made of each (one forward pass), and with a
        gallery the embeddings of each picture's views (the whole picture first, then its tiles): the
        classifier's own, or with an embedder its pass over ``gallery_stacks``."""
        with self._slots:
            if self.gallery is None:
                return predict_views(self.model, stacks), None
            if self.embedder is not None:
                probs = predict_views(self.model, stacks)
                emb = self.embedder.run(np.concatenate(gallery_stacks), [self.embedder.embedding_output])[0]
                return probs, per_picture(emb, gallery_stacks)
            probs, emb = self.model.predict_with_embedding(np.concatenate(stacks))
        return combine_pictures(probs, stacks, self.model.view_rule), per_picture(emb, stacks)

    def predict_with_cam(self, stacks: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """``predict`` plus each picture's cam outputs (one per view)."""
        with self._slots:
            return predict_views_with_cam(self.model, stacks)

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
            raise ImageError("unknown_label", f"explain_label {shown(label)} is not one of the model's labels "
                             f"{self.contract.labels}")
        return True

    def explanation(self, probs: np.ndarray, cam: np.ndarray, prepared: Prepared, label: str | None) -> dict:
        c = self.contract
        chosen = explained_label(probs, c.labels, c.negative_label, label)
        result = explain(cam, chosen, c.labels, self.pre, *prepared.size, tiling=c.tiling, boxes=prepared.boxes)
        if prepared.thumbnail is not None:
            result.png = overlay_base64(prepared.thumbnail, result.grid)
        return result.model_dump()

    def result(self, probs: np.ndarray, meta: dict, started: float, explanation: dict | None = None,
               embedding: np.ndarray | None = None) -> dict:
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
            **({"explanation": explanation} if explanation is not None else {}),
            "elapsed_ms": round((time.perf_counter() - started) * 1000.0, 2),
            "matches": matches,
        }

    def check(self, data: bytes, content_type: str | None = None, stop: threading.Event | None = None,
              explain: ExplainMode = "false", explain_label: str | None = None) -> dict:
        """``stop``: set by the service when the request timed out or its client left; no inference then.
        With ``explain`` true/png the result carries an ``explanation`` (heat map) for the top protected class."""
        started = time.perf_counter()
        explaining = self.check_explain_request(explain, explain_label)
        prepared = self.prepare_full(data, content_type, thumbnail=explain == "png")
        if stop is not None and stop.is_set():
            raise Abandoned("the request was abandoned before inference")
        return self.finish([prepared], explaining, explain_label, started)[0]

    def finish(self, prepared: list[Prepared], explaining: bool, explain_label: str | None, started: float) -> list[dict]:
        """One forward pass for prepared images -> their results (with explanations when asked)."""
        stacks = [p.views for p in prepared]
        gallery_stacks = [p.gallery_views for p in prepared] if self.embedder is not None else None
        if explaining:
            probs, cams = self.predict_with_cam(stacks)
            embeddings = self.predict(stacks, gallery_stacks)[1] if self.gallery is not None else None  # a second pass: rare
        else:
            (probs, embeddings), cams = self.predict(stacks, gallery_stacks), [None] * len(stacks)
        embeddings = embeddings if embeddings is not None else [None] * len(stacks)
        return [self.result(prob, p.meta, started, self.explanation(prob, cam, p, explain_label) if explaining else None,
                            embedding)
                for p, prob, cam, embedding in zip(prepared, probs, cams, embeddings)]

    def check_many(self, items: list[tuple[bytes, str | None]], explain: ExplainMode = "false",
                   explain_label: str | None = None) -> list[dict]:
        """One forward pass for the readable images; an error entry for each bad one, in request order."""
        started = time.perf_counter()
        explaining = self.check_explain_request(explain, explain_label)
        prepared, results = [], [None] * len(items)
        for i, (data, content_type) in enumerate(items):
            try:
                prepared.append((i, self.prepare_full(data, content_type, thumbnail=explain == "png")))
            except Exception as exc:  # one bad item never sinks the batch
                results[i] = item_error(exc)
        if prepared:
            for (i, _), result in zip(prepared, self.finish([p for _, p in prepared], explaining, explain_label, started)):
                results[i] = result
        return results

    def _gallery_info(self) -> dict:
        """As for the policy, file and folder names only: /v1/model never shows paths on the server."""
        info = self.gallery.describe()
        negatives = info.get("negatives") or {}
        return {**info, "source": Path(self.gallery.source).name,
                "negatives": {**negatives, "roots": [Path(r).name for r in negatives.get("roots", [])]}}

    def describe(self) -> dict:
        c = self.contract
        return {
            "name": c.model_name, "version": c.model_version, "architecture": c.architecture, "labels": c.labels,
            "negative_label": c.negative_label, "precision": c.precision,
            "thresholds": {k: v.model_dump() for k, v in self.thresholds.items()}, "never_block": self.never_block,
            "threshold_rules": self.threshold_rules,
            "policy": self.policy, "temperature": c.temperature, "preprocessing": c.preprocessing.model_dump(),
            "tiling": c.tiling.model_dump() if c.tiling else None, "test_time_views": c.test_time_views,
            "grey_route": c.grey_route.model_dump() if c.grey_route else None,
            "size_route": c.size_route.model_dump() if c.size_route else None,
            "metrics": c.metrics, "created_at": c.created_at, "training_data": c.training_data, "wildcheck_version": c.wildcheck_version,
            "explain": {"available": self.model.has_cam, "cam": c.cam.model_dump() if self.model.has_cam else None},
            "embedding": c.embedding.model_dump() if c.embedding else None,
            "gallery": self._gallery_info() if self.gallery is not None else None,
            "embedder": self._describe_embedder(),
        }

    def _describe_embedder(self) -> dict | None:
        """The separate model galleries are matched with (``--embedder``); None: the classifier's own embedding."""
        if self.embedder is None:
            return None
        from serving.contract import contract_hash

        e = self.embedder.contract
        return {"name": e.model_name, "version": e.model_version, "architecture": e.architecture,
                "contract_hash": contract_hash(e), "preprocessing": e.preprocessing.model_dump(),
                "embedding": e.embedding.model_dump() if e.embedding else None,
                "tiling": e.tiling.model_dump() if e.tiling else None, "training_data": e.training_data}
