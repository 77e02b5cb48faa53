"""Session 32, helper H4: training on leaked data, ``data ingest --into`` a split folder, a config file's typos.

Each test names what happened before its fix.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from serving.errors import InvalidInput, MissingInput
from training.config import load_config, resolve_config
from tests.test_s30_training_data import FAST, _photo


def _root(root: Path, per_split: dict[str, int], labels=("ivory", "other"), seed: int = 0) -> Path:
    """ROOT/<split>/<label>/ with ``per_split[split]`` different photos per label."""
    for split, n in per_split.items():
        for label in labels:
            for i in range(n):
                seed += 1
                _photo(root / split / label / f"{label}_{i}.jpg", seed)
    return root


@pytest.fixture
def no_caching(monkeypatch):
    """Fail the test if any image is decoded into the cache: a refusal must come before that work."""
    import training.loop.data as loop_data

    def refuse(*args, **kwargs):
        raise AssertionError("images were cached before the mistake was found")

    monkeypatch.setattr(loop_data, "cache_images", refuse)


# --- 1: train on validation images that are training images ------------------------------------------------------

def test_train_refuses_a_val_folder_copied_from_train_before_caching(tmp_path, no_caching):
    """Before: rc 0 and no word; the best epoch, val metrics and calibrated thresholds were fitted on training images."""
    from training.loop.data import DataError
    from training.train import train

    root = _root(tmp_path / "dl", {"train": 3})
    shutil.copytree(root / "train", root / "val")
    with pytest.raises(DataError) as err:
        train([str(root)], tmp_path / "run", load_config(None, FAST))
    message = str(err.value)
    assert "6 of the 6 validation images are exact copies of training images" in message
    assert f"{root}/train/ivory/ivory_0.jpg = {root}/val/ivory/ivory_0.jpg" in message
    assert f"wildcheck data check {root}" in message
    assert not (tmp_path / "run" / "best.pt").exists()


def test_a_manifest_listing_its_files_under_both_splits_is_refused(tmp_path, no_caching):
    from training.loop.data import DataError, TrainData, resolve_preprocessing

    root = _root(tmp_path / "m", {"train": 2})
    rows = [f"train/{label}/{label}_{i}.jpg,{label},{split}" for split in ("train", "val")
            for label in ("ivory", "other") for i in range(2)]
    (root / "manifest.csv").write_text("path,label,split\n" + "\n".join(rows) + "\n")
    config = load_config(None, FAST)
    with pytest.raises(DataError, match="4 of the 4 validation images are exact copies"):
        TrainData.build([str(root)], config, resolve_preprocessing(config), say=lambda *a: None, quiet=True)


def test_a_few_copies_and_a_picture_under_two_labels_are_said_and_recorded_in_the_run(tmp_path, capsys):
    """A few stray copies (real datasets may have some) still train, but the run says so, with the counts and two
    examples, and summary.json keeps the counts. Before: nothing was said or recorded."""
    from training.train import train

    root = _root(tmp_path / "dw", {"train": 4, "val": 3, "test": 2})
    shutil.copy(root / "train/ivory/ivory_0.jpg", root / "val/ivory/copy.jpg")
    shutil.copy(root / "train/ivory/ivory_1.jpg", root / "train/other/mislabelled.jpg")
    summary = train([str(root)], tmp_path / "run", load_config(None, FAST))
    said = capsys.readouterr().out
    warning = next(line for line in said.splitlines() if line.startswith("warning:"))
    assert ("1 validation image(s) are exact copies of training images, 1 picture(s) are the same file under two "
            "labels") in warning
    assert f"{root}/train/ivory/ivory_0.jpg = {root}/val/ivory/copy.jpg" in warning
    assert f"{root}/train/ivory/ivory_1.jpg = {root}/train/other/mislabelled.jpg" in warning
    assert f"wildcheck data check {root}" in warning
    recorded = json.loads((tmp_path / "run" / "summary.json").read_text())["data_overlap"]
    assert recorded == summary["data_overlap"]
    assert (recorded["val_in_train"], recorded["val"], recorded["test_in_train"], recorded["label_conflicts"]) == (1, 7, 0, 1)


def test_data_without_copies_trains_without_a_warning(tmp_path):
    from training.loop.data import TrainData, resolve_preprocessing

    root = _root(tmp_path / "ok", {"train": 3, "val": 2})
    config = load_config(None, FAST)
    said = []
    data = TrainData.build([str(root)], config, resolve_preprocessing(config), say=said.append, quiet=True)
    assert not [line for line in said if "exact copies" in line or "two labels" in line]
    assert data.overlap == {"val_in_train": 0, "val": 4, "test_in_train": 0, "test": 0, "label_conflicts": 0,
                            "examples": []}


def test_met_ivory_has_no_exact_copies_across_its_splits():
    """What the warn-or-refuse line was drawn on: the real dataset has no exact copy across splits nor under two
    labels, so refusing validation made mostly of copies cannot stop a real run."""
    from tests.conftest import shared_dataset
    from training.data.sources import load_samples, select_split
    from training.loop.data import exact_overlap

    samples = load_samples([shared_dataset("met-ivory")])
    overlap = exact_overlap(select_split(samples, "train"), select_split(samples, "val"), select_split(samples, "test"))
    assert overlap["val"] > 100
    assert (overlap["val_in_train"], overlap["test_in_train"], overlap["label_conflicts"]) == (0, 0, 0)


# --- 2: data ingest --into a split folder ------------------------------------------------------------------------

def _labels_csv(tmp_path: Path) -> Path:
    new = _photo(tmp_path / "incoming" / "new.jpg", seed=999)
    csv = tmp_path / "new.csv"
    csv.write_text(f"path,label\n{new},ivory\n")
    return csv


@pytest.mark.parametrize("into", ["ds/train", "ds/train/ivory"])
def test_ingest_into_a_split_or_label_folder_is_refused_naming_the_root(tmp_path, monkeypatch, into):
    """Before: rc 0; it wrote ds/train/manifest.csv and ds/train/train/ivory/<hash>.jpg, checked duplicates against
    ds/train alone, and the next `train --data ds` learnt a class `train`."""
    from training.data.ingest import ingest

    monkeypatch.chdir(tmp_path)
    root = _root(tmp_path / "ds", {"train": 2, "val": 1})
    before = sorted(p for p in root.rglob("*"))
    with pytest.raises(InvalidInput) as err:
        ingest(_labels_csv(tmp_path), Path(into))
    assert f"--into {into} is " in str(err.value) and "Give the dataset root: --into ds --split train" in str(err.value)
    assert sorted(p for p in root.rglob("*")) == before  # nothing written


def test_ingest_into_the_dataset_root_still_works_even_when_it_is_named_train(tmp_path):
    from training.data.ingest import ingest

    root = _root(tmp_path / "train", {"train": 2, "val": 1})  # a dataset root that happens to be called train
    report = ingest(_labels_csv(tmp_path), root)
    assert [a["label"] for a in report["added"]] == ["ivory"]
    assert (root / report["added"][0]["to"]).is_file() and (root / "manifest.csv").is_file()


def test_cli_ingest_into_a_split_folder_exits_2_with_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from training.cli import app

    monkeypatch.chdir(tmp_path)
    _root(tmp_path / "ds", {"train": 1, "val": 1})
    result = CliRunner().invoke(app, ["data", "ingest", str(_labels_csv(tmp_path)), "--into", "ds/train"])
    assert result.exit_code == 2, result.output
    assert "--into ds/train is the train split folder of the dataset ds" in result.output
    assert not (tmp_path / "ds" / "train" / "manifest.csv").exists()


# --- 3: a config file's typos ------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("trian:\n  lr: 0.1\n", "the config has no section 'trian'; sections: model, data, augment, train, decision"),
    ("train:\n  lrr: 0.1\n", "train has no key 'lrr'; keys: epochs, batch_size, lr,"),
    ("augment:\n  train:\n    - name: ToGray\n      prob: 0.5\n", "augment.train.0 has no key 'prob'; keys: name, p, params"),
])
def test_a_typo_in_a_config_file_is_one_line_naming_the_valid_keys(tmp_path, text, expected):
    """Before: pydantic's multi-line dump with an errors.pydantic.dev link, while --set typos were one line."""
    path = tmp_path / "typo.yaml"
    path.write_text(text)
    with pytest.raises(InvalidInput) as err:
        resolve_config(path)
    message = str(err.value)
    assert message.startswith(f"invalid config {path}: {expected}")
    assert "\n" not in message and "pydantic" not in message


def test_a_config_file_with_a_typo_and_a_bad_value_names_both(tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text("train:\n  lrr: 0.1\n  epochs: many\n")
    with pytest.raises(InvalidInput) as err:
        resolve_config(path)
    assert "train has no key 'lrr'" in str(err.value) and "train.epochs: Input should be a valid integer (got 'many')" \
        in str(err.value) and "\n" not in str(err.value)


def test_a_config_that_is_a_folder_says_so(tmp_path):
    """Before: "config /tmp not found", of a folder that is there."""
    with pytest.raises(InvalidInput, match=f"config {tmp_path} is a folder, not a YAML file"):
        resolve_config(tmp_path)
    with pytest.raises(MissingInput, match="not found"):
        resolve_config(tmp_path / "missing.yaml")
