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
    assert c.model_name == "wildcheck-ivory" and c.model_version.startswith("1.0.0+")
    t = c.thresholds["ivory"]
    assert 0.0 < t.review <= t.block <= 1.0
    assert c.metrics and c.training_data
    assert SHIPPED.stat().st_size < 20_000_000  # FP32 ~14 MB, INT8 ~4 MB
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
