"""Heat maps (class activation maps in the ONNX graph): geometry, endpoint, CLI, old models, real ivory collages."""

from __future__ import annotations

import base64
import importlib
import io
import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image, ImageOps

from serving.explain import heat_grid
from serving.preprocess import Preprocessing
from tests.conftest import REPO, jpeg_bytes, shared_dataset

IVORY_MODEL = REPO / "models" / "wildcheck-ivory.onnx"


def _forget_bentoml_metrics() -> None:
    """BentoML registers its request metrics in prometheus' process-wide registry when an app starts; a second
    in-process app (another test module, another model) would fail with DuplicateTimeseries."""
    from prometheus_client import REGISTRY

    for collector, names in list(REGISTRY._collector_to_names.items()):
        if any(name.startswith("bentoml_") for name in names):
            REGISTRY.unregister(collector)


@contextmanager
def _service_client(model: Path, bentoml_home: Path):
    """TestClient over the service serving ``model`` (no API keys); restores the environment afterwards."""
    from starlette.testclient import TestClient

    from serving.service import build_api
    from serving.settings import Settings

    bentoml_service = importlib.import_module("_bentoml_sdk.service")  # the package attribute is the decorator

    saved = os.environ.get("BENTOML_HOME")
    os.environ["BENTOML_HOME"] = str(bentoml_home)
    # BentoML keeps one current service instance per process and routes every in-process request to it; this
    # service replaces the session's (conftest.service_app) and clears it on shutdown, so put the other back
    previous = bentoml_service._current_service
    _forget_bentoml_metrics()
    try:
        with TestClient(build_api(Settings(model=str(model))).to_asgi()) as c:
            yield c
    finally:
        bentoml_service.set_current_service(previous)
        _forget_bentoml_metrics()
        os.environ.pop("BENTOML_HOME", None) if saved is None else os.environ.__setitem__("BENTOML_HOME", saved)


@pytest.fixture(scope="module")
def client(onnx_model, tmp_path_factory):
    with _service_client(onnx_model, tmp_path_factory.mktemp("bentoml")) as c:
        yield c


@pytest.fixture(scope="module")
def legacy_model(onnx_model, tmp_path_factory) -> Path:
    """The same model as exported before heat maps: only the ``logits`` output, no ``wildcheck.cam`` metadata."""
    path = tmp_path_factory.mktemp("legacy") / "legacy.onnx"
    onnx.utils.extract_model(str(onnx_model), str(path), ["image"], ["logits"])
    legacy, full = onnx.load(str(path)), onnx.load(str(onnx_model))
    for prop in full.metadata_props:
        if prop.key != "wildcheck.cam":
            legacy.metadata_props.add(key=prop.key, value=prop.value)
    onnx.save(legacy, str(path))
    return path


def _scene(size=(300, 180), seed=3) -> Image.Image:
    """A wide synthetic listing photo whose left and right halves differ (so mirroring changes it)."""
    from training.data.synth import make_image

    left = make_image("tiger_skin", seed, 180).resize((150, 180))
    right = make_image("other", seed + 1, 180).resize((150, 180))
    img = Image.new("RGB", (300, 180))
    img.paste(left, (0, 0)), img.paste(right, (150, 0))
    return img.resize(size)


def test_cam_output_is_each_locations_share_of_the_logits(onnx_model):
    """logits come first; the cam output averages to exactly the logits (a CAM, not some other map)."""
    from serving.runtime import OnnxModel

    model = OnnxModel(onnx_model)
    assert [o.name for o in model.session.get_outputs()] == ["logits", "cam", "embedding"]  # logits first
    assert model.contract.cam.output == "cam" and model.contract.cam.shape == [4, 2, 2]  # 64 px input -> 2 x 2 map
    pre = model.preprocessing
    batch = np.stack([pre(_scene(seed=s)) for s in range(3)])
    logits, cam = model.predict_with_cam(batch)
    assert cam.shape == (3, 4, 2, 2)
    np.testing.assert_allclose(cam.mean(axis=(2, 3)), logits, atol=1e-4)
    np.testing.assert_allclose(model.predict_logits(batch), logits, atol=1e-5)


