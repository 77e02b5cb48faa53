"""benchmarks/head_refit.py: the refitted head fits the features it is given, is held to the trained head as far
as ``lam`` says, the training photos are the main root's plus an even draw from each negatives pool, and the grey
route's copies and test are PIL's greyscale."""

import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from head_refit import even_pool_sample, fit_head, grey, input_spread  # noqa: E402

from serving.preprocess import Preprocessing  # noqa: E402
from tests.conftest import photo  # noqa: E402
from training.data.sources import Sample  # noqa: E402


def _features(rng: np.random.RandomState, n: int = 200):
    y = np.arange(n) % 2
    x = rng.normal(0, 1, (n, 8)).astype(np.float32)
    x[:, 0] += np.where(y == 1, 3.0, -3.0)  # class 1 lies along +e0
    return x, y


def test_a_loose_head_learns_the_features_and_a_tight_one_stays_put():
    rng = np.random.RandomState(0)
    x, y = _features(rng)
    w0 = np.zeros((2, 8), np.float32)
    w0[1, 0], w0[0, 0] = -1.0, 1.0  # the trained head has the classes the wrong way round
    b0 = np.zeros(2, np.float32)
    assert np.mean((x @ w0.T + b0).argmax(1) == y) < 0.1
    w, b = fit_head(x, y, w0, b0, lam=1e-3)
    assert np.mean((x @ w.T + b).argmax(1) == y) > 0.95
    w, b = fit_head(x, y, w0, b0, lam=1e4)
    np.testing.assert_allclose(w, w0, atol=1e-3)


def test_the_training_photos_are_the_main_root_and_an_even_draw_of_the_pools():
    main = [Sample(Path(f"m{i}.jpg"), "ivory" if i % 2 else "other", "train", pool="met-ivory") for i in range(10)]
    big = [Sample(Path(f"b{i}.jpg"), "other", "train", pool="big") for i in range(100)]
    small = [Sample(Path(f"s{i}.jpg"), "other", "train", pool="small") for i in range(5)]
    kept_main, pool = even_pool_sample(main + big + small, ["/data/met-ivory"], 30, seed=0)
    assert kept_main == main
    assert sum(s.pool == "small" for s in pool) == 5 and sum(s.pool == "big" for s in pool) == 25


def test_the_grey_copy_is_pils_greyscale_and_only_it_routes_as_grey():
    img = photo(5, size=(64, 48))
    rgb = np.asarray(img)
    pil_grey = np.asarray(img.convert("L").convert("RGB"))
    assert np.abs(grey(rgb).astype(int) - pil_grey.astype(int)).max() <= 1
    pre = Preprocessing(input_size=32, crop_pct=0.875, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    spread = input_spread(np.stack([pre(Image.fromarray(a)) for a in (grey(rgb), pil_grey, rgb)]), pre)
    assert spread[0] < 0.01 and spread[1] < 0.01  # unequal mean/std are undone before the channels are compared
    assert spread[2] > 4  # the test photo has colour: it takes the trained head
