"""The shipped model (models/wildcheck-ivory.onnx): its contract, and its decisions on the example photos."""

import csv

import pytest

from tests.conftest import REPO

SHIPPED = REPO / "models" / "wildcheck-ivory.onnx"
EXAMPLES = REPO / "examples"

needs_model = pytest.mark.skipif(not SHIPPED.is_file(), reason=f"{SHIPPED} not present (make model)")


def _examples() -> list[dict]:
    with open(EXAMPLES / "examples.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_examples_are_the_listed_small_met_photos():
    rows = _examples()
    assert sorted(r["file"] for r in rows) == sorted(p.name for p in EXAMPLES.glob("*.jpg"))
    assert [r["label"] for r in rows].count("ivory") == 3 and [r["label"] for r in rows].count("other") == 3
    for r in rows:
        assert (EXAMPLES / r["file"]).stat().st_size <= 100_000
        assert r["licence"].startswith("CC0") and r["met_url"].endswith("/" + r["met_object_id"])


@needs_model
def test_shipped_contract():
    from serving.contract import read_contract

    c = read_contract(SHIPPED)
    assert c.labels == ["ivory", "other"] and c.negative_label == "other"
    assert c.model_name == "wildcheck-ivory" and c.model_version.startswith("1.6.0+")
    assert c.architecture == "ensemble2:tf_efficientnet_lite0"  # two seeds' logits averaged (wildcheck ensemble)
    assert [m["seed"] for m in c.training_data["ensemble"]] == [42, 7]
    assert c.preprocessing.input_size == 320  # 1.4.0: the fine-tune stage at 320 px
    assert c.tiling is not None and c.tiling.mode == "panels"  # a collage's panels are scored too
    assert c.grey_route is not None and c.grey_route.tolerance == 1.0  # 1.5.0: photos in grey read by their own head
    assert [m["lam"] for m in c.grey_route.fitted["members"]] == [1.0, 1.0]
    assert c.size_route is not None and c.size_route.size == 256  # 1.6.0: blurred or noisy photos read at 256 px
    t = c.thresholds["ivory"]
    assert 0.0 < t.review <= t.block <= 1.0
    assert c.metrics and c.training_data
    assert SHIPPED.stat().st_size < 30_000_000  # FP32, two EfficientNet-Lite0: ~27 MB
    assert (REPO / "models" / "model_card.md").is_file()


@pytest.fixture(scope="module")
def checker():
    from serving.checker import ImageChecker

    return ImageChecker(str(SHIPPED))


@needs_model
@pytest.mark.parametrize("row", _examples(), ids=lambda r: r["file"])
def test_shipped_model_decides_the_examples(checker, row):
    result = checker.check((EXAMPLES / row["file"]).read_bytes(), "image/jpeg")
    if row["label"] == "ivory":
        assert result["decision"] in ("review", "block"), result
        assert result["triggered_by"] == ["ivory"]
    else:
        assert result["decision"] == "allow", result


@needs_model
@pytest.mark.parametrize("row", _examples(), ids=lambda r: r["file"])
def test_shipped_model_decides_the_examples_in_grey_too(checker, row):
    """1.4.0 allowed ivory_13342 in grey (one head for all photos, ivory score under the review threshold); 1.5.0's
    grey route flags it and keeps the ceramics allowed."""
    import io

    from PIL import Image

    from training.conditions import greyscale

    out = io.BytesIO()
    greyscale(Image.open(EXAMPLES / row["file"]).convert("RGB")).save(out, "JPEG", quality=95)
    result = checker.check(out.getvalue(), "image/jpeg")
    assert result["decision"] in (("review", "block") if row["label"] == "ivory" else ("allow",)), result


@needs_model
@pytest.mark.parametrize("condition", ["thumbnail", "phone"])
@pytest.mark.parametrize("row", _examples(), ids=lambda r: r["file"])
def test_shipped_model_decides_blurred_and_noisy_copies_of_the_examples(checker, row, condition):
    """A 96 px thumbnail blown up, a phone's blur and sensor noise: the size route reads them at 256 px (1.6.0; with
    1.5.0 ivory_13342 went to review under both, 1.6.0 blocks it); ivory is still flagged, ceramics allowed."""
    import io

    import numpy as np
    from PIL import Image

    from training.conditions import default_conditions

    photo = Image.open(EXAMPLES / row["file"]).convert("RGB")
    out = io.BytesIO()
    default_conditions()[condition].apply(photo, np.random.default_rng(0)).save(out, "PNG")
    result = checker.check(out.getvalue(), "image/png")
    assert result["decision"] in (("review", "block") if row["label"] == "ivory" else ("allow",)), result


def _collage(files: list[str], side: int = 400, gutter: int = 12) -> bytes:
    """A seller's 2x2 collage: each photo letterboxed into a light panel, panels separated by a white gutter."""
    import io

    from PIL import Image

    canvas = Image.new("RGB", (2 * side + 3 * gutter,) * 2, (255, 255, 255))
    for k, name in enumerate(files):
        photo = Image.open(EXAMPLES / name).convert("RGB")
        photo.thumbnail((side, side))
        panel = Image.new("RGB", (side, side), (245, 245, 245))
        panel.paste(photo, ((side - photo.width) // 2, (side - photo.height) // 2))
        canvas.paste(panel, (gutter + (k % 2) * (side + gutter), gutter + (k // 2) * (side + gutter)))
    out = io.BytesIO()
    canvas.save(out, "JPEG", quality=90)
    return out.getvalue()


@needs_model
@pytest.mark.parametrize("ivory", ["ivory_13342.jpg", "ivory_14307.jpg", "ivory_324217.jpg"])
def test_shipped_model_catches_ivory_in_one_panel_of_a_collage(checker, ivory):
    """Scored as a whole picture these collages are allowed (ivory score 0.11-0.38 with 1.0.0's whole-photo
    inference); the panels mode finds the four panels and the ivory one decides."""
    others = [r["file"] for r in _examples() if r["label"] == "other"]
    result = checker.check(_collage([ivory] + others), "image/jpeg")
    assert result["decision"] in ("review", "block"), result
    assert result["triggered_by"] == ["ivory"]
    assert checker.check(_collage(others + others[:1]), "image/jpeg")["decision"] == "allow"
