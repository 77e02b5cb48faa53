"""Issue 19: what a hostile or broken client could do to the endpoint. Each test failed on the code before it."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import struct
import threading
import time
import tracemalloc
import zlib

import numpy as np
import pytest
from PIL import Image

from serving.imageio import ImageError, decode_image
from tests.conftest import jpeg_bytes, photo


@pytest.fixture(scope="module")
def app(service_app):
    return service_app


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


# --- 1: 16-bit images -------------------------------------------------------------------------------------------

def test_16bit_grey_decodes_without_a_float64_copy():
    """A 3000x3000 16-bit PNG (~30 KB on the wire) used to allocate ~290 MB of float64 arrays in to_rgb."""
    data = _png(Image.fromarray(np.full((3000, 3000), 40000, np.uint16)))
    tracemalloc.start()
    try:
        img, info = decode_image(data)
        _, peak = tracemalloc.get_traced_memory()  # numpy arrays are traced; PIL's own buffers are not
    finally:
        tracemalloc.stop()
    assert info.mode.startswith("I;16") and img.size == (3000, 3000)
    assert peak < 20 * 2**20, f"numpy peak {peak / 2**20:.0f} MiB"
    assert np.asarray(img)[0, 0].tolist() == [156, 156, 156]  # round(40000 / 65535 * 255)


def test_high_bit_depth_conversions_keep_their_values():
    """Integer/strip conversion gives exactly what the float formula gave, for every 16-bit value."""
    from serving.imageio import to_rgb

    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    got = np.asarray(to_rgb(Image.fromarray(values)))[..., 0]
    np.testing.assert_array_equal(got, np.clip(values / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8))
    ints = np.array([[-5, 0, 100, 255]] * 16, np.int32)  # mode I that fits 8 bits: scaled by 255
    assert np.asarray(to_rgb(Image.fromarray(ints, "I")))[0, :, 0].tolist() == [0, 0, 100, 255]
    floats = np.array([[0.0, np.nan, 0.5, 1.0]] * 16, np.float32)
    assert np.asarray(to_rgb(Image.fromarray(floats, "F")))[0, :, 0].tolist() == [0, 0, 127, 255]


def test_decode_memory_limit_counts_bytes_per_pixel():
    """Pixels under the pixel limit can still be too much memory in a 4-byte mode: refused before decoding."""
    rgba = _png(Image.new("RGBA", (400, 400)))
    with pytest.raises(ImageError) as exc:
        decode_image(rgba, max_decode_bytes=1_000_000)  # 400*400*(4+4) = 1.28 MB
    assert exc.value.code == "too_many_pixels" and "MiB" in exc.value.message
    decode_image(_png(Image.new("L", (400, 400))), max_decode_bytes=1_000_000)  # 400*400*(1+4) fits


# --- 5: malformed files -----------------------------------------------------------------------------------------

def _tiff_page2_without_width() -> bytes:
    frames = [Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 255, 0))]
    buf = io.BytesIO()
    frames[0].save(buf, "TIFF", save_all=True, append_images=frames[1:])
    t = bytearray(buf.getvalue())
    first = struct.unpack_from("<I", t, 4)[0]
    second = struct.unpack_from("<I", t, first + 2 + 12 * struct.unpack_from("<H", t, first)[0])[0]
    for i in range(struct.unpack_from("<H", t, second)[0]):
        if struct.unpack_from("<H", t, second + 2 + 12 * i)[0] == 256:  # ImageWidth -> an unknown tag
            struct.pack_into("<H", t, second + 2 + 12 * i, 0x7FFF)
    return bytes(t)


def _gif_cut_in_second_frame() -> bytes:
    frames = [Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()[:121]


MALFORMED = {"tiff page 2 without width": _tiff_page2_without_width, "gif cut in frame 2": _gif_cut_in_second_frame}


@pytest.mark.parametrize("name", MALFORMED)
def test_malformed_multi_frame_files_are_corrupt_not_crashes(name):
    with pytest.raises(ImageError) as exc:
        decode_image(MALFORMED[name]())
    assert exc.value.code == "corrupt" and exc.value.status == 400


def test_one_malformed_file_fails_only_its_batch_item(app):
    client, _ = app
    files = [("image", ("a.jpg", jpeg_bytes(photo(1)), "image/jpeg")),
             ("image", ("b.tif", _tiff_page2_without_width(), "image/tiff")),
             ("image", ("c.gif", _gif_cut_in_second_frame(), "image/gif"))]
    r = client.post("/v1/check_batch", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert "decision" in results[0] and results[1]["error"]["code"] == results[2]["error"]["code"] == "corrupt"
    r = client.post("/v1/check", files={"image": ("b.tif", _tiff_page2_without_width(), "image/tiff")})
    assert r.status_code == 400 and r.json()["error"]["code"] == "corrupt"


# --- 2: abandoned work, bounded queue, readiness ----------------------------------------------------------------

def test_full_queue_answers_503_with_retry_after_and_readyz_says_so(app, monkeypatch):
    """WILDCHECK_MAX_QUEUE=2: two requests in the CPU queue, the third gets 503 overloaded, /readyz 503."""
    from serving.checker import ImageChecker

    client, _ = app
    release, entered = threading.Event(), threading.Semaphore(0)
    original = ImageChecker.check

    def blocked(self, *args, **kwargs):
        entered.release()
        release.wait(10)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ImageChecker, "check", blocked)
    data = jpeg_bytes(photo(2))
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(client.post("/v1/check", content=data)))
               for _ in range(2)]
    for t in threads:
        t.start()
    assert entered.acquire(timeout=10) and entered.acquire(timeout=10)
    try:
        r = client.post("/v1/check", content=data)
        assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
        assert int(r.headers["Retry-After"]) >= 1
        assert client.get("/readyz").status_code == 503
    finally:
        release.set()
        for t in threads:
            t.join(10)
    assert [a.status_code for a in answers] == [200, 200]
    assert client.get("/readyz").status_code == 200 and client.post("/v1/check", content=data).status_code == 200


def test_batch_past_its_deadline_stops_between_images_and_answers_504_json(app, monkeypatch):
    from serving.checker import ImageChecker

    client, service = app
    monkeypatch.setattr(service.inner, "settings", dataclasses.replace(service.inner.settings, timeout_s=1))
    calls = []
    original = ImageChecker.prepare_full  # what the service's batch route decodes each image with

    def slow(self, *args, **kwargs):
        calls.append(time.monotonic())
        time.sleep(0.7)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ImageChecker, "prepare_full", slow)
    files = [("image", (f"{i}.jpg", jpeg_bytes(photo(i)), "image/jpeg")) for i in range(4)]
    r = client.post("/v1/check_batch", files=files)
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
    time.sleep(0.8)  # anything still queued would have started by now
    assert len(calls) == 2, f"{len(calls)} images decoded after the deadline passed"


def test_abandoned_job_is_skipped_and_sets_stop():
    from serving.workqueue import CpuQueue, Expired, Gone, Overloaded

    queue = CpuQueue(threads=1, max_queue=1)
    ran = []

    async def never_gone():
        return False

    async def gone():
        return True

    async def scenario():
        stop = threading.Event()
        with pytest.raises(Expired):  # deadline already passed: nothing runs
            await queue.run(time.monotonic() - 1, never_gone, stop, ran.append, 1)
        assert stop.is_set()
        with pytest.raises(Gone):  # client left: nothing runs
            await queue.run(time.monotonic() + 5, gone, threading.Event(), ran.append, 2)
        stop = threading.Event()
        with pytest.raises(Expired):  # deadline passes while the job runs: stop is set for the job to see
            await queue.run(time.monotonic() + 0.3, never_gone, stop, time.sleep, 0.6)
        assert stop.is_set()
        with queue.admit():
            with pytest.raises(Overloaded):
                with queue.admit():
                    pass
        return await queue.run(time.monotonic() + 5, never_gone, threading.Event(), lambda: "ok")

    assert asyncio.run(scenario()) == "ok" and ran == []
    queue.shutdown()


# --- 6, 10, 11, 13: request shapes -------------------------------------------------------------------------------

def test_two_image_fields_on_check_is_400_pointing_to_batch(app):
    client, _ = app
    files = [("image", ("a.jpg", jpeg_bytes(photo(1)), "image/jpeg")),
             ("image", ("b.jpg", jpeg_bytes(photo(2)), "image/jpeg"))]
    r = client.post("/v1/check", files=files)
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_images"
    assert "/v1/check_batch" in r.json()["error"]["message"]


def test_non_ascii_content_type_is_400_json(app):
    client, _ = app
    r = client.post("/v1/check", content=jpeg_bytes(photo(1)),
                    headers={"Content-Type": b"multipart/form-data; boundary=\xff\xfe"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_content_type"


def test_only_the_exact_docs_paths_skip_the_api_key(app):
    client, _ = app
    r = client.post("/v1/anything/docs", content=b"x" * 1000, headers={"X-API-Key": ""})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = client.post("/v1/check/openapi.json", content=b"x", headers={"X-API-Key": ""})
    assert r.status_code == 401
    assert client.get("/v1/openapi.json", headers={"X-API-Key": ""}).status_code == 200


def test_one_docs_page_open_and_no_redoc(app):
    """/v1/redoc answered 401 with keys on while /v1/docs was open, and fetched its script from a CDN."""
    client, _ = app
    assert client.get("/v1/docs", headers={"X-API-Key": ""}).status_code == 200
    r = client.get("/v1/redoc", headers={"X-API-Key": "k1"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_too_many_batch_files_is_413_batch_too_large(app):
    client, _ = app  # WILDCHECK_MAX_BATCH=4: the multipart parser stops at 5 files
    files = [("image", (f"{i}.jpg", b"x", "image/jpeg")) for i in range(7)]
    r = client.post("/v1/check_batch", files=files)
    assert r.status_code == 413 and r.json()["error"]["code"] == "batch_too_large"


def test_huge_bomb_quotes_the_configured_limit_not_pils():
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)  # 400 M pixels: over PIL's own 2x limit
    bomb = b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b"")
    with pytest.raises(ImageError) as exc:
        decode_image(bomb, max_pixels=1_000_000)
    assert exc.value.code == "too_many_pixels" and "1000000" in exc.value.message
    assert "178956970" not in exc.value.message


def test_unexpected_error_is_500_json(app, monkeypatch):
    from serving.checker import ImageChecker

    client, _ = app

    def broken(self):
        raise RuntimeError("boom")

    monkeypatch.setattr(ImageChecker, "describe", broken)
    r = client.get("/v1/model")
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"


def test_concurrency_limit_answers_429_in_our_shape():
    from starlette.testclient import TestClient

    from serving.middleware import ConcurrencyLimitMiddleware

    inside = threading.Event()
    release = threading.Event()

    async def slow_app(scope, receive, send):
        inside.set()
        await asyncio.get_running_loop().run_in_executor(None, release.wait, 10)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    c = TestClient(ConcurrencyLimitMiddleware(slow_app, limit=1))  # no lifespan: slow_app only speaks http
    first = threading.Thread(target=c.get, args=("/",))
    first.start()
    assert inside.wait(10)
    r = c.get("/")
    release.set()
    first.join(10)
    assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_requests" and r.headers["Retry-After"]


# --- 8: slow bodies ---------------------------------------------------------------------------------------------

def test_slow_body_gets_408_after_the_body_timeout():
    from serving.middleware import BodyLimitMiddleware

    sent = []

    async def app(scope, receive, send):  # pragma: no cover - must not be reached
        sent.append("app")

    async def trickle():
        await asyncio.sleep(0.2)
        return {"type": "http.request", "body": b"x", "more_body": True}

    async def send(message):
        sent.append(message)

    middleware = BodyLimitMiddleware(app, max_bytes=10_000, timeout_s=0.5)
    scope = {"type": "http", "method": "POST", "path": "/v1/check", "headers": []}
    started = time.monotonic()
    asyncio.run(asyncio.wait_for(middleware(scope, trickle, send), 5))
    assert time.monotonic() - started < 2
    assert sent[0]["status"] == 408 and b"body_timeout" in sent[1]["body"]


# --- 7: metrics labels ------------------------------------------------------------------------------------------

def test_metrics_see_unknown_paths_as_other_and_the_app_sees_the_real_path():
    from serving.middleware import RouteLabelMiddleware

    labels, app_paths = [], []

    class FakeMetrics:  # BentoML's middleware labels by scope["path"] and calls the app with the same scope
        def __init__(self, app, **kwargs):
            self.app = app

        async def __call__(self, scope, receive, send):
            labels.append(scope["path"])
            await self.app(scope, receive, send)

    async def app(scope, receive, send):
        app_paths.append(scope["path"])

    middleware = RouteLabelMiddleware(FakeMetrics, app, frozenset({"/v1/check"}))
    for path in ("/v1/check", "/random-1", "/v1/zz/9"):
        asyncio.run(middleware({"type": "http", "path": path, "raw_path": path.encode()}, None, None))
    assert labels == ["/v1/check", "other", "other"] and app_paths == ["/v1/check", "/random-1", "/v1/zz/9"]


# --- 12, 15 ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("keys", [",", " ", " , ", ""])
def test_api_keys_that_parse_to_nothing_refuse_to_start(keys, monkeypatch):
    """Set but empty ("") was auth off, as unset: a secret that templated to an empty string served without keys."""
    from serving.settings import Settings

    monkeypatch.setenv("WILDCHECK_API_KEYS", keys)
    with pytest.raises(ValueError, match="WILDCHECK_API_KEYS"):
        Settings.from_env()
    monkeypatch.setenv("WILDCHECK_API_KEYS", " a , b ")
    assert Settings.from_env().api_keys == {"a", "b"}


def test_api_keys_no_http_client_can_send_refuse_to_start(monkeypatch, tmp_path):
    """`clé` started a server that `wildcheck scan` (httpx: ASCII header values) could never authenticate to;
    scan itself died with UnicodeEncodeError."""
    from serving.client import scan
    from serving.settings import Settings

    monkeypatch.setenv("WILDCHECK_API_KEYS", "good,clé")
    with pytest.raises(ValueError, match="outside printable ASCII"):
        Settings.from_env()
    with pytest.raises(ValueError, match="outside printable ASCII"):
        scan(tmp_path, "http://127.0.0.1:9", tmp_path / "out.jsonl", api_key="clé")


@pytest.mark.parametrize("name,value", [("WILDCHECK_BODY_TIMEOUT_S", "nan"), ("WILDCHECK_MAX_PIXELS", "-5"),
                                        ("WILDCHECK_TIMEOUT_S", "-1"), ("WILDCHECK_MAX_CONCURRENCY", "0"),
                                        ("WILDCHECK_WORKERS", "0"), ("WILDCHECK_BODY_TIMEOUT_S", "inf")])
def test_a_limit_that_would_refuse_every_request_refuses_to_start(name, value, monkeypatch):
    """These started and reported ready, then answered every request 408, 400 too_many_pixels, 504 or 429."""
    from serving.settings import Settings

    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"{name} must be .* above 0, got '{value}'"):
        Settings.from_env()
    monkeypatch.setenv(name, "3")
    Settings.from_env()


def test_model_info_names_the_policy_file_without_its_server_path(onnx_model, tmp_path):
    import hashlib
    import json

    from serving.checker import ImageChecker

    policy = tmp_path / "secret-dir" / "strict.yaml"
    policy.parent.mkdir()
    policy.write_text("classes:\n  ivory: {block: 0.5, review: 0.2}\n")
    checker = ImageChecker(str(onnx_model))
    checker.apply_policy(str(policy))
    info = checker.describe()
    assert info["policy"]["source"] == "strict.yaml" and "secret-dir" not in json.dumps(info)
    assert info["policy"]["sha256"] == hashlib.sha256(policy.read_bytes()).hexdigest()


def test_mutated_files_through_the_http_app_are_never_5xx(app):
    """A slice of the fuzz corpus through /v1/check_batch: each item is a decision or its own 4xx error."""
    from tests.test_fuzz_decode import FORMATS, encoded, mutations

    client, _ = app
    corpus = [d for fmt in sorted(FORMATS) for d in mutations(encoded(fmt), 8, seed=7)]
    for start in range(0, len(corpus), 4):
        files = [("image", (f"{i}.bin", d, "application/octet-stream")) for i, d in enumerate(corpus[start:start + 4])]
        r = client.post("/v1/check_batch", files=files)
        assert r.status_code == 200, r.text
        for item in r.json()["results"]:
            assert "decision" in item or 400 <= item["error"]["status"] < 500, item


def test_decode_memory_budget_serialises_expensive_images_but_not_cheap_ones():
    """Two images that each need 60% of the worker's decode memory run one after the other; a cheap one
    does not wait behind them (the waiting happens on the event loop, not in a pool thread)."""
    from serving.workqueue import CpuQueue

    queue = CpuQueue(threads=3, max_queue=8, memory_bytes=100)
    spans = {}

    def job(name, seconds):
        start = time.monotonic()
        time.sleep(seconds)
        spans[name] = (start, time.monotonic())

    async def never_gone():
        return False

    async def scenario():
        deadline = time.monotonic() + 10
        big = [queue.run(deadline, never_gone, threading.Event(), job, n, 0.4, cost=60) for n in ("a", "b")]
        first = asyncio.gather(*big)
        await asyncio.sleep(0.05)
        await queue.run(deadline, never_gone, threading.Event(), job, "cheap", 0.0, cost=1)
        await first

    asyncio.run(scenario())
    queue.shutdown()
    (a0, a1), (b0, b1) = sorted([spans["a"], spans["b"]])
    assert b0 >= a1 - 0.01, "the second expensive decode started before the first released its memory"
    assert spans["cheap"][1] < b0 and queue.memory_used == 0


def test_the_body_limit_keeps_one_copy_of_an_upload_while_the_app_runs():
    """It held the received chunks and their join beside the app's own copy: 3 copies of every upload, so 60
    concurrent 19 MB bodies took one worker from 0.35 to 3 GB (uvicorn delivers 64 KB chunks)."""
    import asyncio
    import tracemalloc

    from starlette.requests import Request

    from serving.middleware import BodyLimitMiddleware

    size, chunk, seen = 8 * 2**20, 65536, {}

    async def app(scope, receive, send):
        body = await Request(scope, receive).body()
        seen["copies"] = tracemalloc.get_traced_memory()[0] / size
        seen["intact"] = len(body) == size and body[:1] == b"x"

    async def main():
        sent = 0

        async def receive():
            nonlocal sent
            sent += chunk
            return {"type": "http.request", "body": b"x" * chunk, "more_body": sent < size}

        middleware = BodyLimitMiddleware(app, max_bytes=2 * size)
        await middleware({"type": "http", "method": "POST", "headers": [], "path": "/check"}, receive, None)

    tracemalloc.start()
    try:
        asyncio.run(main())
    finally:
        tracemalloc.stop()
    assert seen["intact"] and seen["copies"] < 1.2, seen
