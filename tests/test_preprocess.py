"""The one preprocessing definition: matches timm's eval transform and is the same when split in two."""

import numpy as np
import pytest

from serving.imageio import decode_image
from serving.preprocess import Preprocessing
from tests.conftest import jpeg_bytes, photo


def test_matches_timm_eval_transform_on_a_jpeg():
    from timm.data import create_transform

    pre = Preprocessing(input_size=224, crop_pct=0.875, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
    img, _ = decode_image(jpeg_bytes(photo(11, (400, 300))))
    ours = pre(img)
    timm_tf = create_transform(input_size=(3, 224, 224), interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3,
                               crop_pct=0.875, crop_mode="center")
    theirs = timm_tf(img).numpy()
    assert ours.shape == theirs.shape == (3, 224, 224)
    assert np.abs(ours - theirs).max() < 0.02  # uint8 rounding of the resize only


def test_cached_path_equals_direct_path():
    pre = Preprocessing(input_size=96, crop_pct=0.875)
    img, _ = decode_image(jpeg_bytes(photo(12, (333, 211))))
    cached = np.asarray(pre.resize_image(img))
    assert min(cached.shape[:2]) == pre.resize_size
    np.testing.assert_array_equal(pre.crop_and_normalize(cached), pre(img))


def test_rejects_unknown_settings():
    with pytest.raises(ValueError):
        Preprocessing(interpolation="cubic-ish")
    with pytest.raises(ValueError):
        Preprocessing(resize="stretch-ish")


def test_squash_keeps_the_whole_picture():
    pre = Preprocessing(input_size=64, crop_pct=1.0, resize="squash")
    img, _ = decode_image(jpeg_bytes(photo(13, (300, 100))))
    assert pre.resize_image(img).size == (64, 64) and pre(img).shape == (3, 64, 64)
