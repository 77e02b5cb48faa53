"""Augmentation seeding across DataLoader workers and the per-epoch negatives sampler."""

from collections import Counter

import numpy as np
import pytest
import torch

from serving.preprocess import Preprocessing
from training.augment import TrainTransform, worker_init_fn
from training.config import Config
from training.data.cache import CachedImageDataset
from training.data.sampling import EpochSampler, HardNegativeMiner, negatives_count
from tests.conftest import photo


def _dataset(n=8):
    pixels = [np.full((80, 100, 3), 120, np.uint8) + np.arange(100, dtype=np.uint8)[None, :, None] for _ in range(n)]
    pre = Preprocessing(input_size=64)
    return CachedImageDataset(pixels, [0] * n, TrainTransform(Config().augment.train, pre, seed=0))


def test_train_transform_output_shape_and_dtype():
    x, y, index = _dataset()[0]
    assert index == 0 and x.shape == (3, 64, 64) and x.dtype == torch.float32 and y == 0


def test_two_workers_do_not_repeat_each_other():
    # identical images: any difference between the two workers' outputs comes from their augmentation streams
    ds = _dataset(8)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, worker_init_fn=worker_init_fn, shuffle=False)
    batches = [b[0] for b in loader]  # batch 0 from worker 0, batch 1 from worker 1
    assert len(batches) == 2
    assert not torch.allclose(batches[0], batches[1]), "both workers produced the same augmentations"


def test_without_reseeding_workers_would_repeat():
    """Documents the albumentations 2.0.x behaviour that worker_init_fn fixes (guards the test above)."""
    ds = _dataset(8)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, shuffle=False)
    batches = [b[0] for b in loader]
    assert torch.allclose(batches[0], batches[1])


def test_epoch_sampler_sizes_balance_and_fresh_negatives():
    main_targets = [0] * 90 + [1] * 10  # imbalanced main set
    gen = torch.Generator().manual_seed(0)
    sampler = EpochSampler(main_targets, n_pool=1000, n_negatives=50, balance=True, generator=gen)
    assert len(sampler) == 150
    epoch1, epoch2 = list(sampler), list(sampler)
    assert len(epoch1) == 150 and len(epoch2) == 150
    neg1 = {i for i in epoch1 if i >= 100}
    neg2 = {i for i in epoch2 if i >= 100}
    assert len(neg1) == 50 and len(neg2) == 50  # drawn without replacement
    assert neg1 != neg2  # fresh each epoch
    for epoch in (epoch1, epoch2):
        draws = Counter(i for i in epoch if i < 100)
        assert sum(draws[i] for i in range(90, 100)) == 50  # each class gets half of the epoch
        assert all(draws[i] == 5 for i in range(90, 100))  # minority images repeated evenly, none left out
        assert max(draws[i] for i in range(90)) == 1  # majority images drawn at most once
    assert {i for i in epoch1 if i < 90} != {i for i in epoch2 if i < 90}


def test_balanced_sampler_shows_a_balanced_set_exactly_once_per_epoch():
    # a weighted draw with replacement would leave about a third of the images out of every epoch
    sampler = EpochSampler([0, 1, 1, 0] * 25, n_pool=0, n_negatives=0, balance=True,
                           generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        epoch = list(sampler)
        assert sorted(epoch) == list(range(100))


def test_epoch_sampler_is_reproducible_from_generator_state():
    gen = torch.Generator().manual_seed(3)
    sampler = EpochSampler([0, 1] * 20, n_pool=30, n_negatives=10, balance=False, generator=gen)
    list(sampler)
    state = gen.get_state()
    expected = list(sampler)
    gen.set_state(state)
    assert list(sampler) == expected


def test_negatives_count_ratio_count_and_cap():
    assert negatives_count(0.25, 400, 1000) == 100
    assert negatives_count(300, 400, 1000) == 300
    assert negatives_count(5000, 400, 1000) == 1000
    assert negatives_count(0.0, 400, 1000) == 0


def test_hard_negatives_drawn_more_often_but_bounded():
    gen = torch.Generator().manual_seed(0)
    miner = HardNegativeMiner(n_main=20, n_pool=200, max_weight=4.0)
    sampler = EpochSampler([0, 1] * 10, n_pool=200, n_negatives=20, balance=False, generator=gen, miner=miner)
    hard = np.arange(20, 30) + 20  # pool images 20..29 (dataset indices 40..49)
    miner.update(hard, np.ones(10))
    miner.update(hard, np.ones(10))  # hardness 1.0: first score as it is, then the running mean
    weights = miner.weights().numpy()
    assert weights.max() / weights.min() <= 4.0 + 1e-9 and weights[hard - 20].min() > 3.0
    hits = Counter()
    for _ in range(200):
        hits.update(i for i in sampler if i >= 20)
    hard_rate = np.mean([hits[i] for i in hard]) / 200
    easy_rate = np.mean([hits[i] for i in range(50, 220)]) / 200
    assert 2.0 < hard_rate / easy_rate < 4.5  # favoured, within the bound
    assert miner.last_mined <= 10
    # main-set items never change pool hardness
    miner.update(np.array([0, 1]), np.array([1.0, 1.0]))
    assert set(np.nonzero(miner.hardness)[0]) == set(hard - 20)


REALISM = ["TextOverlay", "Watermark", "Border", "Collage", "ScreenshotFrame", "SmallBlurry"]


@pytest.mark.parametrize("name", REALISM)
def test_realism_transform_gives_a_valid_image_of_the_same_size(name):
    import albumentations as A

    from training import realism

    img = np.asarray(photo(3, (150, 110)))
    out = A.Compose([getattr(realism, name)(p=1.0)], seed=2)(image=img)["image"]
    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - img).mean() > 0.05  # it changed something


def test_realism_steps_in_a_training_pipeline():
    from training.config import AugmentStep

    steps = Config().augment.train + [AugmentStep(name=n, p=1.0) for n in REALISM]
    x = TrainTransform(steps, Preprocessing(input_size=64))(np.asarray(photo(4, (120, 90))))
    assert x.shape == (3, 64, 64) and torch.isfinite(x).all()


def test_paired_views_leave_the_pictures_augmentation_alone():
    """A transform with condition views gives the picture it gives without them (same seed), plus the picture
    under one of the views -- here greyscale, so the view's three channels carry one picture."""
    from training.config import AugmentStep

    pre = Preprocessing(input_size=64)
    img = np.asarray(photo(5, (120, 90)))
    plain = TrainTransform(Config().augment.train, pre, seed=3)
    paired = TrainTransform(Config().augment.train, pre, seed=3, views=[[AugmentStep(name="ToGray", p=1.0)]])
    for _ in range(3):
        x = plain(img)
        y, view = paired(img)
        assert torch.equal(x, y)
        rgb = view * torch.tensor(pre.std).view(3, 1, 1) + torch.tensor(pre.mean).view(3, 1, 1)
        assert (rgb[0] - rgb[1]).abs().max() < 1e-5 and (rgb[1] - rgb[2]).abs().max() < 1e-5
        assert (x - view).abs().mean() > 0.01


def test_every_default_condition_view_builds_and_changes_the_picture():
    from training.config import ConsistencyConfig

    pre = Preprocessing(input_size=64)
    img = np.asarray(photo(6, (120, 90)))
    for view in ConsistencyConfig().views:
        x, v = TrainTransform([], pre, seed=1, views=[view])(img)
        assert v.shape == x.shape == (3, 64, 64) and torch.isfinite(v).all()
        assert (x - v).abs().mean() > 0.001, view
