"""The service class called directly and over HTTP in-process (starlette TestClient)."""

import io

import numpy as np
import pytest
from PIL import Image

from tests.conftest import jpeg_bytes, photo


@pytest.fixture(scope="module")
def client(service_app):
    """TestClient over the service's ASGI app, with API keys and a small body limit configured."""
    return service_app[0]


def _synth_jpeg(label, seed, size=256):
    from training.data.synth import make_image

    return jpeg_bytes(make_image(label, seed, size))


def test_service_class_called_directly(onnx_model, monkeypatch):
    from serving.checker import ImageChecker

    checker = ImageChecker(str(onnx_model))
    checker.warm_up()
    result = checker.check(_synth_jpeg("tiger_skin", 5), "image/jpeg")
    assert result["decision"] in ("block", "review", "allow")
    assert set(result["scores"]) == {"ivory", "other", "pangolin_scales", "tiger_skin"}
    assert abs(sum(result["scores"].values()) - 1) < 1e-4
    assert result["model"]["version"].startswith("9.9.9+") and len(result["image"]["sha256"]) == 64


def test_check_multipart_and_raw_body_agree(client):
    data = _synth_jpeg("tiger_skin", 11)
    a = client.post("/v1/check", files={"image": ("x.jpg", data, "image/jpeg")})
    b = client.post("/v1/check", content=data, headers={"Content-Type": "image/jpeg"})
    assert a.status_code == b.status_code == 200, a.text
    ja, jb = a.json(), b.json()
    assert ja["scores"] == jb["scores"] and ja["image"]["format"] == "JPEG" and ja["image"]["width"] == 256
    assert ja["label"] == max(ja["scores"], key=ja["scores"].get)


