"""Edges of the serving path found in review, each with a test that failed on the code before it: a batch's work
is bounded by views (a collage is one forward pass per panel), not only by images, and stops at the deadline."""

from __future__ import annotations

import dataclasses
import importlib
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import REPO, jpeg_bytes, shared_dataset

SHIPPED = REPO / "models" / "wildcheck-ivory.onnx"


def _met() -> Path:
    """Met val, or a clean skip of the test that needs it (a module-level skip would fail collection)."""
    return shared_dataset("met-ivory") / "val"


def _forget_bentoml_metrics() -> None:
    """A second in-process app would fail on BentoML's process-wide Prometheus metrics (as in test_explain)."""
    from prometheus_client import REGISTRY

    for collector, names in list(REGISTRY._collector_to_names.items()):
        if any(name.startswith("bentoml_") for name in names):
            REGISTRY.unregister(collector)


@contextmanager
def _client(settings, bentoml_home: Path):
    """TestClient over a service built with ``settings``; the session's service (conftest) is put back after."""
    from starlette.testclient import TestClient

    from serving.service import build_api

    bentoml_service = importlib.import_module("_bentoml_sdk.service")
    saved = os.environ.get("BENTOML_HOME")
    os.environ["BENTOML_HOME"] = str(bentoml_home)
    previous = bentoml_service._current_service
    _forget_bentoml_metrics()
    try:
        with TestClient(build_api(settings).to_asgi(), raise_server_exceptions=False) as c:
            yield c
    finally:
        bentoml_service.set_current_service(previous)
        _forget_bentoml_metrics()
        os.environ.pop("BENTOML_HOME", None) if saved is None else os.environ.__setitem__("BENTOML_HOME", saved)


def _grid_3x3(first: Path, side: int = 300, gutter: int = 10) -> bytes:
    """A 3x3 collage (white gutters) of ``first`` and eight Met val ceramics, as JPEG."""
    others = sorted((_met() / "other").glob("*.jpg"))[30:38]
    collage = Image.new("RGB", (3 * side + 2 * gutter,) * 2, (255, 255, 255))
    for k, path in enumerate([first, *others]):
        tile = Image.open(path).convert("RGB").resize((side, side))
        collage.paste(tile, ((k % 3) * (side + gutter), (k // 3) * (side + gutter)))
    return jpeg_bytes(collage)


def test_a_batch_over_the_views_budget_is_413_and_runs_no_inference(tmp_path, monkeypatch):
    """32 3x3 collages within every limit (10 views each, 320 forward passes) got 504 after 30 s and kept the worker
    busy after the answer. A batch is now held to WILDCHECK_MAX_BATCH_VIEWS: over it, 413 `too_many_views` before any
    inference; within it, answered (the hairpin collage blocked)."""
    if not SHIPPED.is_file():
        pytest.skip("models/wildcheck-ivory.onnx not present")
    from serving.checker import ImageChecker
    from serving.settings import Settings

    hairpin = _grid_3x3(_met() / "ivory" / "ivory_10591.jpg")
    ceramics = _grid_3x3(sorted((_met() / "other").glob("*.jpg"))[40])
    checker = ImageChecker(str(SHIPPED))
    assert len(checker.prepare_full(hairpin).views) == len(checker.prepare_full(ceramics).views) == 10
    inferred = []
    finish = ImageChecker.finish
    monkeypatch.setattr(ImageChecker, "finish", lambda self, prepared, *a: inferred.extend(prepared) or finish(self, prepared, *a))
    settings = Settings(model=str(SHIPPED), max_batch_views=25, max_body_bytes=20_000_000)
    with _client(settings, tmp_path / "bentoml") as client:
        over = client.post("/v1/check_batch", files=[("image", (f"{k}.jpg", hairpin, "image/jpeg")) for k in range(3)])
        assert over.status_code == 413, over.text
        error = over.json()["error"]
        assert error["code"] == "too_many_views" and "WILDCHECK_MAX_BATCH_VIEWS" in error["message"], error
        assert inferred == []
        within = client.post("/v1/check_batch", files=[("image", ("c.jpg", ceramics, "image/jpeg")),
                                                        ("image", ("h.jpg", hairpin, "image/jpeg"))])
        assert within.status_code == 200, within.text
        assert [r["decision"] for r in within.json()["results"]] == ["allow", "block"]
        assert len(inferred) == 2


def test_a_batch_past_its_deadline_stops_its_inference_between_chunks(service_app, monkeypatch):
    """The batch's forward passes ran as one job: the deadline was checked only before it, so the worker kept
    inferring long after the 504. They now run in jobs of about CHUNK_VIEWS views with the deadline checked between."""
    import serving.service
    from serving.checker import ImageChecker

    client, service = service_app
    monkeypatch.setattr(service.inner, "settings", dataclasses.replace(service.inner.settings, timeout_s=1))
    monkeypatch.setattr(serving.service, "CHUNK_VIEWS", 1, raising=False)
    inferred, lock = [], threading.Lock()
    finish = ImageChecker.finish

    def slow(self, prepared, *args):  # 0.6 s of inference per image
        time.sleep(0.6 * len(prepared))
        with lock:
            inferred.extend(prepared)
        return finish(self, prepared, *args)

    monkeypatch.setattr(ImageChecker, "finish", slow)
    photos = sorted((_met() / "other").glob("*.jpg"))[:4]
    files = [("image", (p.name, p.read_bytes(), "image/jpeg")) for p in photos]
    r = client.post("/v1/check_batch", files=files)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    time.sleep(2.0)  # anything still queued or running would have finished by now
    assert len(inferred) <= 2, f"{len(inferred)} of 4 images inferred after the deadline passed"


def test_views_budget_is_a_setting_that_must_be_above_0(monkeypatch):
    from serving.settings import Settings

    assert Settings.from_env().max_batch_views == 128
    monkeypatch.setenv("WILDCHECK_MAX_BATCH_VIEWS", "40")
    assert Settings.from_env().max_batch_views == 40
    monkeypatch.setenv("WILDCHECK_MAX_BATCH_VIEWS", "0")
    with pytest.raises(ValueError, match="WILDCHECK_MAX_BATCH_VIEWS must be an integer above 0"):
        Settings.from_env()
