"""Output paths (training/outputs.py): no command writes over the model, an input image, a dataset's files or a
file of another kind, nor fails after its work on a path below a file. Each test failed before its fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from training.cli import app

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "wildcheck-ivory.onnx"
pytestmark = pytest.mark.skipif(not SHIPPED.is_file(), reason="the shipped model is absent")


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _refused(result, *parts):
    text = " ".join(result.output.split())
    assert result.exit_code == 2 and isinstance(result.exception, (SystemExit, type(None))), text  # no traceback
    for part in parts:
        assert part in text, text


def _snapshot(*folders: Path) -> dict:
    return {p: p.read_bytes() for f in folders for p in sorted(Path(f).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """Two drawings per class and split, 64 px: enough to run evaluate in a second."""
    from training.data.synth import synthesize

    root = tmp_path_factory.mktemp("tiny") / "data"
    synthesize(root, per_class=2, size=64, seed=5, classes=("ivory", "other"))
    return root


@pytest.fixture()
def model(tmp_path) -> Path:
    copy = tmp_path / "m2.onnx"
    shutil.copy(SHIPPED, copy)
    return copy


# --- 1, 7: evaluate --predictions / --out -----------------------------------------------------------------------

def test_evaluate_predictions_never_replaces_the_model_an_image_or_the_data(tmp_path, tiny, model):
    """Before: --predictions m2.onnx turned the model into a CSV (exit 0); so for an image, a symlinked image's
    target, and ROOT/manifest.csv (the next evaluation read the predictions as the dataset)."""
    data = tmp_path / "d"
    shutil.copytree(tiny, data)
    store = tmp_path / "store"
    store.mkdir()
    image = next((data / "val" / "ivory").glob("*.jpg"))
    shutil.move(image, store / image.name)
    image.symlink_to(store / image.name)  # a dataset built from links
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    before = _snapshot(data, store, model.parent)
    for target, said in [(model, "a file this command reads"), (next((data / "val" / "other").glob("*.jpg")), "inside"),
                         (image, "inside"), (store / image.name, "is not a .csv file"), (data / "manifest.csv", "inside")]:
        _refused(_cli("evaluate", model, "--data", data, "--predictions", target), f"--predictions {target}", said)
    _refused(_cli("evaluate", model, "--data", data, "--predictions", notes / "p.csv"), "is a file, not a folder")
    _refused(_cli("evaluate", model, "--data", data, "--out", notes / "eval"), "is a file, not a folder")
    assert _snapshot(data, store, model.parent) == before


def test_evaluate_replaces_a_csv_atomically_and_leaves_no_stale_plots(tmp_path, tiny, model):
    """An existing CSV is replaced (in one rename); an earlier evaluation's false-positive plots, which this one
    does not draw (no negatives), are removed rather than left to be read as this run's."""
    ivory_only = tmp_path / "ivonly"
    shutil.copytree(tiny / "val" / "ivory", ivory_only / "val" / "ivory")
    out = tmp_path / "eval"
    (out / "false_positives_by_source").mkdir(parents=True)
    (out / "false_positives.png").write_bytes(b"old")
    (out / "false_positives_by_source" / "x.png").write_bytes(b"old")
    preds = tmp_path / "preds.csv"
    preds.write_text("old\n")
    result = _cli("evaluate", model, "--data", ivory_only, "--out", out, "--predictions", preds)
    assert result.exit_code == 0, result.output
    assert preds.read_text().startswith("path,label,pred") and not list(tmp_path.glob(".*.tmp"))
    assert not (out / "false_positives.png").exists() and not (out / "false_positives_by_source").exists()
    assert json.loads((out / "metrics.json").read_text())["n"] == 2


def test_evaluate_reads_a_root_given_twice_once_and_says_when_nothing_is_readable(tmp_path, tiny, model, monkeypatch):
    """Before: --data d --data ./d/ scored every image twice; all images unreadable said 'none of the images
    carries a label the model knows'."""
    monkeypatch.chdir(tiny.parent)
    result = _cli("evaluate", model, "--data", "data", "--data", "./data/", "--out", tmp_path / "e")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["n"] == 4
    broken = tmp_path / "broken" / "val" / "ivory"
    broken.mkdir(parents=True)
    (broken / "a.jpg").write_bytes(b"not a jpeg")
    _refused(_cli("evaluate", model, "--data", tmp_path / "broken"), "could be read")


# --- 2: calibrate --traffic --out ---------------------------------------------------------------------------------

def test_calibrate_traffic_out_never_replaces_the_model_or_a_photo(tmp_path, tiny, model):
    """Before: --out MODEL.onnx or --out a traffic photo was overwritten with the policy; --out below a file failed
    only after all traffic was scored."""
    traffic = tmp_path / "traffic"
    shutil.copytree(tiny / "val" / "other", traffic)
    photo = next(traffic.glob("*.jpg"))
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    before = _snapshot(traffic, model.parent)
    for out, said in [(model, "a file this command reads"), (photo, "inside"), (notes / "p.yaml", "is a file, not a folder"),
                      (notes, "is not a .yaml/.yml file")]:
        _refused(_cli("calibrate", model, "--traffic", traffic, "--out", out), f"--out {out}", said)
    assert _snapshot(traffic, model.parent) == before


