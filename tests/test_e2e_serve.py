"""End to end through a real `bentoml serve` process, started the way users start it (`wildcheck serve`)."""

import contextlib
import hashlib
import io
import json
import os
import sys
from pathlib import Path

import httpx
import pytest
from PIL import Image

from serving.launch import ServerNotReady, ServerProcess, free_port
from tests.conftest import jpeg_bytes, photo

pytestmark = pytest.mark.slow


def test_a_content_type_that_is_not_utf8_gets_the_whole_400_json(server):
    """Over a real socket: BentoML's access log sits outside our middleware and decoded the header as UTF-8,
    so the client got a status line and a cut connection (the in-process test client never saw it)."""
    import socket

    base, _ = server
    host, port = base.removeprefix("http://").split(":")
    body = _jpeg()
    request = (b"POST /v1/check HTTP/1.1\r\nHost: x\r\nX-API-Key: secret\r\nContent-Type: image/j\xe9pg\r\n"
               b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)) + body
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer[:300]
    assert json.loads(payload)["error"]["code"] == "invalid_content_type"


@pytest.fixture(scope="module")
def server(onnx_model, tmp_path_factory):
    with _serve(onnx_model, tmp_path_factory.mktemp("e2e")) as running:
        yield running


@contextlib.contextmanager
def _serve(model, folder, extra_args=()):
    """`wildcheck serve` with an API key and a 3 MB body limit; yields (base URL, auth header)."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = dict(os.environ, BENTOML_HOME=str(folder / "bentoml"), BENTOML_DO_NOT_TRACK="true",
               WILDCHECK_API_KEYS="secret", WILDCHECK_MAX_BODY_BYTES=str(3_000_000))
    wildcheck = str(Path(sys.executable).parent / "wildcheck")
    argv = [wildcheck, "serve", *([str(model)] if model else []), "--port", str(port), "--host", "127.0.0.1", *extra_args]
    server = ServerProcess(argv, port, folder / "server.log", env=env, ready_timeout=90)
    try:
        server.wait_ready()
    except ServerNotReady as exc:
        pytest.fail(str(exc))
    try:
        yield server.base, {"X-API-Key": "secret"}
    finally:
        server.stop()


def _jpeg(label="ivory", seed=1, size=256):
    from training.data.synth import make_image

    return jpeg_bytes(make_image(label, seed, size))


def test_real_jpeg_batch_model_health_metrics(server):
    base, auth = server
    r = httpx.post(base + "/v1/check", files={"image": ("a.jpg", _jpeg(), "image/jpeg")}, headers=auth, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["decision"] in ("block", "review", "allow") and body["model"]["version"].startswith("9.9.9+")
    r = httpx.post(base + "/v1/check_batch", headers=auth, timeout=30,
                   files=[("image", (f"{i}.jpg", _jpeg("other", i), "image/jpeg")) for i in range(3)])
    assert r.status_code == 200 and r.json()["count"] == 3
    assert httpx.get(base + "/v1/model", headers=auth).json()["labels"][0] == "ivory"
    assert httpx.get(base + "/readyz").status_code == 200 and httpx.get(base + "/livez").status_code == 200
    metrics = httpx.get(base + "/metrics")
    assert metrics.status_code == 200 and "bentoml" in metrics.text


def _bad_matrix():
    png = io.BytesIO()
    photo(2, (64, 64)).save(png, "PNG")
    one = io.BytesIO()
    Image.new("RGB", (1, 1)).save(one, "PNG")
    bomb = io.BytesIO()
    Image.new("1", (9000, 9000)).save(bomb, "PNG")
    good = jpeg_bytes(photo(3))
    ico = io.BytesIO()
    photo(4).save(ico, "ICO")
    return [
        ("empty body", dict(content=b"", headers={"Content-Type": "image/jpeg"}), 400),
        ("text file", dict(files={"image": ("a.txt", b"just text", "text/plain")}), 400),
        ("truncated jpeg", dict(files={"image": ("t.jpg", good[: len(good) // 3], "image/jpeg")}), 400),
        ("icon (outside the allow-list)", dict(files={"image": ("i.ico", ico.getvalue(), "image/x-icon")}), 415),
        ("oversize body", dict(content=b"\0" * 3_100_000, headers={"Content-Type": "image/jpeg"}), 413),
        ("decompression bomb", dict(files={"image": ("b.png", bomb.getvalue(), "image/png")}), 400),
        ("1x1 image", dict(files={"image": ("o.png", one.getvalue(), "image/png")}), 400),
        ("url in file field", dict(data={"image": "http://127.0.0.1:1/secret.jpg"}), 400),
        ("missing field", dict(files={"file": ("g.jpg", good, "image/jpeg")}), 400),
    ]


def test_bad_input_matrix_is_4xx_json_never_5xx(server):
    base, auth = server
    for name, kwargs, status in _bad_matrix():
        headers = {**auth, **kwargs.pop("headers", {})}
        r = httpx.post(base + "/v1/check", headers=headers, timeout=30, **kwargs)
        assert r.status_code == status, f"{name}: {r.status_code} {r.text[:300]}"
        error = r.json()["error"]
        assert error["code"] and error["message"], name
    r = httpx.post(base + "/v1/check", files={"image": ("a.jpg", _jpeg(), "image/jpeg")},
                   headers={"X-API-Key": "wrong"}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    # outside /v1 too (BentoML's own routes answered in text/plain before; tests/test_s31_json_errors.py)
    wrong_path, wrong_method = httpx.get(base + "/nope", timeout=30), httpx.post(base + "/readyz", timeout=30)
    assert wrong_path.status_code == 404 and wrong_path.json()["error"]["code"] == "not_found"
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"


def test_scan_client_summary_and_resume(server, tmp_path):
    from serving.client import scan

    base, auth = server
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(4):
        (folder / f"{i}.jpg").write_bytes(_jpeg("other", i))
    (folder / "broken.jpg").write_bytes(b"not really a jpeg")
    out = tmp_path / "scan.jsonl"
    first = scan(folder, base, out, concurrency=3, api_key="secret")
    assert first["images"] == 5 and first["checked"] == 5 and first.get("error") == 1
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and sum("decision" in r for r in rows) == 4
    assert next(r for r in rows if r["path"].endswith("broken.jpg"))["error"]["code"] == "not_an_image"
    again = scan(folder, base, out, concurrency=3, api_key="secret")
    assert again["already_done"] == 5 and again["checked"] == 0
    assert len(out.read_text().splitlines()) == 5


def test_scan_retries_then_leaves_failures_for_the_next_run(tmp_path):
    from serving.client import scan

    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(_jpeg("other", 1))
    out = tmp_path / "scan.jsonl"
    dead = f"http://127.0.0.1:{free_port()}"
    result = scan(folder, dead, out, retries=2, backoff=0.01)
    assert result["retry later"] == 1
    assert scan(folder, dead, out, retries=0, backoff=0.01)["checked"] == 1  # retried, not skipped


def test_policy_file_changes_a_served_decision(server, onnx_model, tmp_path):
    base, auth = server
    image = {"image": ("a.jpg", _jpeg("other", 7), "image/jpeg")}
    default = httpx.post(base + "/v1/check", files=image, headers=auth, timeout=30).json()
    policy = tmp_path / "policy.yaml"
    policy.write_text("classes:\n" + "".join(f"  {c}: {{block: 0.0, review: 0.0}}\n"
                                             for c in ("ivory", "pangolin_scales", "tiger_skin")))
    with _serve(onnx_model, tmp_path / "srv", ["--policy", str(policy)]) as (base2, auth2):
        strict = httpx.post(base2 + "/v1/check", files=image, headers=auth2, timeout=30).json()
        info = httpx.get(base2 + "/v1/model", headers=auth2).json()
    assert strict["decision"] == "block" and strict["scores"] == default["scores"]
    assert strict["thresholds"]["ivory"] == {"block": 0.0, "review": 0.0} != default["thresholds"]["ivory"]
    assert info["policy"]["source"] == "policy.yaml" and str(tmp_path) not in json.dumps(info)  # no server path
    assert info["policy"]["sha256"] == hashlib.sha256(policy.read_bytes()).hexdigest()


def test_serve_registry_serves_the_promoted_version(trained_run, tmp_path):
    """`wildcheck promote` then `wildcheck serve --registry`: the endpoint answers with the promoted version."""
    from training.registry import promote

    registry = tmp_path / "registry"
    promoted = promote(trained_run, registry, version="4.2.0")
    with _serve(None, tmp_path / "srv", ["--registry", str(registry)]) as (base, auth):
        info = httpx.get(base + "/v1/model", headers=auth).json()
        r = httpx.post(base + "/v1/check", files={"image": ("a.jpg", _jpeg(), "image/jpeg")}, headers=auth, timeout=30)
    assert promoted["version"].startswith("4.2.0")
    assert r.status_code == 200 and r.json()["model"]["version"] == promoted["version"]
    assert info["version"] == promoted["version"] and info["name"] == promoted["name"]


def test_random_paths_do_not_grow_metrics(server):
    """Issue 19.7: unknown paths are counted as endpoint="other", not one Prometheus series each."""
    base, auth = server
    with httpx.Client(timeout=30) as client:
        for i in range(150):
            client.get(f"{base}/v1/no-such-{i}" if i % 2 else f"{base}/zz{i}", headers=auth)
        text = client.get(base + "/metrics").text
    assert "no-such-" not in text and "/zz" not in text
    assert 'endpoint="other"' in text and 'endpoint="/v1/check"' in text
