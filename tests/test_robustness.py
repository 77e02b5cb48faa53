"""Listing conditions change pictures as documented and deterministically; the robustness command reports them."""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import pytest
from PIL import Image, ImageFont
from typer.testing import CliRunner

from tests.conftest import REPO, photo
from training.conditions import (
    KINDS,
    Banner,
    CentreCrop,
    Collage,
    ConditionsError,
    Frame,
    Greyscale,
    Jpeg,
    Phone,
    Rotate,
    Thumbnail,
    Watermark,
    _font,
    condition_rng,
    default_conditions,
    font_path,
    parse_conditions,
)

RANDOM_KINDS = ("banner", "watermark", "frame", "collage", "rotate", "phone")


def rng(seed: int = 0, name: str = "x"):
    return condition_rng(seed, name, "val/ivory/a.jpg")


def flat(colour, size=(120, 90)) -> Image.Image:
    return Image.new("RGB", size, colour)


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


@lru_cache(maxsize=1)
def others() -> tuple[Image.Image, ...]:
    return tuple(photo(s, (100, 140)) for s in (11, 12, 13))


@lru_cache(maxsize=1)
def odd_shapes() -> tuple[Image.Image, ...]:
    sizes = [(16, 16), (17, 300), (300, 17), (384, 237), (237, 384), (320, 320), (41, 97)]
    return tuple(photo(k, size) for k, size in enumerate(sizes))


def test_jpeg_q20_recompresses():
    src = photo(1, (160, 120))
    out = Jpeg().apply(src, rng())
    diff = np.abs(arr(out) - arr(src))
    assert out.size == src.size and diff.mean() > 1.0  # visibly lossy
    assert diff.mean() < np.abs(arr(Jpeg(quality=5).apply(src, rng())) - arr(src)).mean()  # and less than q5


def test_thumbnail_removes_fine_detail_and_keeps_size():
    checker = Image.fromarray(((np.indices((192, 192)).sum(0) % 2) * 255).astype(np.uint8)).convert("RGB")
    out = Thumbnail().apply(checker, rng())
    assert out.size == checker.size
    assert arr(checker).std() > 120 and arr(out).std() < 10  # 1-px stripes averaged away at 96 px
    small = photo(2, (80, 60))
    assert arr(Thumbnail().apply(small, rng())).tolist() == arr(small).tolist()  # already below 96 px


def test_banner_is_a_band_with_truetype_text():
    assert font_path() is not None and isinstance(_font(20), ImageFont.FreeTypeFont)
    src = flat((128, 128, 128), (200, 150))
    out = arr(Banner().apply(src, rng()))
    changed_rows = np.flatnonzero((out != 128).any(axis=(1, 2)))
    band = round(150 * 0.16)
    assert len(changed_rows) == band + 1 and changed_rows[-1] - changed_rows[0] == band  # one contiguous band
    assert changed_rows[0] == 0 or changed_rows[-1] == 149  # at the top or the bottom
    assert len({tuple(p) for p in out[changed_rows].reshape(-1, 3)}) > 2  # text on the band, anti-aliased


def test_watermark_is_partial_and_semi_transparent():
    src = flat((128, 128, 128), (200, 200))
    out = arr(Watermark(opacity=0.4).apply(src, rng()))
    diff = np.abs(out - 128).max(axis=2)
    assert 0.02 < (diff > 0).mean() < 0.5  # text, not a veil over everything
    assert diff.max() <= 0.4 * 128 + 2  # the photo shows through


def test_frame_puts_the_photo_in_a_ninth_of_a_page_with_a_bar():
    green = flat((0, 255, 0), (120, 90))
    for seed in range(6):
        out = arr(Frame().apply(green, rng(seed)))
        is_photo = (out == (0, 255, 0)).all(axis=2)
        assert is_photo.sum() == 120 * 90  # the photo's pixels, unscaled
        assert is_photo.mean() == pytest.approx(1 / 9, rel=0.03)
        rows, cols = np.flatnonzero(is_photo.any(1)), np.flatnonzero(is_photo.any(0))
        assert (len(rows), len(cols)) == (90, 120)  # one rectangle
        H, W = is_photo.shape
        side = min(H, W)  # inside the central square, which a centre crop keeps
        assert (H - side) // 2 <= rows[0] and rows[-1] < (H + side) // 2 + 1
        assert (W - side) // 2 <= cols[0] and cols[-1] < (W + side) // 2 + 1
        top = out[2]
        assert (top == top[0]).all() and rows[0] > 5  # a UI bar above the photo
    tall = flat((0, 255, 0), (60, 400))  # too tall for a desktop page at 1/9: shrunk to fit, still inside
    out = Frame().apply(tall, rng(3))
    assert (arr(out) == (0, 255, 0)).all(axis=2).mean() > 0.03