# --- 3, 8: data check --report, --min-side ------------------------------------------------------------------------

def test_data_check_report_never_replaces_what_it_checks(tmp_path, tiny):
    """Before: --report DATA/val/ivory/x.jpg replaced the image with JSON (the next check found it corrupt)."""
    data = tmp_path / "d"
    shutil.copytree(tiny, data)
    image = next((data / "val" / "ivory").glob("*.jpg"))
    photo = tmp_path / "photo.png"
    photo.write_bytes(b"\x89PNG")
    before = _snapshot(tmp_path)
    _refused(_cli("data", "check", data, "--report", image), f"--report {image} is inside {data}")
    _refused(_cli("data", "check", data, "--report", photo), "is not a .json file")
    _refused(_cli("data", "check", data, "--min-side", "-5"), "--min-side")
    assert _snapshot(tmp_path) == before


# --- 4: export-embedder --out, --tiling ---------------------------------------------------------------------------

def test_export_embedder_checks_out_and_tiling_before_any_work(tmp_path, tiny, model):
    """Before: a folder failed after ~30 s of export; an image, or a trained classifier's ONNX, was replaced by
    the embedder; --tiling 1 was a pydantic traceback."""
    image = next((tiny / "val" / "ivory").glob("*.jpg"))
    before = _snapshot(tiny, model.parent)
    _refused(_cli("export-embedder", "--out", tmp_path), "is a folder")
    _refused(_cli("export-embedder", "--out", image), "an exported model is an .onnx file")
    _refused(_cli("export-embedder", "--out", model), "not an embedder")
    for tiling in ("1", "-1", "5"):
        _refused(_cli("export-embedder", "--out", tmp_path / "e.onnx", "--tiling", tiling), f"--tiling {tiling}")
    assert _snapshot(tiny, model.parent) == before and not (tmp_path / "e.onnx").exists()


def test_an_earlier_embedder_may_be_replaced(tmp_path):
    from serving.contract import ModelContract, read_contract
    from training.export import _embedder_out, write_contract

    contract = read_contract(SHIPPED)
    embedder = ModelContract.model_validate({**contract.model_dump(mode="json"), "role": "embedder"})
    write_contract(SHIPPED, tmp_path / "emb.onnx", embedder)
    assert _embedder_out(tmp_path / "emb.onnx") == tmp_path / "emb.onnx"


# --- 5, 7: explain FILES --out ------------------------------------------------------------------------------------

def test_explain_files_out_inside_their_folder_is_refused(tmp_path, tiny, model):
    """Before: `explain MODEL DATA/val/ivory/*.jpg --out DATA/val/ivory/overlays` wrote overlays into the dataset,
    which the next evaluation counted as ivory photos."""
    data = tmp_path / "d"
    shutil.copytree(tiny, data)
    files = sorted((data / "val" / "ivory").glob("*.jpg"))
    before = _snapshot(data)
    out = data / "val" / "ivory" / "overlays"
    _refused(_cli("explain", model, *files, "--out", out), f"--out {out} is inside {data / 'val' / 'ivory'}")
    _refused(_cli("explain", model, files[0], "--out", out), "is inside")  # one photo of a dataset's label folder
    notes = tmp_path / "notes.txt"
    notes.write_text("x")
    _refused(_cli("explain", model, data / "val" / "ivory", "--out", notes / "x"), "is a file, not a folder")
    assert _snapshot(data) == before and not out.exists()


# --- 6: data synth --------------------------------------------------------------------------------------------------

def test_synth_never_mixes_drawings_into_a_dataset_and_a_rerun_replaces_its_own(tmp_path):
    """Before: synth into a real dataset added drawings to it; a rerun with a smaller --per-class left the first
    run's extra images (printed 4, the folder held 8); --size 40000 was a MemoryError traceback."""
    real = tmp_path / "real" / "val" / "ivory"
    real.mkdir(parents=True)
    (real / "photo.jpg").write_bytes(b"a real photo")
    _refused(_cli("data", "synth", tmp_path / "real", "--per-class", "2", "--size", "64"), "not an earlier")
    assert [p.name for p in real.iterdir()] == ["photo.jpg"]

    syn = tmp_path / "syn"
    assert _cli("data", "synth", syn, "--per-class", "8", "--size", "64").exit_code == 0
    result = _cli("data", "synth", syn, "--per-class", "4", "--size", "64", "--seed", "1")
    assert result.exit_code == 0, result.output
    assert len(list((syn / "train" / "ivory").iterdir())) == json.loads(result.output)["train"]["ivory"] == 4
    assert not list(syn.rglob(".*.tmp"))
    _refused(_cli("data", "synth", tmp_path / "big", "--size", "40000"), "--size")
    assert not (tmp_path / "big").exists()
