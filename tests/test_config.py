"""Configs: YAML validated into typed objects, unknown keys and 1.x-style augmentation arguments refused."""

import re
from pathlib import Path

import pytest

from serving.preprocess import Preprocessing
from training.augment import TrainTransform
from training.config import AugmentStep, Config, load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")) + sorted((REPO / "benchmarks").glob("*.yaml")),
                         ids=lambda p: p.name)
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


# --- resolving a run's config: file, flags, --set, negatives, warm start, resume ---------------------------------

from training.config import ConfigConflict, dump_config, resolve_config  # noqa: E402


def _saved_run(tmp_path, **train) -> Path:
    """A run dir as `train` leaves it: the resolved config in config.yaml."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = load_config(None, {"train": {"epochs": 6, "batch_size": 8, **train}, "data": {"img_size": 64,
                                                                                         "negatives": ["negs/a"]}})
    (run / "config.yaml").write_text(dump_config(cfg))
    return run


def test_new_run_file_then_flags_then_set(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train: {epochs: 5, lr: 0.01}\ndata: {img_size: 96}\n")
    cfg = resolve_config(cfg_file, epochs=3, batch_size=4,
                         sets=["train.lr=0.0005", "train.mixup.prob=0", "train.grad_clip=null", "data.img_size=128"]).config
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.lr) == (3, 4, 0.0005)
    assert cfg.train.mixup.prob == 0 and cfg.train.grad_clip is None and cfg.data.img_size == 128


@pytest.mark.parametrize("item, message", [
    ("train.epochz=3", "train has no key 'epochz'; keys: epochs, batch_size"),
    ("trian.epochs=3", "the config has no key 'trian'"),
    ("train.epochs=many", "--set train.epochs=many: Input should be a valid integer"),
    ("train.epochs=0", "--set train.epochs=0: Input should be greater than or equal to 1"),
    ("train.lr.x=1", "train.lr is a value, not a section"),
    ("epochs", "write SECTION.KEY=VALUE"),
])
def test_set_refuses_unknown_keys_and_bad_values_by_name(item, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        resolve_config(None, sets=[item])


def test_warm_start_halves_epochs_unless_given(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train: {epochs: 9}\n")
    halved = resolve_config(cfg_file, warm_start=True)
    assert halved.config.train.epochs == 4 and "warm start: 4 epochs" in halved.notes[0]
    assert resolve_config(cfg_file, warm_start=True, epochs=7).config.train.epochs == 7
    # --set train.epochs asks for a number as --epochs does (it was halved: 3 asked, 2 trained)
    asked = resolve_config(cfg_file, warm_start=True, sets=["train.epochs=3"])
    assert asked.config.train.epochs == 3 and not asked.notes


def test_negatives_are_appended_once(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data: {negatives: [pool/a]}\n")
    cfg = resolve_config(cfg_file, negatives=[Path("pool/b"), Path("pool/a"), Path("pool/b")]).config
    assert cfg.data.negatives == ["pool/a", "pool/b"]


def test_resume_uses_the_saved_config_and_epochs_extend_it(tmp_path):
    run = _saved_run(tmp_path)
    same = resolve_config(None, run_dir=run, resume=True, img_size=64, negatives=[Path("negs/a")])
    assert same.config == load_config(run / "config.yaml")
    assert resolve_config(None, run_dir=run, resume=True, epochs=10).config.train.epochs == 10
    # a warm start's halved epochs were saved: resuming keeps them, it does not halve again
    assert resolve_config(None, run_dir=run, resume=True, warm_start=True).config.train.epochs == 6


@pytest.mark.parametrize("asked, key, saved, value", [
    ({"img_size": 96}, "data.img_size", 64, 96),
    ({"batch_size": 32}, "train.batch_size", 8, 32),
    ({"sets": ["train.lr=0.1"]}, "train.lr", 0.001, 0.1),
    ({"negatives": [Path("negs/b")]}, "data.negatives", ["negs/a"], ["negs/a", "negs/b"]),
])
def test_resume_refuses_what_differs_from_the_saved_run(tmp_path, asked, key, saved, value):
    """Before, --resume kept only --epochs and silently trained on with the saved values."""
    run = _saved_run(tmp_path)
    with pytest.raises(ConfigConflict) as exc:
        resolve_config(None, run_dir=run, resume=True, **asked)
    assert f"{key}: saved {saved!r}, asked {value!r}" in str(exc.value)
    assert "another --out" in str(exc.value) and str(run / "config.yaml") in str(exc.value)


def test_resume_with_a_config_file_must_match_the_saved_run(tmp_path):
    run = _saved_run(tmp_path)
    other = tmp_path / "other.yaml"
    other.write_text("train: {epochs: 6, batch_size: 8}\ndata: {img_size: 64, negatives: [negs/a]}\nmodel: {drop_rate: 0.5}\n")
    with pytest.raises(ConfigConflict, match=re.escape("model.drop_rate: saved 0.2, asked 0.5")):
        resolve_config(other, run_dir=run, resume=True)


def test_cli_resume_with_a_conflicting_override_exits_2_before_training(tmp_path):
    from typer.testing import CliRunner

    from training.cli import app

    run = _saved_run(tmp_path)
    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path), "--out", str(run), "--resume", "--img-size", "96"])
    assert result.exit_code == 2, result.output
    assert "data.img_size: saved 64, asked 96" in result.output and not (run / "last.pt").exists()
    bad = CliRunner().invoke(app, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "new"), "--set", "train.epochz=1"])
    assert bad.exit_code == 2 and "train has no key 'epochz'" in bad.output


def test_consistency_needs_a_view_when_on():
    from serving.errors import InvalidInput

    assert load_config(None, {"train": {"consistency": {"weight": 3}}}).train.consistency.views
    with pytest.raises(InvalidInput, match="needs at least one view"):
        load_config(None, {"train": {"consistency": {"weight": 3, "views": []}}})


def test_a_key_written_twice_is_refused_with_both_lines(tmp_path):
    """PyYAML kept the last of two `decision:` sections silently: the first one's never_block was lost."""
    from typer.testing import CliRunner

    from serving.errors import InvalidInput
    from training.cli import app

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("decision: {never_block: [ivory]}\ntrain: {epochs: 2}\ndecision: {calibrate: false}\n")
    with pytest.raises(InvalidInput, match=re.escape("key 'decision' appears twice (lines 1 and 3)")):
        load_config(cfg_file)
    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                                      "--config", str(cfg_file)])
    assert result.exit_code == 2 and "error: config" in result.output and "write it once" in result.output
    assert not (tmp_path / "run").exists()
    # a YAML merge key (`<<: *base`) followed by an override is not a duplicate
    from serving.yamlio import load_yaml

    assert load_yaml("base: &b {epochs: 2, lr: 0.01}\ntrain:\n  <<: *b\n  epochs: 3\n")["train"] == {"epochs": 3, "lr": 0.01}