def test_collage_puts_the_photo_in_one_quadrant():
    green = flat((0, 255, 0), (150, 100))
    fillers = [flat(c, (90, 130)) for c in ((255, 0, 0), (0, 0, 255), (255, 255, 0))]
    c = Collage()
    slots = set()
    for seed in range(8):
        out = c.apply(green, rng(seed), fillers)
        assert out.width == out.height
        tiles = [arr(out.crop(c.quadrant_box(green, s))) for s in range(4)]
        green_tiles = [s for s, t in enumerate(tiles) if (t == (0, 255, 0)).all()]
        assert len(green_tiles) == 1 and all((t == (0, 255, 0)).all(axis=2).sum() == 0
                                             for s, t in enumerate(tiles) if s != green_tiles[0])
        slots.add(green_tiles[0])
    assert len(slots) > 1  # the seed decides where
    with pytest.raises(ValueError, match="three other photos"):
        c.apply(green, rng(), fillers[:2])


def test_rotation_greyscale_and_crop():
    src = photo(3, (160, 100))
    rotated = Rotate().apply(src, rng())
    assert rotated.size == (100, 160)
    assert arr(rotated).tolist() in (arr(src.transpose(Image.Transpose.ROTATE_90)).tolist(),
                                     arr(src.transpose(Image.Transpose.ROTATE_270)).tolist())
    assert arr(Rotate(direction="cw").apply(src, rng())).tolist() == arr(src.rotate(-90, expand=True)).tolist()
    grey = arr(Greyscale().apply(src, rng()))
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all() and arr(src).std(axis=2).max() > 0
    crop = CentreCrop().apply(src, rng())
    assert crop.size == (80, 50) and arr(crop).tolist() == arr(src)[25:75, 40:120].tolist()


def test_phone_blurs_and_adds_noise():
    src = photo(4, (160, 120))
    out = arr(Phone().apply(src, rng()))
    noise_only = arr(Phone(blur=0).apply(src, rng()))
    assert out.shape == arr(src).shape and 2 < np.abs(noise_only - arr(src)).mean() < 12
    edges = lambda a: np.abs(np.diff(a.astype(float), axis=1)).mean()  # noqa: E731
    assert edges(arr(Phone(noise=0).apply(src, rng()))) < edges(arr(src))  # blur softens edges


@pytest.mark.parametrize("name", list(KINDS))
def test_same_seed_same_image_and_seed_matters_where_random(name):
    condition = default_conditions()[name]
    src = photo(5, (140, 110))
    first = condition.apply(src, condition_rng(0, name, "k"), others())
    again = condition.apply(src, condition_rng(0, name, "k"), others())
    assert arr(first).tolist() == arr(again).tolist()
    if name in RANDOM_KINDS:
        variants = [condition.apply(src, condition_rng(s, name, "k"), others()) for s in range(1, 6)]
        assert any(v.size != first.size or arr(v).tolist() != arr(first).tolist() for v in variants)


@pytest.mark.parametrize("name", list(KINDS))
def test_every_condition_handles_any_photo_shape(name):
    """Tiny, huge-aspect, portrait and landscape photos at many seeds: an RGB picture out, never an error."""
    condition = default_conditions()[name]
    for src in odd_shapes():
        for seed in range(8):
            out = condition.apply(src, condition_rng(seed, name, str(src.size)), others())
            assert out.mode == "RGB" and min(out.size) >= 1


def test_conditions_file_selects_and_parameterises():
    chosen = parse_conditions({"conditions": {"jpeg": {"quality": 40}, "jpeg_q5": {"kind": "jpeg", "quality": 5},
                                              "collage": None}})
    assert list(chosen) == ["jpeg", "jpeg_q5", "collage"]
    assert chosen["jpeg"].quality == 40 and chosen["jpeg_q5"].quality == 5 and chosen["collage"] == Collage()


