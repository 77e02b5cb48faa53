"""benchmarks/tta_check.py: each view of a preprocessed array is the view of the photo, as the report's
conditions make it (so 'turns' and 'luma' measure what they say)."""

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from tta_check import view  # noqa: E402

from serving.preprocess import Preprocessing  # noqa: E402
from tests.conftest import photo  # noqa: E402


def test_views_of_the_array_are_views_of_the_photo():
    # no crop margin: a centre crop of an odd margin sits one pixel off centre, and a turn would move it
    pre = Preprocessing(input_size=64, crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    img = photo(3, size=(96, 96))
    x = pre(img)[None]
    turned = pre(img.transpose(Image.Transpose.ROTATE_90))[None]  # PIL turns counter-clockwise, as np.rot90
    mirrored = pre(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))[None]
    level = 1 / 127.5  # one 8-bit level after normalisation
    for got, want in ((view("rot90", x), turned), (view("hflip", x), mirrored)):
        # PIL resizes rows then columns, rounding between, so a few pixels differ by a few levels
        assert np.abs(got - want).mean() < 0.1 * level and np.abs(got - want).max() < 8 * level
        assert np.abs(x - want).mean() > 50 * level  # the view did change the array
    grey = pre(img.convert("L").convert("RGB"))[None]
    assert np.abs(view("grey", x) - grey).max() < 2.5 / 127.5  # PIL rounds luma to 8 bits, resizes after
    assert np.abs(view("grey", x) - x).max() > 0.1  # the photo has colour to lose
    np.testing.assert_array_equal(view("id", x), x)


def test_a_scale_view_is_the_photo_preprocessed_at_that_size():
    pre = Preprocessing(input_size=64, crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    img = photo(3, size=(96, 96))
    x = pre(img)[None]
    small = view("s40", x)
    assert small.shape == (1, 3, 40, 40)
    want = Preprocessing(input_size=40, crop_pct=1.0, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(img)[None]
    # resized twice (photo -> 64 -> 40, antialiased) vs once (photo -> 40, bicubic): close, not equal
    assert np.abs(small - want).mean() < 0.05 and np.abs(small - want).mean() < 0.2 * np.abs(small).mean()


def test_view_sets_combine_as_written():
    from tta_check import ViewSet

    # two photos, two classes (ivory = 0); margins: id [2, -1], rot90 [-4, -3], rot270 [0, 1]
    logits = {"id": np.array([[2.0, 0.0], [0.0, 1.0]]), "rot90": np.array([[0.0, 4.0], [0.0, 3.0]]),
              "rot270": np.array([[0.0, 0.0], [1.0, 0.0]])}
    plain = ViewSet.parse("turns=id,rot90,rot270")
    assert plain.rule == "mean" and plain.weights == (1 / 3, 1 / 3, 1 / 3)
    np.testing.assert_allclose(plain.combine(logits, 0), [-2 / 3, -1.0])
    lean = ViewSet.parse("lean=id:0.8,rot90:0.1,rot270:0.1")
    np.testing.assert_allclose(lean.combine(logits, 0), [0.8 * 2 - 0.4, -0.8 - 0.3 + 0.1])
    np.testing.assert_allclose(ViewSet.parse("m=median/id,rot90,rot270").combine(logits, 0), [0.0, -1.0])
    # the view surest either way: rot90 for both photos (|-4| and |-3|)
    np.testing.assert_allclose(ViewSet.parse("c=confident/id,rot90,rot270").combine(logits, 0), [-4.0, -3.0])
    for bad in ("noname", "x=", "x=vote/id,rot90", "x=median/id:2,rot90:1", "x=id:0,rot90:0", "x=id:nan", "x=id:heavy"):
        with pytest.raises(SystemExit):
            ViewSet.parse(bad)