def test_grid_maps_the_crop_back_onto_the_whole_picture():
    """A hot top-right feature cell lands top-right of the centre crop of a wide picture; outside the crop is 0."""
    pre = Preprocessing(input_size=224, crop_pct=0.875)  # 512 x 256 -> resized 512 x 256, crop x 144..368, y 16..240
    evidence = np.zeros((7, 7), np.float32)
    evidence[0, 6] = 3.0
    grid = heat_grid(evidence, pre, 512, 256)
    assert grid.shape == (32, 64) and grid.max() == pytest.approx(1.0)  # cells of 8 resized px
    # that cell's centre is x = 144 + 6.5 * 32 = 352, y = 16 + 16 = 32, and it holds up to the crop's corner
    rows, cols = np.nonzero(grid > 0.99)
    assert set(rows) == {2, 3} and set(cols) == {44, 45}
    assert grid[:, :18].max() == 0 and grid[:, 46:].max() == 0  # left and right of the crop
    assert grid[:2].max() == 0 and grid[30:].max() == 0  # above and below it
    assert heat_grid(-evidence, pre, 512, 256).max() == 0  # evidence against the class is not shown


def test_grid_covers_the_tiles_of_a_tiled_model():
    """With tiling, a tile's evidence lands in that tile's part of the picture, beyond the whole view's crop."""
    from serving.explain import view_boxes
    from serving.tiling import Tiling

    pre = Preprocessing(input_size=224, crop_pct=0.875)
    boxes = view_boxes(Tiling(grid=2), 512, 512)
    assert boxes == [(0, 0, 512, 512), (0, 0, 256, 256), (256, 0, 512, 256), (0, 256, 256, 512), (256, 256, 512, 512)]
    evidence = np.zeros((5, 7, 7), np.float32)
    evidence[4, 6, 6] = 2.0  # bottom-right corner of the bottom-right tile's crop: outside the whole view's crop
    evidence[0, 3, 3] = 1.0  # the whole view's centre, weaker
    grid = heat_grid(evidence, pre, 512, 512, boxes)
    row, col = np.unravel_index(grid.argmax(), grid.shape)
    assert grid.shape == (32, 32) and row >= 28 and col >= 28  # crop of tile 4 ends at 256 + 16 + 224 = 496 px
    # the centre keeps its own, weaker evidence: cells 15 and 16 sit 1/8 of a map cell off its centre
    np.testing.assert_allclose(grid[15:17, 15:17], 0.875 ** 2 / 2, atol=1e-4)


def test_mirroring_the_photo_mirrors_the_grid(onnx_model):
    """A wide photo: the crop margins and every class's map must mirror with it (a crop mapped back to the
    wrong place, or rows/columns swapped, would not)."""
    from serving.checker import ImageChecker

    checker = ImageChecker(str(onnx_model))
    img = _scene()
    shown = 0
    for label in checker.contract.labels:
        a = checker.check(jpeg_bytes(img), "image/jpeg", explain="true", explain_label=label)["explanation"]
        b = checker.check(jpeg_bytes(ImageOps.mirror(img)), "image/jpeg", explain="true", explain_label=label)["explanation"]
        ga, gb = np.array(a["grid"]), np.array(b["grid"])
        assert ga.shape == gb.shape == (a["rows"], a["cols"]) and a["cols"] > a["rows"]
        assert np.abs(ga - gb[:, ::-1]).mean() < 0.1, f"{label}: the mirrored photo's grid is not the mirrored grid"
        assert ga[:, 0].max() == ga[:, -1].max() == 0  # left and right of the centre crop
        shown += ga.max() == 1.0
    assert shown  # at least one class has evidence to show