def test_batch_keeps_order_and_isolates_bad_items(client):
    files = [("image", ("a.jpg", _synth_jpeg("ivory", 1), "image/jpeg")),
             ("image", ("b.jpg", b"garbage", "image/jpeg")),
             ("image", ("c.jpg", _synth_jpeg("other", 2), "image/jpeg"))]
    r = client.post("/v1/check_batch", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == 3 and "decision" in results[0] and "decision" in results[2]
    assert results[1]["error"]["code"] == "not_an_image"
    single = client.post("/v1/check", files={"image": ("a.jpg", _synth_jpeg("ivory", 1), "image/jpeg")}).json()
    np.testing.assert_allclose(list(results[0]["scores"].values()), list(single["scores"].values()), atol=1e-5)


def test_a_text_field_among_batch_files_fails_only_its_own_entry(client):
    """Before: a URL sent as text among the image files made the whole batch a 400 not_a_file."""
    r = client.post("/v1/check_batch", data={"image": "http://169.254.169.254/latest/meta-data"},
                    files=[("image", ("a.jpg", _synth_jpeg("ivory", 1), "image/jpeg"))])
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert r.json()["count"] == 2 and results[0]["error"]["code"] == "not_a_file" and "decision" in results[1]


def test_an_unknown_explain_label_is_not_echoed_whole(client):
    """Before: a 5,000-character explain_label came back whole in the error message."""
    r = client.post("/v1/check?explain=true&explain_label=" + "x" * 5000,
                    files={"image": ("a.jpg", _synth_jpeg("ivory", 1), "image/jpeg")})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_label"
    assert len(r.json()["error"]["message"]) < 300


def test_model_endpoint_and_openapi(client):
    info = client.get("/v1/model").json()
    assert info["labels"] == ["ivory", "other", "pangolin_scales", "tiger_skin"]
    assert info["preprocessing"]["input_size"] == 64 and "val" in info["metrics"]
    spec = client.get("/v1/openapi.json").json()
    assert {"/check", "/check_batch", "/model"} <= set(spec["paths"])


def _png(size=(64, 64)):
    buf = io.BytesIO()
    photo(3, size).save(buf, "PNG")
    return buf.getvalue()


BAD_INPUTS = [
    ("empty body", dict(content=b"", headers={"Content-Type": "image/jpeg"}), 400, "empty"),
    ("text file", dict(files={"image": ("a.txt", b"hello world", "text/plain")}), 400, "not_an_image"),
    ("truncated jpeg", dict(files={"image": ("t.jpg", jpeg_bytes(photo(1))[:500], "image/jpeg")}), 400, "corrupt"),
    ("icon outside the allow-list", dict(files={"image": ("a.ico", None, "image/x-icon")}), 415, "unsupported_format"),
    ("url in file field", dict(data={"image": "http://169.254.169.254/latest/meta-data"}), 400, "not_a_file"),
    ("missing field", dict(files={"photo": ("a.jpg", jpeg_bytes(photo(1)), "image/jpeg")}), 400, "missing_field"),
    ("1x1 image", dict(files={"image": ("one.png", None, "image/png")}), 400, "too_small"),
    ("16x40000 sliver", dict(files={"image": ("sliver.png", None, "image/png")}), 400, "extreme_aspect_ratio"),
    ("json body", dict(json={"url": "http://example.com/a.jpg"}), 400, "not_a_file"),
]


@pytest.mark.parametrize("name,kwargs,status,code", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_get_specific_4xx_json(client, name, kwargs, status, code):
    if name == "1x1 image":
        buf = io.BytesIO()
        Image.new("RGB", (1, 1)).save(buf, "PNG")
        kwargs = dict(files={"image": ("one.png", buf.getvalue(), "image/png")})
    if name == "16x40000 sliver":
        buf = io.BytesIO()
        Image.new("RGB", (16, 40000)).save(buf, "PNG")
        kwargs = dict(files={"image": ("sliver.png", buf.getvalue(), "image/png")})
    if name == "icon outside the allow-list":
        buf = io.BytesIO()
        photo(6).save(buf, "ICO")
        kwargs = dict(files={"image": ("a.ico", buf.getvalue(), "image/x-icon")})
    r = client.post("/v1/check", **kwargs)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code and r.json()["error"]["message"]


def test_media_types_are_read_case_insensitively(client):
    """`Multipart/Form-Data` was decoded as a raw image (400 not_an_image) and `Text/Plain` holding a URL got
    not_an_image instead of not_a_file: media types are case-insensitive."""
    import uuid

    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + _png() + f"\r\n--{boundary}--\r\n".encode()
    r = client.post("/v1/check", content=body, headers={"Content-Type": f"Multipart/Form-Data; boundary={boundary}"})
    assert r.status_code == 200 and r.json()["decision"] in ("allow", "review", "block"), r.text
    r = client.post("/v1/check", content=b"http://169.254.169.254/", headers={"Content-Type": "Text/Plain"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "not_a_file"


@pytest.mark.parametrize("declared", ["image/jpeg", "image/jpg", "text/plain"])
def test_declared_type_never_stops_a_check_but_a_mismatch_is_flagged(client, declared):
    """A PNG sent as image/jpeg (or the unregistered image/jpg, or text/plain) is still checked (issue 19.16):
    a 4xx here would let a seller make a photo go unchecked. The answer says what was declared and found."""
    png = _png()
    r = client.post("/v1/check", files={"image": ("p.jpg", png, declared)})
    assert r.status_code == 200, r.text
    image = r.json()["image"]
    assert image["format"] == "PNG" and image["declared_type"] == declared and image["detected_type"] == "image/png"
    assert image["type_mismatch"] is True
    same = client.post("/v1/check", files={"image": ("p.png", png, "image/png")}).json()
    assert same["scores"] == r.json()["scores"] and same["image"]["type_mismatch"] is False
    jpg = client.post("/v1/check", files={"image": ("p.jpg", jpeg_bytes(photo(1)), "image/jpg")}).json()
    assert jpg["image"]["type_mismatch"] is False  # image/jpg is a sloppy name for image/jpeg, not a mismatch


def test_oversize_body_and_bomb(client):
    r = client.post("/v1/check", content=b"\xff" * 2_100_000, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    bomb = io.BytesIO()
    Image.new("1", (9000, 9000)).save(bomb, "PNG")
    r = client.post("/v1/check", files={"image": ("bomb.png", bomb.getvalue(), "image/png")})
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_pixels"


def test_api_keys(client):
    data = _synth_jpeg("other", 3)
    r = client.post("/v1/check", content=data, headers={"X-API-Key": "wrong", "Content-Type": "image/jpeg"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    r = client.post("/v1/check", content=data, headers={"X-API-Key": "", "Authorization": "Bearer k2",
                                                         "Content-Type": "image/jpeg"})
    assert r.status_code == 200, r.text
    assert client.get("/readyz", headers={"X-API-Key": ""}).status_code == 200  # health stays open


def test_unknown_route_is_json_404(client):
    r = client.get("/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.get("/v1/check")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_server_preprocessing_matches_evaluation_on_real_jpegs(onnx_model):
    """The server's bytes -> array path equals evaluation's file -> array path on real photos."""
    from serving.checker import ImageChecker
    from tests.conftest import shared_dataset
    from training.data.sources import Sample
    from serving.tiling import views
    from training.predict import decode_sample

    root = shared_dataset("met-ivory")
    checker = ImageChecker(str(onnx_model))
    tiling = checker.contract.tiling
    paths = sorted((root / "val" / "ivory").glob("*.jpg"))[:8]
    for path in paths:
        served, _ = checker.prepare(path.read_bytes(), "image/jpeg")
        evaluated = views(decode_sample(Sample(path, "ivory", "val"), checker.contract), checker.pre, tiling)
        np.testing.assert_array_equal(served, evaluated)
