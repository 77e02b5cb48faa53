"""Output paths of evaluate, explain and export, atomic writes of long names, and what a fresh run removes from its
folder. Each test failed before its fix (session 32)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import tiny_config
from tests.test_s27_outputs import _cli, _refused, _snapshot


@pytest.fixture()
def data(tmp_path, synth_root) -> Path:
    copy = tmp_path / "d"
    shutil.copytree(synth_root, copy)
    return copy


# --- 1: evaluate --predictions among --out's own files ---------------------------------------------------------------

def test_evaluate_predictions_is_never_out_or_a_file_evaluate_writes_there(tmp_path, trained_run, data):
    """Before: `--out ev --predictions ev/metrics.json` put the CSV in metrics.json (exit 0, metrics lost), and
    `--predictions ev` failed with IsADirectoryError after all the scoring."""
    out = tmp_path / "ev"
    for predictions, says in [(out / "metrics.json", "is metrics.json, which evaluate writes into --out"),
                              (out, "is the --out folder"),
                              (out / "pr_curves.png", "is pr_curves.png"),
                              (out / "false_positives_by_source" / "p.csv", "is in false_positives_by_source/")]:
        _refused(_cli("evaluate", trained_run, "--data", data, "--split", "val", "--out", out,
                      "--predictions", predictions), says, "--predictions " + str(out / "predictions.csv"))
        assert not out.exists()
    result = _cli("evaluate", trained_run, "--data", data, "--out", out, "--predictions", out / "predictions.csv")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "metrics.json").read_text())["n"] > 0
    assert (out / "predictions.csv").read_text().startswith("path,label,pred")
    # the last line names every file written: false_positives.png was drawn but not listed
    wrote = [line for line in result.output.splitlines() if line.startswith(f"wrote {out}")]
    assert (out / "false_positives.png").is_file() and "false_positives.png" in wrote[-1]


# --- 2: explain --out inside the dataset around an image ------------------------------------------------------------

def test_explain_out_anywhere_in_the_dataset_of_its_images_is_refused(tmp_path, trained_run, data):
    """Before: `explain RUN d/val/ivory/x.jpg --out d/val/heatmaps` wrote an overlay that `data check` and `train`
    then read as a val image of a new label `heatmaps`; only the image's own folder counted as read."""
    image = sorted((data / "val" / "ivory").glob("*.jpg"))[0]
    before = _snapshot(data)
    _refused(_cli("explain", trained_run, image, "--out", data / "val" / "heatmaps"), f"is inside {data}")
    _refused(_cli("explain", trained_run, data / "val" / "ivory", "--out", data / "heatmaps"), f"is inside {data}")
    assert _snapshot(data) == before
    # outside the dataset it writes
    result = _cli("explain", trained_run, image, "--out", tmp_path / "heatmaps")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "heatmaps" / f"{image.stem}.png").is_file()


def test_a_split_name_far_up_an_images_path_makes_no_dataset_of_it(tmp_path, trained_run, data):
    """A folder called `test` several levels above the photos (a project folder) is no split: --out beside them
    is allowed, where every ancestor named train/val/test made its parent a dataset root that --out could not enter."""
    photos = tmp_path / "test" / "listings" / "2024" / "week1"
    photos.mkdir(parents=True)
    image = photos / "x.jpg"
    shutil.copy(sorted((data / "val" / "ivory").glob("*.jpg"))[0], image)
    result = _cli("explain", trained_run, image, "--out", tmp_path / "test" / "heatmaps")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "test" / "heatmaps" / "x.png").is_file()


# --- 3: long names: atomic writes and explain's batch ---------------------------------------------------------------

@pytest.mark.parametrize("name", ["y" * 251 + ".png", "象" * 83 + ".txt"])  # 255 bytes: the file system's limit
def test_atomic_write_takes_any_name_the_file_system_accepts(tmp_path, name):
    """Before: mkstemp's prefix `.NAME.` plus 8 random characters and `.tmp` made the temporary's name too long for
    any NAME over ~237 bytes: OSError File name too long."""
    from training.fileio import atomic_write_text

    atomic_write_text(tmp_path / name, "kept")
    assert (tmp_path / name).read_text() == "kept" and [p.name for p in tmp_path.iterdir()] == [name]


def test_one_image_never_sinks_explains_batch(tmp_path, trained_run, data):
    """Before: one image named with 241 characters (its temporary overlay's name too long), or one overlay that
    could not be written, ended the run with a traceback and no explanations.json."""
    photos = tmp_path / "photos"
    photos.mkdir()
    ivory = sorted((data / "val" / "ivory").glob("*.jpg"))
    long_name = photos / ("y" * 241 + ".jpg")
    shutil.copy(ivory[0], long_name)
    shutil.copy(ivory[1], photos / "a.jpg")
    shutil.copy(ivory[2], photos / "b.jpg")
    out = tmp_path / "ex"
    (out / "b.png").mkdir(parents=True)  # b.jpg's overlay cannot be written: a folder holds its name
    result = _cli("explain", trained_run, photos, "--out", out)
    assert result.exit_code == 1, result.output  # one image skipped, with its reason
    records = {Path(r["image"]).name: r for r in json.loads((out / "explanations.json").read_text())}
    assert set(records) == {long_name.name, "a.jpg", "b.jpg"}
    assert records["b.jpg"]["error"].startswith("overlay not written")
    assert (out / records[long_name.name]["overlay"]).is_file() and (out / records["a.jpg"]["overlay"]).is_file()
    assert not list(out.glob(".*.tmp"))


# --- 4: export --out inside the data its parity check reads ---------------------------------------------------------

def test_export_out_inside_the_data_it_reads_is_refused(tmp_path, trained_run, data, synth_root):
    """Before: `export RUN --out d/train/ivory/model.onnx` wrote the model among the images the parity check read
    (the run's recorded root, or --data): out_file was called without `reads`."""
    before = _snapshot(data)
    _refused(_cli("export", trained_run, "--data", data, "--out", data / "train" / "ivory" / "model.onnx"),
             f"is inside {data}")
    assert _snapshot(data) == before
    recorded = synth_root / "val" / "ivory" / "model.onnx"  # the root the run recorded, read without --data
    try:
        _refused(_cli("export", trained_run, "--out", recorded), f"is inside {synth_root}")
        assert not recorded.exists()
    finally:
        recorded.unlink(missing_ok=True)  # the session's dataset: never leave a model in it


# --- 5: a fresh run removes every file of the earlier one -----------------------------------------------------------

def test_a_fresh_run_removes_every_file_the_earlier_run_and_its_follow_ups_wrote(tmp_path, trained_run):
    """Before: the earlier run's reliability.png (calibrate's) stayed beside a new run killed before its first
    epoch."""
    from training.loop.rundir import RUN_FILES, RunDir

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)  # train, then calibrate (the fixture does both)
    assert {p.name for p in run.iterdir()} <= set(RUN_FILES)  # every file a run gets is one a run knows it writes
    RunDir(run, say=lambda *_: None).write_setup(tiny_config(), ["ivory", "other"], [])
    # what stays is what the new run has just written (and history.csv, which it truncates next)
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "history.csv", "labels.json", "skipped.json"]