def test_endpoint_grid_equals_cli_grid_and_png_overlay(client, onnx_model, tmp_path):
    from typer.testing import CliRunner

    from training.cli import app

    photo_path = tmp_path / "photo.jpg"
    photo_path.write_bytes(jpeg_bytes(_scene((260, 200), seed=7)))
    plain = client.post("/v1/check", files={"image": ("p.jpg", photo_path.read_bytes(), "image/jpeg")})
    r = client.post("/v1/check?explain=true", files={"image": ("p.jpg", photo_path.read_bytes(), "image/jpeg")})
    assert plain.status_code == r.status_code == 200, r.text
    served = r.json()
    assert plain.json()["explanation"] is None and served["scores"] == plain.json()["scores"]
    e = served["explanation"]
    protected = {k: v for k, v in served["scores"].items() if k != "other"}
    assert e["label"] == max(protected, key=protected.get) and e["png"] is None
    grid = np.array(e["grid"])
    assert grid.shape == (e["rows"], e["cols"]) and grid.min() >= 0 and grid.max() == 1.0

    out = tmp_path / "overlays"
    result = CliRunner().invoke(app, ["explain", str(onnx_model), str(photo_path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    (record,) = json.loads((out / "explanations.json").read_text())
    assert record["label"] == e["label"] and record["grid"] == e["grid"]
    with Image.open(out / record["overlay"]) as overlay:
        assert overlay.format == "PNG" and overlay.size == (260, 200)
    assert sorted(p.name for p in out.iterdir()) == ["explanations.json", "photo.png"]  # no temporaries left

    r = client.post("/v1/check?explain=png&explain_label=pangolin_scales",
                    files={"image": ("p.jpg", photo_path.read_bytes(), "image/jpeg")})
    e = r.json()["explanation"]
    assert e["label"] == "pangolin_scales"
    with Image.open(io.BytesIO(base64.b64decode(e["png"]))) as png:  # from the (JPEG-draft) decoded photo
        assert png.format == "PNG" and png.size[0] / png.size[1] == pytest.approx(1.3, abs=0.02)


def test_cli_explains_a_folder_and_reports_what_it_could_not(onnx_model, tmp_path):
    """A folder is its photos (recursively, hidden files and folders left out); a missing file is reported
    beside the others instead of sinking the batch. The folder was read as one corrupt 'image' before."""
    from typer.testing import CliRunner

    from training.cli import app

    photos = tmp_path / "photos"
    (photos / "shop_a").mkdir(parents=True)
    (photos / ".thumbnails").mkdir()
    (photos / "shop_a" / "vase.jpg").write_bytes(jpeg_bytes(_scene((200, 160), seed=1)))
    (photos / "tusk.jpg").write_bytes(jpeg_bytes(_scene((180, 220), seed=2)))
    (photos / "._tusk.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")  # macOS copies add these
    (photos / ".thumbnails" / "tusk.jpg").write_bytes(jpeg_bytes(_scene((32, 32), seed=3)))
    (photos / "notes.txt").write_text("not a photo")
    out = tmp_path / "overlays"
    result = CliRunner().invoke(app, ["explain", str(onnx_model), str(photos), str(tmp_path / "gone.jpg"),
                                      "--out", str(out)])
    assert result.exit_code == 1, result.output  # something was not explained
    records = json.loads((out / "explanations.json").read_text())
    assert [Path(r["image"]).name for r in records] == ["vase.jpg", "tusk.jpg", "gone.jpg"]
    assert all("overlay" in r for r in records[:2]) and records[2]["error"] == "not found: no such file"
    assert sorted(p.name for p in out.iterdir()) == ["explanations.json", "tusk.png", "vase.png"]

    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    (tmp_path / "empty" / ".hidden" / "x.jpg").write_bytes(jpeg_bytes(_scene((64, 64), seed=4)))
    result = CliRunner().invoke(app, ["explain", str(onnx_model), str(tmp_path / "empty"), "--out", str(tmp_path / "o2")])
    assert result.exit_code == 2 and "no images under" in result.output
    assert not (tmp_path / "o2").exists()  # nothing written for a mistake


def test_cli_explain_refuses_an_out_that_holds_the_images(onnx_model, tmp_path):
    """Overlays are named after their image: with --out the photo folder, p.png was replaced by its own overlay.
    An --out holding any image being explained is refused before anything is written."""
    from typer.testing import CliRunner

    from training.cli import app

    photos = tmp_path / "photos"
    (photos / "shop").mkdir(parents=True)
    _scene((200, 160), seed=1).save(photos / "p.png")
    (photos / "shop" / "q.jpg").write_bytes(jpeg_bytes(_scene((180, 220), seed=2)))
    before = {p: p.read_bytes() for p in photos.rglob("*") if p.is_file()}
    for images, out in [(photos, photos), (photos / "p.png", photos), (photos / "shop", tmp_path)]:
        result = CliRunner().invoke(app, ["explain", str(onnx_model), str(images), "--out", str(out)])
        assert result.exit_code == 2 and "holds images being explained" in result.output.replace("\n", ""), result.output
    assert {p: p.read_bytes() for p in photos.rglob("*") if p.is_file()} == before  # nothing written or replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]
    result = CliRunner().invoke(app, ["explain", str(onnx_model), str(photos), "--out", str(tmp_path / "overlays")])
    assert result.exit_code == 0, result.output  # a folder beside the photos is fine


def test_explain_errors_and_batch(client):
    good = jpeg_bytes(_scene(seed=11))
    for query in ("", "?explain=true", "?explain=png"):  # a bad image gets the same 4xx with or without explain
        r = client.post("/v1/check" + query, files={"image": ("t.jpg", good[:400], "image/jpeg")})
        assert r.status_code == 400 and r.json()["error"]["code"] == "corrupt", query
    r = client.post("/v1/check?explain=true&explain_label=rhino_horn", files={"image": ("a.jpg", good, "image/jpeg")})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_label"
    r = client.post("/v1/check?explain=maybe", files={"image": ("a.jpg", good, "image/jpeg")})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
    files = [("image", ("a.jpg", good, "image/jpeg")), ("image", ("b.jpg", b"garbage", "image/jpeg")),
             ("image", ("c.jpg", jpeg_bytes(ImageOps.mirror(_scene(seed=11))), "image/jpeg"))]
    r = client.post("/v1/check_batch?explain=true", files=files)
    a, b, c = r.json()["results"]
    assert b["error"]["code"] == "not_an_image" and a["explanation"]["label"] == c["explanation"]["label"]
    single = client.post("/v1/check?explain=true", files={"image": ("a.jpg", good, "image/jpeg")}).json()
    np.testing.assert_allclose(a["explanation"]["grid"], single["explanation"]["grid"], atol=1e-3)
    assert client.get("/v1/model").json()["explain"] == {"available": True, "cam": {"output": "cam", "shape": [4, 2, 2]}}
    schema = client.get("/v1/openapi.json").json()
    assert "Explanation" in schema["components"]["schemas"]
    assert {"explain", "explain_label"} <= {p["name"] for p in schema["paths"]["/check"]["post"]["parameters"]}


def test_model_exported_before_heat_maps_still_serves(legacy_model, tmp_path):
    from serving.checker import ImageChecker

    checker = ImageChecker(str(legacy_model))
    assert not checker.model.has_cam
    data = jpeg_bytes(_scene())
    assert checker.check(data, "image/jpeg")["decision"] in ("block", "review", "allow")
    with _service_client(legacy_model, tmp_path / "bentoml") as c:
        assert c.post("/v1/check", files={"image": ("a.jpg", data, "image/jpeg")}).status_code == 200
        r = c.post("/v1/check?explain=true", files={"image": ("a.jpg", data, "image/jpeg")})
        assert r.status_code == 422 and r.json()["error"]["code"] == "explain_unavailable"
        assert "re-export" in r.json()["error"]["message"]
        assert c.get("/v1/model").json()["explain"] == {"available": False, "cam": None}


def _collage(ivory: Image.Image, others: list[Image.Image], quadrant: int, side: int = 256) -> Image.Image:
    tiles = others[:quadrant] + [ivory] + others[quadrant:]
    out = Image.new("RGB", (2 * side, 2 * side))
    for q, tile in enumerate(tiles):
        out.paste(ImageOps.fit(tile, (side, side)), ((q % 2) * side, (q // 2) * side))
    return out


@pytest.mark.realdata
def test_ivory_collages_peak_in_the_ivory_quadrant():
    """40 collages of one Met ivory photo and three others: the ivory heat map peaks in the ivory quadrant."""
    if not IVORY_MODEL.is_file():
        pytest.skip(f"{IVORY_MODEL} not available")
    from serving.checker import ImageChecker

    checker = ImageChecker(str(IVORY_MODEL), threads=2)
    if not checker.model.has_cam:
        pytest.skip(f"{IVORY_MODEL} was exported without a cam output")
    root = shared_dataset("met-ivory")
    rng = np.random.default_rng(0)
    ivory = sorted((root / "val" / "ivory").glob("*.jpg"))
    others = sorted((root / "val" / "other").glob("*.jpg"))
    for name in ("generic-products", "caltech101-negatives"):
        others += sorted((shared_dataset(name) / "val" / "other").glob("*.jpg"))[:150]
    hits = 0
    for k in range(40):
        tiles = [Image.open(p).convert("RGB") for p in rng.choice(others, 3, replace=False)]
        quadrant = k % 4
        collage = _collage(Image.open(rng.choice(ivory)).convert("RGB"), tiles, quadrant)
        e = checker.check(jpeg_bytes(collage), "image/jpeg", explain="true", explain_label="ivory")["explanation"]
        grid = np.array(e["grid"])
        row, col = np.unravel_index(grid.argmax(), grid.shape)
        hits += (2 * int(row >= grid.shape[0] / 2) + int(col >= grid.shape[1] / 2)) == quadrant
    assert hits >= 32, f"peak in the ivory quadrant for only {hits}/40 collages"


def test_false_positives_png_shows_heat_maps_when_the_model_has_them(onnx_model, legacy_model, synth_root, tmp_path):
    from training.evaluate import evaluate
    from training.predict import load_predictor
    from training.explain import heat_grids

    negatives = tmp_path / "neg" / "other"
    negatives.mkdir(parents=True)
    paths = sorted((synth_root / "test" / "other").glob("*.jpg"))[:4]
    for p in paths:
        (negatives / p.name).write_bytes(p.read_bytes())
    widths = {}
    for name, model in (("cam", onnx_model), ("legacy", legacy_model)):
        evaluate(model, [str(tmp_path / "neg")], split=None, out_dir=tmp_path / name)
        with Image.open(tmp_path / name / "false_positives.png") as png:
            widths[name] = png.width
    assert widths["cam"] > 1.8 * widths["legacy"]  # photo | heat map in each cell
    grids = heat_grids(load_predictor(onnx_model), [str(p) for p in paths] + [str(tmp_path / "missing.jpg")])
    assert all(g.shape == grids[0].shape and g.max() <= 1.0 for g in grids[:4]) and grids[4] is None
    assert heat_grids(load_predictor(legacy_model), [str(paths[0])]) == [None]


def test_cli_explain_refuses_an_out_inside_the_images_folder(onnx_model, tmp_path):
    """Before: --out PHOTOS/overlays was written, and explaining PHOTOS again explained the overlays as photos."""
    from typer.testing import CliRunner

    from training.cli import app

    photos = tmp_path / "photos"
    photos.mkdir()
    _scene((200, 160), seed=3).save(photos / "p.png")
    out = photos / "overlays"
    result = CliRunner().invoke(app, ["explain", str(onnx_model), str(photos), "--out", str(out)])
    assert result.exit_code == 2 and f"error: --out {out} is inside {photos}" in result.output, result.output
    assert not out.exists() and [p.name for p in photos.iterdir()] == ["p.png"]


def test_collage_heat_map_shows_only_the_panels_the_decision_scored():
    """The shipped model scores a found collage by its panels alone (``whole_with_panels: false``); the heat map
    took its maximum over the whole composite too, which lit up the gutter (0.12 here) and set the scale. Met val
    ivory_60723 (a pin) beside three Met ceramics, 60 px white gutters."""
    if not IVORY_MODEL.is_file():
        pytest.skip(f"{IVORY_MODEL} not available")
    from serving.checker import ImageChecker
    from serving.explain import class_evidence
    from serving.tiling import view_boxes, views

    checker = ImageChecker(str(IVORY_MODEL))
    assert checker.contract.tiling.mode == "panels" and not checker.contract.tiling.whole_with_panels
    met = shared_dataset("met-ivory") / "val"
    side, gutter = 300, 60
    tiles = [Image.open(met / "ivory" / "ivory_60723.jpg")] + [Image.open(p) for p in sorted((met / "other").glob("*.jpg"))[20:23]]
    collage = Image.new("RGB", (2 * side + gutter, 2 * side + gutter), (255, 255, 255))
    for q, tile in enumerate(tiles):
        collage.paste(tile.convert("RGB").resize((side, side)), ((q % 2) * (side + gutter), (q // 2) * (side + gutter)))
    buf = io.BytesIO()
    collage.save(buf, "PNG")
    result = checker.check(buf.getvalue(), explain="true", explain_label="ivory")
    grid = np.array(result["explanation"]["grid"])
    rows, cols = grid.shape
    ys = (np.arange(rows) + 0.5) * collage.height / rows
    xs = (np.arange(cols) + 0.5) * collage.width / cols
    in_gutter = lambda v: (v > side + 2) & (v < side + gutter - 2)  # noqa: E731
    assert grid[in_gutter(ys)].max() == 0 and grid[:, in_gutter(xs)].max() == 0  # no scored view looked there
    # exactly the map of the panels' views: the whole composite (view 0) left out, as the scores leave it out
    boxes = view_boxes(collage, checker.contract.tiling)
    assert len(boxes) == 5
    cams = checker.model.predict_with_cam(views(collage, checker.pre, checker.contract.tiling, boxes))[1]
    k = checker.contract.labels.index("ivory")
    expected = heat_grid(np.stack([class_evidence(c, k) for c in cams[1:]]), checker.pre, *collage.size, boxes[1:])
    np.testing.assert_allclose(grid, np.round(expected, 4), atol=1e-4)
