"""Listing scenes built from the negatives pool, per-pool negative sampling, and tiled inference."""

from collections import Counter

import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from serving.preprocess import Preprocessing
from serving.tiling import Tiling, ViewRule, combine, views
from training.data.sampling import EpochSampler, HardNegativeMiner
from training.realism import ListingScene, plain_background_mask
from tests.conftest import photo


def museum_shot(size=160, colour=(225, 225, 228)) -> np.ndarray:
    """A dark ellipse (the object) on a plain light backdrop."""
    img = Image.new("RGB", (size, size), colour)
    ImageDraw.Draw(img).ellipse([40, 30, 120, 140], fill=(140, 110, 60))
    return np.asarray(img)


def scene(kind: str, img: np.ndarray, bank: list[np.ndarray], seed: int = 0) -> np.ndarray:
    t = ListingScene(**{k: float(k == kind) for k in ("collage", "frame", "cutout")}, p=1.0)
    t.bank = bank
    return A.Compose([t], seed=seed)(image=img)["image"]


BANK = [np.asarray(photo(s, (200, 150))) for s in range(5)]


def test_plain_backdrop_mask_finds_the_object_and_refuses_clutter():
    mask = plain_background_mask(museum_shot())
    assert mask is not None and mask[85, 80] > 0.9 and mask[5, 5] < 0.1
    assert 0.15 < (mask > 0.5).mean() < 0.45
    noise = np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8)
    assert plain_background_mask(noise) is None


@pytest.mark.parametrize("kind", ["collage", "frame", "cutout"])
def test_scene_keeps_size_changes_the_picture_and_is_seeded(kind):
    img = museum_shot()
    out = scene(kind, img, BANK, seed=3)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - img).mean() > 5
    assert np.array_equal(out, scene(kind, img, BANK, seed=3))
    assert not np.array_equal(out, scene(kind, img, BANK, seed=4))


def test_collage_shows_the_image_whole_in_one_tile_and_bank_photos_elsewhere():
    img = museum_shot()
    out = scene("collage", img, BANK, seed=1)
    # the object's colour appears (shrunk, never cut) and bank pixels fill most of the canvas
    obj = np.all(np.abs(out.astype(int) - (140, 110, 60)) < 12, axis=2)
    assert 0.002 < obj.mean() < (np.all(np.abs(img.astype(int) - (140, 110, 60)) < 12, axis=2)).mean()


def test_cutout_puts_a_plain_backdrop_object_on_clutter_and_a_cluttered_photo_on_a_plain_backdrop():
    on_clutter = scene("cutout", museum_shot(), BANK, seed=2)
    corners = np.concatenate([on_clutter[:8, :8], on_clutter[-8:, -8:]]).reshape(-1, 3)
    assert np.abs(corners.astype(int) - (225, 225, 228)).max() > 20  # the light backdrop is gone
    cluttered = np.random.default_rng(1).integers(0, 256, (160, 160, 3), dtype=np.uint8)
    framed = scene("cutout", cluttered, BANK, seed=2)
    assert framed[:6, :6].reshape(-1, 3).std(axis=0).max() < 3  # a plain backdrop around the print


def test_scene_is_a_no_op_without_a_bank():
    img = museum_shot()
    assert np.array_equal(scene("collage", img, []), img)


def test_pools_share_the_negatives_draw_equally():
    gen = torch.Generator().manual_seed(0)
    groups = [0] * 900 + [1] * 90 + [2] * 10  # a big easy pool must not drown the small ones
    sampler = EpochSampler([0, 1] * 10, n_pool=1000, n_negatives=60, balance=False, generator=gen,
                           pool_groups=groups)
    drawn = Counter(groups[i - 20] for i in sampler if i >= 20)
    assert drawn == {0: 25, 1: 25, 2: 10}  # the 10-image pool gives all it has, the rest is shared


def test_mining_bites_even_when_every_score_is_low():
    gen = torch.Generator().manual_seed(0)
    miner = HardNegativeMiner(n_main=20, n_pool=200, max_weight=4.0)
    sampler = EpochSampler([0, 1] * 10, n_pool=200, n_negatives=20, balance=False, generator=gen, miner=miner)
    scores = np.full(200, 0.02)
    scores[:10] = 0.12  # low in absolute terms, but the hardest of the pool
    miner.update(np.arange(200) + 20, scores)
    weights = miner.weights().numpy()
    assert weights[:10].min() == pytest.approx(4.0) and weights[10:].max() == pytest.approx(1.0)
    list(sampler)
    assert miner.last_mined >= 1 and miner.last_mined_per_pool == [miner.last_mined]


def test_tiles_cover_the_picture_and_thumbnails_get_none():
    tiling = Tiling(grid=2, min_tile_side=64)
    boxes = tiling.tiles((300, 200))
    assert boxes == [(0, 0, 150, 100), (150, 0, 300, 100), (0, 100, 150, 200), (150, 100, 300, 200)]
    assert tiling.tiles((120, 96)) == []
    pre = Preprocessing(input_size=64)
    assert views(photo(1, (300, 200)), pre, tiling).shape == (5, 3, 64, 64)
    assert views(photo(1, (300, 200)), pre, None).shape == (1, 3, 64, 64)


def test_combine_takes_the_most_suspicious_view_per_protected_class():
    two = np.array([[0.2, 0.8], [0.7, 0.3], [0.1, 0.9]], np.float32)  # ivory, other
    assert np.allclose(combine(two, ViewRule(1)), [0.7, 0.3])
    three = np.array([[0.6, 0.1, 0.3], [0.1, 0.5, 0.4]], np.float32)  # a, b, other
    out = combine(three, ViewRule(2))
    assert np.isclose(out.sum(), 1.0) and out[0] == pytest.approx(0.6 / 1.1, rel=1e-5) and out[2] == 0


def test_served_scores_are_the_most_suspicious_view_when_the_contract_declares_tiling(onnx_model, tmp_path):
    from serving.checker import ImageChecker
    from serving.contract import read_contract
    from serving.runtime import OnnxModel
    from training.predict import predict_samples
    from training.data.sources import Sample
    from training.export import write_contract
    from tests.conftest import jpeg_bytes

    contract = read_contract(onnx_model).model_copy(update={"tiling": Tiling(grid=2, min_tile_side=32)})
    tiled = tmp_path / "tiled.onnx"
    write_contract(onnx_model, tiled, contract)
    assert read_contract(tiled).tiling == Tiling(grid=2, min_tile_side=32)

    picture = Image.new("RGB", (256, 256), "white")
    for k in range(4):
        picture.paste(photo(10 + k, (128, 128)), ((k % 2) * 128, (k // 2) * 128))
    data = jpeg_bytes(picture)
    plain = OnnxModel(onnx_model)
    negative = plain.labels.index(plain.contract.negative_label)
    from serving.imageio import decode_image

    img, _ = decode_image(data)
    per_view = plain.predict_proba(views(img, plain.preprocessing, contract.tiling))
    expected = combine(per_view, ViewRule(negative))
    served = ImageChecker(str(tiled)).check(data)
    got = np.array([served["scores"][label] for label in plain.labels])
    assert np.allclose(got, expected, atol=1e-5)
    assert not np.allclose(per_view[0], expected)  # the tiles changed the answer, so this test can fail
    # evaluation scores the same views as the server
    path = tmp_path / "collage.jpg"
    path.write_bytes(data)
    probs, kept, _ = predict_samples(OnnxModel(tiled), [Sample(path, plain.labels[0], "val")])
    assert np.allclose(probs[0], expected, atol=1e-5)
