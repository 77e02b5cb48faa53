"""Configs: YAML validated into typed objects, unknown keys and 1.x-style augmentation arguments refused."""

from pathlib import Path

import pytest

from serving.preprocess import Preprocessing
from training.augment import TrainTransform
from training.config import AugmentStep, Config, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    TrainTransform(cfg.augment.train, Preprocessing(input_size=cfg.data.img_size))


def test_default_yaml_is_the_code_default():
    assert load_config(REPO / "configs" / "default.yaml") == Config()


def test_unknown_key_is_an_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    with pytest.raises(ValueError, match="epochz"):
        load_config(bad)


def test_overrides_apply_and_none_means_keep():
    cfg = load_config(None, {"train": {"epochs": 3, "lr": None}})
    assert cfg.train.epochs == 3 and cfg.train.lr == Config().train.lr


def test_albumentations_1x_argument_is_refused():
    # albumentations 2.x would only warn about quality_lower and then ignore it
    with pytest.raises(ValueError, match="quality_lower"):
        TrainTransform([AugmentStep(name="ImageCompression", params={"quality_lower": 30})], Preprocessing())
    with pytest.raises(ValueError, match="unknown augmentation"):
        TrainTransform([AugmentStep(name="NoSuchTransform")], Preprocessing())