@pytest.mark.parametrize("spec, message", [
    ({"conditions": {"sepia": {}}}, "unknown condition 'sepia'"),
    ({"conditions": {"jpeg": {"qualty": 30}}}, "qualty.*Parameters of jpeg: quality"),
    ({"conditions": {"jpeg": {"quality": 500}}}, "quality"),
    ({"conditions": {"crop": {"side": "half"}}}, "side"),
    ({"conditions": ["jpeg"]}, "mapping"),
    ({"jpeg": {}}, "one key, `conditions:`"),
    ({"conditions": {}}, "selects no condition"),
    ({"conditions": {"clean": {}}}, "always measured"),
    ({"conditions": {"x": {"kind": ["jpeg"]}}}, r"unknown condition \['jpeg'\]"),  # was TypeError: unhashable
    ({"conditions": {"jpeg": {"quality": True}}}, "quality: True is a yes/no value, not a number"),  # was quality 1
    ({"conditions": {"phone": {"blur": False}}}, "blur: False is a yes/no value"),
    ({"conditions": {1: {"kind": "jpeg"}}}, "condition name 1 is not text: quote it"),
])
def test_bad_conditions_are_clear_errors(spec, message):
    with pytest.raises(ConditionsError, match=message):
        parse_conditions(spec)


def test_collage_fillers_are_other_negatives(synth_root):
    from training.robustness import _Decoder, _others, gather

    samples, _, _ = gather([synth_root], [], "val", ["ivory", "pangolin_scales", "tiger_skin", "other"], "other")
    pool = np.array([i for i, s in enumerate(samples) if s.label == "other"])
    decoder = _Decoder(None)
    negatives = {i: arr(decoder(samples[i], i)).tobytes() for i in pool}
    for index in (0, int(pool[0])):  # an ivory photo and a negative
        picked = _others(Collage(), condition_rng(0, "collage", "k"), index, pool, samples, decoder)
        found = [next(i for i, b in negatives.items() if b == arr(img).tobytes()) for img in picked]
        assert len(set(found)) == 3 and index not in found


def _cli(*args):
    from training.cli import app

    return CliRunner().invoke(app, list(map(str, args)))


def test_robustness_command_reports_every_condition(onnx_model, synth_root, tmp_path):
    from training.evaluate import evaluate

    out = tmp_path / "report"
    result = _cli("robustness", onnx_model, "--data", synth_root, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "robustness.json").read_text())
    assert list(report["conditions"]) == ["clean", *KINDS]
    assert report["counts"] == {"ivory": 4, "other": 4, "pangolin_scales": 4, "tiger_skin": 4}
    for name, r in report["conditions"].items():
        assert 0.0 <= r["balanced_accuracy"] <= 1.0, name
        ivory = r["per_class"]["ivory"]
        assert ivory["support"] == 4 and 0.0 <= ivory["block_recall"] <= ivory["flag_recall"] <= 1.0
        assert "block_precision" in ivory and r["negatives"]["n"] == 4
        assert 0.0 <= r["negatives"]["blocked"] <= r["negatives"]["flagged"] <= 1.0
        assert list(r["negatives"]["per_source"]) == [synth_root.name]
    assert report["conditions"]["jpeg"]["params"] == {"quality": 20}
    assert Image.open(out / "robustness.png").format == "PNG"
    assert not list(out.glob(".*.tmp"))
    # the clean pass is evaluation: same pictures, same decision rule, same numbers
    decisions = evaluate(onnx_model, [synth_root], "val").decisions
    clean = report["conditions"]["clean"]
    assert clean["negatives"]["flagged"] == pytest.approx(decisions["negatives_flagged"])
    for label, m in decisions["per_class"].items():
        assert clean["per_class"][label]["flag_recall"] == pytest.approx(m["flag_recall"])
        assert clean["per_class"][label]["block_recall"] == pytest.approx(m["block_recall"])