@pytest.mark.parametrize("item, message", [
    ("decision.negative_weights={d1: .nan}", "Input should be a finite number"),
    ("decision.negative_weights={d1: .inf}", "Input should be a finite number"),
    ("decision.negative_weights={d1: -1}", "Input should be greater than or equal to 0"),
    ("train.epochs=true", "Value error, is a value, not true/false"),
    ("train.batch_size=true", "Value error, is a value, not true/false"),
    ("train.seed=-1", "Input should be greater than or equal to 0"),
    ("data.std=[0,0,0]", "Input should be greater than 0"),
    ("data.std=[.inf,1,1]", "Input should be a finite number"),
    ("data.mean=[.nan,0.5,0.5]", "Input should be a finite number"),
    ("data.interpolation=bogus", "Input should be 'bicubic', 'bilinear', 'nearest' or 'lanczos'"),
    ("train.warmup_epochs=.inf", "Input should be a finite number"),
    ("train.lr=true", "Value error, is a value, not true/false"),
    ("data.negatives_per_epoch=false", "Value error, is a value, not true/false"),
])
def test_set_refuses_values_that_would_fail_later(item, message):
    """Each was accepted and failed during training (numpy's seed, sklearn's NaN after an epoch, Preprocessing's
    interpolation) or was used as nonsense (a NaN flag rate, `true` epochs as 1); now --set names it up front."""
    from serving.errors import InvalidInput

    with pytest.raises(InvalidInput, match=re.escape(f"--set {item}: {message}")):
        resolve_config(None, sets=[item])


def test_sensible_values_of_the_tightened_settings_still_load():
    cfg = resolve_config(None, sets=["data.std=[0.2,0.2,0.2]", "data.mean=[0.4,0.4,0.4]", "train.seed=0",
                                     "data.interpolation=bilinear", "decision.negative_weights={d1: 2, d2: 0}"]).config
    assert cfg.data.std == (0.2, 0.2, 0.2) and cfg.train.seed == 0 and cfg.data.interpolation == "bilinear"
    assert cfg.decision.negative_weights == {"d1": 2.0, "d2": 0.0}


def test_config_interpolations_are_the_ones_preprocessing_knows():
    from typing import get_args

    from serving.preprocess import _INTERPOLATIONS

    literal = get_args(Config.model_fields["data"].annotation.model_fields["interpolation"].annotation)[0]
    assert set(get_args(literal)) == set(_INTERPOLATIONS)


@pytest.mark.parametrize("item", ["data.interpolation=bogus", "train.seed=-1", "data.std=[0,0,0]"])
def test_cli_bad_set_values_exit_2_before_training(tmp_path, item):
    from typer.testing import CliRunner

    from training.cli import app

    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--set", item])
    assert result.exit_code == 2 and f"error: --set {item}:" in result.output, result.output
    assert not (tmp_path / "run").exists()
