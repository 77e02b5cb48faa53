"""s32: three HTTP edges of the service: an upload cut short, HEAD on a GET route, and BentoML's own 429 backstop."""

from __future__ import annotations

import math

import pytest

from tests.conftest import jpeg_bytes, photo

BOUNDARY = "s32boundary"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


@pytest.fixture(scope="module")
def client(service_app):
    return service_app[0]


def _part(name: str = "image", data: bytes | None = None) -> bytes:
    """One file part of a multipart body, without the delimiter that ends it."""
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="{name}"; filename="a.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n").encode() + (jpeg_bytes(photo(1)) if data is None else data)


CLOSE = f"\r\n--{BOUNDARY}--\r\n".encode()
CUT_SHORT = [
    ("in the photo", _part()),  # the photo's bytes, no delimiter after them
    ("after the photo's delimiter", _part() + f"\r\n--{BOUNDARY}\r\n".encode()),  # the next part never came
    ("in a part's headers", f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"'.encode()),
    ("in the first delimiter", f"--{BOUNDARY}"[:5].encode()),
]


@pytest.mark.parametrize("path", ["/v1/check", "/v1/check_batch"])
@pytest.mark.parametrize("where, body", CUT_SHORT, ids=[c[0] for c in CUT_SHORT])
def test_an_upload_cut_short_is_invalid_multipart_not_missing_field(client, path, where, body):
    """A multipart body that ends before its closing boundary (a client or proxy that cut the upload short) was
    400 `missing_field` ("no 'image' field in the form"): python-multipart drops the unfinished part without a word
    and starlette never asks whether the closing boundary came, so the client was told to rename a field it had
    sent."""
    r = client.post(path, content=body, headers={"Content-Type": MULTIPART})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_multipart", error
    assert "closing boundary" in error["message"] and "send the whole body" in error["message"]


@pytest.mark.parametrize("path", ["/v1/check", "/v1/check_batch"])
def test_the_same_upload_with_its_closing_boundary_is_checked(client, path):
    r = client.post(path, content=_part() + CLOSE, headers={"Content-Type": MULTIPART})
    assert r.status_code == 200, r.text
    result = r.json()["results"][0] if path.endswith("batch") else r.json()
    assert result["decision"] in ("block", "review", "allow")


@pytest.mark.parametrize("path", ["/v1/check", "/v1/check_batch"])
def test_a_whole_form_without_an_image_field_is_still_missing_field(client, path):
    r = client.post(path, content=_part("photo") + CLOSE, headers={"Content-Type": MULTIPART})
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_field", r.text
    # an epilogue after the closing boundary is allowed (RFC 2046 5.1.1): still the whole form
    r = client.post(path, content=_part("photo") + CLOSE + b"trailing epilogue", headers={"Content-Type": MULTIPART})
    assert r.status_code == 400 and r.json()["error"]["code"] == "missing_field", r.text


def test_head_on_model_is_answered_like_get_without_a_body(client):
    """HEAD /v1/model was 405 (FastAPI's `api.get` registers GET only, where starlette's Route adds HEAD);
    HTTP allows HEAD wherever GET is (RFC 9110 9.3.2)."""
    get, head = client.get("/v1/model"), client.head("/v1/model")
    assert get.status_code == 200 and get.json()["labels"]
    assert head.status_code == 200, (head.status_code, head.headers)
    assert head.content == b""
    assert head.headers["content-type"] == get.headers["content-type"] == "application/json"
    assert head.headers["content-length"] == get.headers["content-length"]


def test_head_on_model_needs_the_api_key_like_get(client):
    assert client.head("/v1/model", headers={"X-API-Key": ""}).status_code == 401
    assert client.head("/v1/model", headers={"X-API-Key": "wrong"}).status_code == 401
    assert client.head("/v1/model", headers={"X-API-Key": "k2"}).status_code == 200


def test_head_on_a_post_route_stays_405_with_allow_post(client):
    for path in ("/v1/check", "/v1/check_batch"):
        r = client.head(path)
        assert r.status_code == 405 and r.headers["allow"] == "POST", (path, r.status_code, r.headers)


def test_bentoml_backstop_admits_more_per_worker_than_our_limit(onnx_model):
    """BentoML divides `traffic.max_concurrency` among the workers (_bentoml_impl/server/app.py), and its 429 is
    sent outside our middleware (`{"error": "Too many requests"}`, no Retry-After). Sized per worker as if it were
    not divided, the backstop was the first limit with 3 workers or more (4 workers, WILDCHECK_MAX_CONCURRENCY=64:
    34 per worker against our 64) and with 2 it sat under our limit plus the refusals still draining a body
    (64 + 8 > 68): clients got BentoML's 429 instead of ours."""
    from _bentoml_impl.server.app import ServiceAppFactory

    from serving.middleware import Refusal
    from serving.service import build_api
    from serving.settings import Settings

    draining = Refusal().max_draining  # refusals reading a body hold one of BentoML's permits each
    for workers, ours in [(1, 4), (2, 64), (4, 64), (3, 7)]:
        service = build_api(Settings(model=str(onnx_model), workers=workers, max_concurrency=ours))
        # the factory each worker builds its app with, given the service's config as `bentoml serve` passes it
        factory = ServiceAppFactory(service, is_main=True, enable_metrics=False,
                                    services={service.name: service.config}, enable_access_control=False,
                                    access_control_options={})
        assert factory.max_concurrency >= ours + draining, (workers, ours, factory.max_concurrency)
        assert factory.max_concurrency == math.ceil(service.config["traffic"]["max_concurrency"] / workers)


@pytest.mark.parametrize("method, path, allow", [
    ("HEAD", "/v1/check_batch", "POST"),
    ("GET", "/v1/check", "POST"),
    ("PUT", "/v1/check_batch", "POST"),
    ("POST", "/v1/model", "GET, HEAD"),
    ("DELETE", "/v1/model", "GET, HEAD"),
])
def test_a_405_on_our_routes_names_the_allowed_methods(client, method, path, allow):
    """A 405 must carry `Allow` (RFC 9110 15.5.6): ours went without it (the HTTP error handler dropped the header
    starlette gives, and the fallback route never set one)."""
    r = client.request(method, path)
    assert r.status_code == 405 and r.headers.get("allow") == allow, (r.status_code, r.headers)
    if method != "HEAD":
        assert r.json()["error"]["code"] == "method_not_allowed"


def test_head_on_an_unknown_path_is_404_like_get(client):
    assert client.get("/v1/nope").status_code == 404
    assert client.head("/v1/nope").status_code == 404
