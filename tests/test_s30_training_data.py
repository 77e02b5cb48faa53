"""Session 30, helper B: the training data pipeline and loop on hostile files and odd configs.

Each test names what broke before its fix. Runs that must stop before any image is decoded have ``cache_images``
replaced by a function that fails the test, so a check that came after caching (minutes on real data) fails here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from serving.errors import InvalidInput, WildcheckError
from serving.preprocess import Preprocessing
from training.augment import AugmentError, TrainTransform
from training.config import AugmentStep, load_config, resolve_config

FAST = {"train": {"epochs": 1, "batch_size": 4, "threads": 1, "mixup": {"prob": 0.0}},
        "data": {"img_size": 32, "min_side": 8, "num_workers": 0, "cache_workers": 1},
        "decision": {"calibrate": False}}


def _photo(path: Path, seed: int, size: int = 40) -> Path:
    from tests.conftest import photo

    path.parent.mkdir(parents=True, exist_ok=True)
    photo(seed, (size, size)).save(path, "JPEG", quality=90)
    return path


def _root(root: Path, train: dict[str, int], val: dict[str, int], seed: int = 0) -> Path:
    for split, counts in (("train", train), ("val", val)):
        for label, n in counts.items():
            for i in range(n):
                seed += 1
                _photo(root / split / label / f"{label}_{i}.jpg", seed)
    return root


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` 1-bit pixels (no pixel data: never decoded that far)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)) + chunk(b"IEND", b"")


def _config(**sections):
    merged = {key: dict(value) for key, value in FAST.items()}
    for key, value in sections.items():
        merged.setdefault(key, {}).update(value)
    return load_config(None, merged)


@pytest.fixture
def no_caching(monkeypatch):
    """Fail the test if any image is decoded into the cache: what it checks must come first."""
    import training.loop.data as loop_data

    def refuse(*args, **kwargs):
        raise AssertionError("images were cached before the mistake was found")

    monkeypatch.setattr(loop_data, "cache_images", refuse)


# --- augmentation steps: their mistakes are one-line errors, found before any image is cached ----------------------

def test_an_augmentation_value_out_of_range_is_a_one_line_error_naming_the_step():
    """Before: albumentations' pydantic error came out as a ValueError and a traceback (`wildcheck train --set
    'augment.train=[{name: RandomResizedCrop, params: {scale: [2, 1]}}]'`)."""
    with pytest.raises(AugmentError) as err:
        TrainTransform([AugmentStep(name="RandomResizedCrop", params={"scale": [2, 1]})], Preprocessing(input_size=32))
    message = str(err.value)
    assert "RandomResizedCrop" in message and "scale" in message and "\n" not in message


@pytest.mark.parametrize("step, named", [
    # float pixels: training scaled and normalised them a second time, silently
    (AugmentStep(name="Normalize"), "float32"),
    (AugmentStep(name="ToFloat"), "float32"),
    (AugmentStep(name="ToTensorV2"), "Tensor"),
    (AugmentStep(name="ToGray", p=0.2, params={"num_output_channels": 1}), "shape"),
    # failed in the first training batch, after caching
    (AugmentStep(name="SmallBlurry", p=0.05, params={"min_side": 300}), "SmallBlurry fails"),
    (AugmentStep(name="TextOverlay", p=0.1, params={"max_items": 0}), "TextOverlay fails"),
    (AugmentStep(name="BBoxSafeRandomCrop"), "bboxes"),
    (AugmentStep(name="RandomCrop", params={"height": 500, "width": 500}), "RandomCrop fails"),
])
def test_a_step_that_fails_on_a_picture_or_returns_no_rgb_picture_is_refused(step, named):
    pre = Preprocessing(input_size=32)
    with pytest.raises(AugmentError, match=named) as err:
        TrainTransform([AugmentStep(name="RandomResizedCrop"), step], pre)
    assert step.name in str(err.value)


def test_a_bad_condition_view_is_refused_naming_the_views():
    pre = Preprocessing(input_size=32)
    with pytest.raises(AugmentError, match="train.consistency.views: Normalize"):
        TrainTransform([], pre, views=[[AugmentStep(name="ToGray", p=1.0)], [AugmentStep(name="Normalize", p=1.0)]])


def test_a_step_that_fails_in_the_first_batch_stops_training_before_caching(tmp_path, no_caching):
    from training.train import train

    root = _root(tmp_path / "data", {"ivory": 2, "other": 2}, {"ivory": 1, "other": 1})
    config = _config(augment={"train": [{"name": "RandomResizedCrop"}, {"name": "Normalize"}]})
    with pytest.raises(WildcheckError, match="Normalize returns a float32"):
        train([str(root)], tmp_path / "run", config)
    assert not (tmp_path / "run" / "last.pt").exists()


# --- validation that cannot happen is found before training, not after its first epoch -----------------------------

def test_validation_without_a_trained_label_is_refused_before_caching(tmp_path, no_caching):
    """Before: every val label missing from train left validation empty, and the run trained an epoch, then died with
    ValueError('no images to evaluate') and a traceback."""
    from training.train import train

    root = _root(tmp_path / "data", {"ivory": 2, "other": 2}, {"tiger_skin": 2})
    with pytest.raises(WildcheckError, match="no validation image has a label of the training data"):
        train([str(root)], tmp_path / "run", _config())


def test_unreadable_validation_images_stop_the_run_before_any_training_step(tmp_path):
    from training.train import train

    root = _root(tmp_path / "data", {"ivory": 2, "other": 2}, {"ivory": 1, "other": 1})
    for path in (root / "val").rglob("*.jpg"):
        path.write_text("not a picture")
    steps = []
    with pytest.raises(WildcheckError, match="none of the 2 validation image"):
        train([str(root)], tmp_path / "run", _config(), on_batch=lambda epoch, idx: steps.append(idx))
    assert steps == [] and not (tmp_path / "run" / "last.pt").exists()


# --- negatives pools ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("inside", ["", "train"])
def test_a_data_root_given_as_negatives_is_refused(tmp_path, no_caching, inside):
    """Before: `--data d --negatives d` (or d/train) trained every ivory photo of d as `other` too, silently, and
    validated its val photos under both labels."""
    from training.train import train

    root = _root(tmp_path / "data", {"ivory": 2, "other": 2}, {"ivory": 1, "other": 1})
    negatives = str(root / inside) + "/" if inside else f"{root}/"
    config = _config(data={"negatives": [negatives]})
    with pytest.raises(WildcheckError, match=r"both in the data and in the negatives pools.*'ivory'"):
        train([str(root)], tmp_path / "run", config)


def test_a_negatives_root_given_twice_is_one_pool(tmp_path):
    """Before: `--negatives p --negatives ./p/` put each photo in the pool twice (drawn twice as often, two pools of
    one name) and each validation negative twice."""
    from training.loop.data import negative_samples

    pool = _root(tmp_path / "pool", {"misc": 3}, {"misc": 2})
    found, groups, val = negative_samples([str(pool), f"{pool}/", str(pool / ".." / "pool")], "other", 400, 0)
    assert len(found) == 3 and set(groups) == {0} and len(val) == 2


def test_a_label_only_in_the_pool_that_no_epoch_draws_is_refused(tmp_path, no_caching):
    """Before: with data of ivory alone and `data.negatives_per_epoch: 0`, `other` came only from the pool, none of it
    was drawn, and the model trained on ivory alone without a word."""
    from training.train import train

    root = _root(tmp_path / "data", {"ivory": 3}, {"ivory": 1})
    pool = _root(tmp_path / "pool", {"misc": 3}, {"misc": 1}, seed=50)
    config = _config(data={"negatives": [str(pool)], "negatives_per_epoch": 0.0})
    with pytest.raises(WildcheckError, match=r"\['other'\] have training images only in the negatives pools"):
        train([str(root)], tmp_path / "run", config)


def test_loss_balance_weighs_what_an_epoch_draws_not_the_whole_pool(tmp_path):
    """Before: `data.balance: loss` counted all 12 pool negatives although an epoch draws 4 of them: `other` weighed
    0.625 and ivory 2.5 (4x) where an epoch shows 8 `other` and 4 ivory images (2x)."""
    import torch

    from training.loop.data import TrainData, resolve_preprocessing

    root = _root(tmp_path / "data", {"ivory": 4, "other": 4}, {"ivory": 1, "other": 1})
    pool = _root(tmp_path / "pool", {"misc": 12}, {}, seed=50)
    config = _config(data={"negatives": [str(pool)], "negatives_per_epoch": 4, "balance": "loss"})
    data = TrainData.build([str(root)], config, resolve_preprocessing(config), say=lambda *a: None, quiet=True)
    data.build_sampler(config)
    weight = data.class_weight(torch.device("cpu"))
    assert data.labels == ["ivory", "other"]
    assert weight.tolist() == pytest.approx([1.5, 0.75])


# --- the model and the schedule ---------------------------------------------------------------------------------------

def test_a_model_that_cannot_read_the_input_size_is_refused_before_caching(tmp_path, no_caching):
    """Before: a ViT at another size than its name's trained nothing: AssertionError('Input height (32) doesn't match
    model (224)') with a traceback in the first step, after caching."""
    from training.train import train

    root = _root(tmp_path / "data", {"ivory": 2, "other": 2}, {"ivory": 1, "other": 1})
    config = _config(model={"name": "vit_tiny_patch16_224", "pretrained": "none"})
    with pytest.raises(InvalidInput, match=r"cannot read a 32x32 picture \(data.img_size 32\)"):
        train([str(root)], tmp_path / "run", config)


def test_a_warmup_as_long_as_the_run_is_refused_naming_what_set_it(tmp_path):
    """Before: `--epochs 2 --set train.warmup_epochs=3` trained the whole run in warmup (lr never reaching
    train.lr, no decay), without a word."""
    with pytest.raises(InvalidInput, match=r"--set train.warmup_epochs=3 and --epochs 2: .*not shorter than "
                                           r"train.epochs 2"):
        resolve_config(epochs=2, sets=["train.warmup_epochs=3"])
    resolve_config(epochs=2, sets=["train.warmup_epochs=1.5"])  # shorter than the run: fine


def test_train_refuses_a_warmup_as_long_as_the_run_before_any_work(tmp_path, no_caching):
    from training.train import train

    config = _config(train={"epochs": 2, "warmup_epochs": 2.0})
    with pytest.raises(InvalidInput, match="not shorter than train.epochs 2"):
        train([str(tmp_path / "nowhere")], tmp_path / "run", config)
    assert not (tmp_path / "run").exists()


# --- real files of odd kinds (a guard: decoding handles them; one bad file never sinks the cache) ------------------

def test_odd_image_files_are_cached_as_rgb_or_skipped_with_a_reason(tmp_path):
    from tests.conftest import exif_rotated_jpeg, photo
    from training.data.cache import cache_images
    from training.data.sources import Sample

    folder = tmp_path / "odd"
    folder.mkdir()
    base = photo(3, (80, 60))
    base.convert("P").save(folder / "palette.png", transparency=0)
    base.convert("LA").save(folder / "la.png")
    base.convert("1").save(folder / "bits.png")
    Image.new("RGBA", (80, 60), (0, 0, 0, 0)).save(folder / "transparent.png")
    frames = [photo(i, (80, 60)) for i in range(3)]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:])
    frames[0].save(folder / "anim.webp", save_all=True, append_images=frames[1:])
    Image.fromarray((np.random.default_rng(0).random((60, 80)) * 65535).astype(np.uint16)).save(folder / "i16.png")
    (folder / "exif.jpg").write_bytes(exif_rotated_jpeg(base))
    (folder / "heic.jpg").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 200)
    Image.new("RGB", (1, 1)).save(folder / "one.png")
    (folder / "bomb.png").write_bytes(_png_header(30000, 30000))  # 900 Mpx once decoded: refused from its header
    Image.new("RGB", (3000, 40)).save(folder / "strip.png")  # 75:1
    samples = [Sample(p, "other", "train") for p in sorted(folder.iterdir())]
    samples.append(Sample(folder / "removed.jpg", "other", "train"))  # listed, then gone before it was read
    pixels, kept, skipped = cache_images(samples, Preprocessing(input_size=32), min_side=8, workers=1, quiet=True)
    assert {s.path.name for s in kept} == {"palette.png", "la.png", "bits.png", "transparent.png", "anim.gif",
                                           "anim.webp", "i16.png", "exif.jpg"}
    assert all(p.dtype == np.uint8 and p.ndim == 3 and p.shape[2] == 3 and min(p.shape[:2]) == 36 for p in pixels)
    reasons = {Path(s.path).name: s.reason.split(":")[0] for s in skipped}
    assert reasons == {"heic.jpg": "not_an_image", "one.png": "too_small", "bomb.png": "too_many_pixels",
                       "strip.png": "extreme_aspect_ratio", "removed.jpg": "unreadable"}
    transparent = pixels[[s.path.name for s in kept].index("transparent.png")]
    assert (transparent == 255).all()  # transparent pixels are white, as listing pages show them
    rotated = pixels[[s.path.name for s in kept].index("exif.jpg")]
    assert rotated.shape[1] > rotated.shape[0]  # stored 60x80, shown 80x60


def test_a_manifest_label_of_spaces_is_an_empty_label_error(tmp_path):
    """Before: `a.jpg, ,train` passed the empty-label check (it ran before the label was stripped) and trained a class
    named ''."""
    from training.data.sources import load_samples

    _photo(tmp_path / "a.jpg", 1)
    _photo(tmp_path / "b.jpg", 2)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label,split\na.jpg,ivory,train\nb.jpg, ,train\n")
    with pytest.raises(InvalidInput, match=r"manifest.csv:3: empty path or label"):
        load_samples([manifest])


@pytest.mark.parametrize("text", ["step,loss\n1,0.5\n", "epoch,loss\nfinal,0.5\n", b"epoch\n\xff\xfe1\n"])
def test_a_fresh_run_replaces_a_history_csv_that_is_not_its_own(tmp_path, text):
    """Before: `wildcheck train --out DIR` into a folder holding another tool's history.csv (no `epoch` column, a
    non-numeric or non-UTF-8 epoch) died with KeyError/ValueError after caching, when it cut the old history."""
    from training.loop.rundir import HISTORY_FIELDS, RunDir, append_history

    history = tmp_path / "history.csv"
    history.write_bytes(text if isinstance(text, bytes) else text.encode())
    run = RunDir(tmp_path, say=lambda *a: None)
    run.truncate_history(0)
    assert history.read_text() == ",".join(HISTORY_FIELDS) + "\n"
    append_history(history, {"epoch": 1, "train_loss": 0.5})
    append_history(history, {"epoch": 2, "train_loss": 0.4})
    run.truncate_history(1)  # a resume keeps the saved epochs' rows
    assert history.read_text().splitlines()[1].startswith("1,0.5,")
    assert len(history.read_text().splitlines()) == 2


def test_skipped_images_are_counted_by_reason_in_the_log(tmp_path):
    """Before: every skipped picture was called unreadable, a 1x1 icon or a 900 Mpx bomb as much as a broken file,
    though each needs another fix."""
    import json

    from training.data.cache import Skipped
    from training.loop.rundir import RunDir

    said = []
    skipped = [Skipped("a.png", "too_small: image is 1x1"), Skipped("b.jpg", "not_an_image: the data is not an image"),
               Skipped("c.png", "too_small: image is 2x2")]
    RunDir(tmp_path, say=said.append).write_setup(_config(), ["ivory", "other"], skipped)
    assert said == [f"skipped 3 image(s) (too_small 2, not_an_image 1); see {tmp_path / 'skipped.json'}"]
    assert [s["path"] for s in json.loads((tmp_path / "skipped.json").read_text())] == ["a.png", "b.jpg", "c.png"]


def test_grey_features_are_not_reused_for_a_photo_replaced_under_its_name(tmp_path, monkeypatch):
    """Before: grey_features.npz was keyed by the weights and the photos' paths only: a photo replaced by another one
    (same name, even the same size and mtime) kept its old features, and `wildcheck grey-head` fitted on them."""
    import os
    from types import SimpleNamespace

    import torch

    import training.grey_head as grey_head
    from training.data.sources import Sample

    a, b = _photo(tmp_path / "a.jpg", 1), _photo(tmp_path / "b.jpg", 2)
    samples = [Sample(a, "ivory", "train"), Sample(b, "other", "train")]
    calls = []

    def features(network, found, spec):
        calls.append([p.read_bytes() for p in (s.path for s in found)])
        return np.full((len(found), 2), len(calls), np.float32), list(found), []

    monkeypatch.setattr(grey_head, "grey_features", features)
    ckpt = SimpleNamespace(weights={"w": torch.ones(2)}, spec=None)
    cache = tmp_path / "out" / "grey_features.npz"
    cache.parent.mkdir()
    first, _, _ = grey_head.cached_grey_features(cache, None, samples, ckpt, say=lambda *x: None)
    again, _, _ = grey_head.cached_grey_features(cache, None, samples, ckpt, say=lambda *x: None)
    assert len(calls) == 1 and (again == first).all()  # the same photos: reused
    stat = a.stat()
    other = bytearray(a.read_bytes())
    other[-3] ^= 0xFF  # other bytes, the same size
    a.write_bytes(bytes(other))
    os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime
    replaced, _, _ = grey_head.cached_grey_features(cache, None, samples, ckpt, say=lambda *x: None)
    assert len(calls) == 2 and (replaced == 2).all()


def test_workers_augment_a_resumed_epoch_as_the_uninterrupted_run_did(synth_root):
    """With DataLoader workers (8 by default on a GPU) each worker's augmentation stream was seeded once, when the
    persistent workers started: a resumed run's next epoch was augmented unlike the uninterrupted run's."""
    import torch

    from tests.conftest import tiny_config
    from training.distributed import DistInfo
    from training.loop.data import TrainData, resolve_preprocessing

    config = tiny_config(img_size=32)
    pre = resolve_preprocessing(config)

    def epoch(data, loader, n):
        data.set_epoch(config.train.seed, n)
        return [x for x, *_ in loader]

    def fresh():
        data = TrainData.build([str(synth_root)], config, pre, say=lambda *a: None, quiet=True)
        data.build_sampler(config)
        return data, data.loader(DistInfo(), 8, 2, torch.device("cpu"))

    data, loader = fresh()
    first = epoch(data, loader, 0)
    state = data.state_dict()
    second = epoch(data, loader, 1)
    resumed, resumed_loader = fresh()
    resumed.load_state_dict(state)
    again = epoch(resumed, resumed_loader, 1)
    assert len(second) == len(again) > 1 and not torch.equal(first[0], second[0])
    for a, b in zip(second, again):
        torch.testing.assert_close(a, b)