def test_robustness_command_is_deterministic_per_seed(onnx_model, synth_root, tmp_path):
    spec = tmp_path / "conditions.yaml"
    spec.write_text("conditions:\n  collage: {}\n  watermark: {opacity: 0.9}\n")
    runs = []
    for name in ("a", "b"):
        result = _cli("robustness", onnx_model, "--data", synth_root, "--conditions", spec, "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
        runs.append(json.loads((tmp_path / name / "robustness.json").read_text()))
    assert list(runs[0]["conditions"]) == ["clean", "collage", "watermark"]
    assert runs[0]["conditions"]["watermark"]["params"] == {"opacity": 0.9}
    assert runs[0]["conditions"] == runs[1]["conditions"]
    # --limit: a subset; too few negatives left for a collage is a clear error before any work
    result = _cli("robustness", onnx_model, "--data", synth_root, "--conditions", spec, "--limit", "6",
                  "--seed", "3", "--out", tmp_path / "c")
    assert result.exit_code == 2 and "collage needs more than 3 'other' images" in result.output
    spec.write_text("conditions:\n  rotate: {direction: cw}\n")
    result = _cli("robustness", onnx_model, "--data", synth_root, "--conditions", spec, "--limit", "6",
                  "--out", tmp_path / "c")
    assert result.exit_code == 0, result.output
    assert sum(json.loads((tmp_path / "c" / "robustness.json").read_text())["counts"].values()) == 6


def test_bad_conditions_file_exits_2_and_names_the_problem(synth_root, tmp_path):
    spec = tmp_path / "conditions.yaml"
    spec.write_text("conditions:\n  jpeg: {quality: 20}\n  sepia: {}\n")
    model = tmp_path / "model.onnx"  # never opened: the conditions are checked before any work
    result = _cli("robustness", model, "--data", synth_root, "--conditions", spec, "--out", tmp_path / "r")
    assert result.exit_code == 2
    assert "unknown condition 'sepia'" in result.output and "jpeg" in result.output
    assert not (tmp_path / "r").exists()  # nothing written


def test_reporting_on_an_onnx_model_does_not_import_torch():
    """torch costs ~0.7 GB of RSS; scoring an ONNX file and writing the report must not pull it in."""
    import subprocess
    import sys

    code = ("import sys, training.robustness, training.plots, training.fileio, training.conditions; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == 0


def test_a_condition_listed_twice_is_refused_naming_both_lines(synth_root, tmp_path):
    """PyYAML kept only the last `jpeg:` silently; now the file is refused before any work, exit 2."""
    from training.conditions import load_conditions

    spec = tmp_path / "conditions.yaml"
    spec.write_text("conditions:\n  jpeg: {quality: 20}\n  jpeg: {quality: 50}\n")
    with pytest.raises(ConditionsError, match=r"key 'jpeg' appears twice \(lines 2 and 3\)"):
        load_conditions(spec)
    result = _cli("robustness", tmp_path / "model.onnx", "--data", synth_root, "--conditions", spec,
                  "--out", tmp_path / "r")
    assert result.exit_code == 2 and "error: " in result.output and "write it once" in result.output
    assert not (tmp_path / "r").exists()


def test_an_out_inside_the_data_or_a_negatives_pool_is_refused_before_any_work(onnx_model, synth_root, tmp_path):
    """Before: the report's robustness.png landed among the images scored (a label folder's next count included it)."""
    import shutil

    data, pool = tmp_path / "data", tmp_path / "pool"
    shutil.copytree(synth_root, data)
    shutil.copytree(synth_root / "val" / "other", pool / "other")
    conditions = tmp_path / "conditions.yaml"
    conditions.write_text("conditions: {jpeg: {quality: 30}}\n")
    for out in (data / "val" / "other" / "report", pool / "report"):
        result = _cli("robustness", onnx_model, "--data", data, "--negatives", pool, "--out", out,
                      "--conditions", conditions)
        assert result.exit_code == 2 and f"error: --out {out} is inside" in result.output, result.output
        assert not out.exists()


def test_conditions_named_1_and_quoted_1_are_refused_not_merged(synth_root, tmp_path):
    """`1:` and `"1":` both became "1": one condition was dropped without a word."""
    from training.conditions import load_conditions

    spec = tmp_path / "conditions.yaml"
    spec.write_text('conditions:\n  1: {kind: jpeg}\n  "1": {kind: rotate}\n')
    with pytest.raises(ConditionsError, match="condition name 1 is not text"):
        load_conditions(spec)
    spec.write_text('conditions:\n  "1": {kind: jpeg}\n  "2": {kind: rotate}\n')
    assert list(load_conditions(spec)) == ["1", "2"]


@pytest.mark.parametrize("seed", ["-1", str(2**32)])
def test_a_seed_out_of_range_is_a_usage_error(onnx_model, synth_root, tmp_path, seed):
    """--seed -1 was a numpy traceback (ValueError: expected non-negative integer) after the model was loaded."""
    conditions = tmp_path / "conditions.yaml"
    conditions.write_text("conditions: {greyscale: {}}\n")
    result = _cli("robustness", onnx_model, "--data", synth_root, "--conditions", conditions, "--seed", seed,
                  "--out", tmp_path / "r")
    assert result.exit_code == 2 and "--seed" in result.output, result.output  # before: exit 1, ValueError
    assert not (tmp_path / "r").exists()
