"""Session 29: hostile or broken ONNX files are refused in one line, and the commands that write models refuse
what would make a broken one (INT8 without readable images, odd release names, members trained on other data)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from serving.contract import ContractError, ModelContract, read_contract
from serving.decision import default_thresholds
from serving.preprocess import Preprocessing
from serving.runtime import OnnxModel
from tests.conftest import tiny_config

LABELS = ["ivory", "other"]
SIZE = 32


def tiny_contract(**changes) -> ModelContract:
    values = dict(labels=LABELS, negative_label="other", preprocessing=Preprocessing(input_size=SIZE),
                  thresholds=default_thresholds(LABELS), architecture="tiny", model_name="tiny",
                  model_version="1.0.0+0123456789ab", created_at="2026-01-01T00:00:00+00:00", wildcheck_version="test")
    return ModelContract(**(values | changes))


def tiny_onnx(path: Path, in_type=TensorProto.FLOAT, in_shape=("batch", 3, SIZE, SIZE), metadata: dict | None = None
              ) -> Path:
    """A two-class model in three nodes (mean colour -> linear head), with a valid contract whose JSON values
    ``metadata`` replaces (raw strings, so NaN and wrong types can be written)."""
    nodes = [helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT)] if in_type != TensorProto.FLOAT else []
    source = "x" if nodes else "image"
    if len(in_shape) == 4:
        nodes.append(helper.make_node("ReduceMean", [source], ["pooled"], axes=[2, 3], keepdims=0))
    else:
        nodes.append(helper.make_node("Identity", [source], ["pooled"]))
    nodes.append(helper.make_node("MatMul", ["pooled", "W"], ["logits"]))
    weights = numpy_helper.from_array(np.array([[1.0, -1.0], [0.5, 0.2], [-0.3, 0.8]], np.float32), "W")
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", in_type, in_shape)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ("batch", 2))], [weights])
    model = tiny_contract().write_to(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    for entry in model.metadata_props:
        key = entry.key.removeprefix("wildcheck.")
        if metadata and key in metadata:
            entry.value = metadata[key]
    onnx.save(model, str(path))
    return path


def test_the_tiny_model_loads(tmp_path):
    model = OnnxModel(tiny_onnx(tmp_path / "ok.onnx"))
    assert model.predict_proba(np.zeros((3, 3, SIZE, SIZE), np.float32)).shape == (3, 2)


# --- 1: a contract error is one line that names the field ---------------------------------------------------------

def test_a_bad_contract_is_one_line_naming_the_field_and_the_value(tmp_path):
    """Before: pydantic's text, three lines per problem with a URL each (`wildcheck serve` printed 9 lines)."""
    nan = json.dumps({"ivory": {"block": float("nan"), "review": 0.5}})
    path = tiny_onnx(tmp_path / "nan.onnx", metadata={"thresholds": nan})
    with pytest.raises(ContractError) as err:
        OnnxModel(path)
    message = str(err.value)
    assert "\n" not in message and "errors.pydantic.dev" not in message
    assert "thresholds.ivory.block" in message and "nan" in message and "wildcheck export" in message
    bad_json = tiny_onnx(tmp_path / "json.onnx", metadata={"labels": "[ivory"})
    with pytest.raises(ContractError, match="wildcheck.labels is not JSON"):
        read_contract(bad_json)


def test_cli_serve_refuses_a_bad_contract_in_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from training.cli import app

    import os

    def no_exec(*args):  # a model that passed the checks would replace this process with `bentoml serve`
        raise AssertionError("serve started bentoml with a model it should have refused")

    monkeypatch.setattr(os, "execve", no_exec)
    monkeypatch.delenv("WILDCHECK_MODEL", raising=False)
    path = tiny_onnx(tmp_path / "m.onnx", metadata={"contract_version": "0"})
    result = CliRunner().invoke(app, ["serve", str(path)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "contract_version" in lines[0]


# --- 2: preprocessing that breaks every input ---------------------------------------------------------------------

@pytest.mark.parametrize("change,says", [
    ({"std": [0.0, 0.0, 0.0]}, "std"),            # every input NaN: every request a 500
    ({"std": [-0.5, -0.5, -0.5]}, "std"),         # the input negated: scores of another picture, decided on
    ({"mean": ["Infinity"] * 3}, "mean"),         # every input NaN
    ({"crop_pct": 0.001}, "crop_pct"),            # a 32 px model resized every photo to 32,000 px a side
    ({"input_size": 100_000}, "input_size"),      # the load probe alone asked for 120 GB
])
def test_preprocessing_that_breaks_every_input_never_loads(tmp_path, change, says):
    pre = Preprocessing(input_size=SIZE).model_dump(mode="json") | change
    raw = json.dumps(pre).replace('"Infinity"', "Infinity")
    path = tiny_onnx(tmp_path / "pre.onnx", metadata={"preprocessing": raw})
    with pytest.raises(ContractError, match=says):
        read_contract(path)


# --- 3: contract version and labels -------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", ["-5", "0", "true", '"1"', "1.0"])
def test_contract_version_is_a_plain_positive_integer(tmp_path, raw):
    with pytest.raises(ContractError, match="contract_version"):
        read_contract(tiny_onnx(tmp_path / "v.onnx", metadata={"contract_version": raw}))


def test_a_newer_contract_says_upgrade_not_export_again(tmp_path):
    with pytest.raises(ContractError, match="upgrade wildcheck") as err:
        read_contract(tiny_onnx(tmp_path / "v.onnx", metadata={"contract_version": "2"}))
    assert "export the run again" not in str(err.value)


def test_a_label_with_an_empty_name_is_refused(tmp_path):
    labels = json.dumps(["", "other"])
    thresholds = json.dumps({"": {"block": 0.9, "review": 0.5}})
    with pytest.raises(ContractError, match="empty name"):
        read_contract(tiny_onnx(tmp_path / "blank.onnx", metadata={"labels": labels, "thresholds": thresholds}))


# --- 4: a graph whose input cannot take the checker's batches -----------------------------------------------------

@pytest.mark.parametrize("kind,says", [
    (dict(in_type=TensorProto.FLOAT16), "float16"),    # was onnxruntime's InvalidArgument, a traceback
    (dict(in_type=TensorProto.UINT8), "uint8"),
    (dict(in_shape=("batch", 3)), "one float32 batch x 3 x size x size"),
    (dict(in_shape=(1, 3, SIZE, SIZE)), "batch size is fixed at 1"),  # loaded, then every batch of 2+ failed
])
def test_a_graph_input_the_checker_cannot_feed_never_loads(tmp_path, kind, says):
    path = tiny_onnx(tmp_path / "g.onnx", **kind)
    with pytest.raises(ContractError, match=says):
        OnnxModel(path)


# --- 5: INT8 without readable images ------------------------------------------------------------------------------

def _samples(tmp_path: Path, split: str, readable: bool):
    from tests.conftest import jpeg_bytes, photo
    from training.data.sources import Sample

    path = tmp_path / f"{split}.jpg"
    path.write_bytes(jpeg_bytes(photo(3)) if readable else b"not an image")
    return [Sample(path=path, label="ivory", split=split)]


def test_int8_without_readable_calibration_or_validation_images_is_a_refusal(tmp_path):
    """Before: quantize_static's `ValueError: No data is collected.` and compute_metrics' `no images to
    evaluate`, tracebacks after the FP32 file was written."""
    from training.quantize import quantize_int8

    fp32 = tiny_onnx(tmp_path / "m.onnx")
    contract = read_contract(fp32)
    good_train, good_val = _samples(tmp_path, "train", True), _samples(tmp_path, "val", True)
    (tmp_path / "bad").mkdir()
    bad_train, bad_val = _samples(tmp_path / "bad", "train", False), _samples(tmp_path / "bad", "val", False)
    report = quantize_int8(fp32, bad_train, good_val, contract, calib_images=4)
    assert not report.accepted and "training images could be read" in report.reason
    report = quantize_int8(fp32, good_train, bad_val, contract, calib_images=4)
    assert not report.accepted and "validation images could be read" in report.reason
    report = quantize_int8(fp32, good_train, good_val, contract, calib_images=0)  # was: calibrated on 1 image
    assert not report.accepted and "--calib-images 0" in report.reason
    assert not (tmp_path / "m.int8.onnx").exists()


# --- 6, 7: runs: odd release names, members trained on other data ---------------------------------------------------

@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, synth_root):
    """Two untrained runs of one recipe (a checkpoint as `wildcheck train` writes it, without the training): on the
    synthetic data, and on a grown copy of it (another training-data fingerprint)."""
    import torch

    from training.checkpoint import Checkpoint, initial_spec
    from training.models import create_model

    base = tmp_path_factory.mktemp("s29_runs")
    config = tiny_config()
    labels = sorted(p.name for p in (synth_root / "train").iterdir() if p.is_dir())
    runs = []
    for seed, digest in ((1, "a" * 64), (2, "b" * 64)):
        torch.manual_seed(seed)
        model = create_model(config.model.name, len(labels), pretrained="none")
        spec = initial_spec(config, labels, Preprocessing(input_size=64), {"sha256": digest, "method": "content"})
        run = base / f"run{seed}"
        Checkpoint(spec=spec, weights=model.state_dict(), epoch=1, val_metrics={}, config=config,
                   data_roots=[str(synth_root)]).save(run / "best.pt")
        runs.append(run)
    return runs


@pytest.mark.parametrize("option,value", [("version", "1.0\nserving evil 9.9"), ("version", "../../x"),
                                          ("name", "my model"), ("version", ""), ("version", "v" * 120)])
def test_export_refuses_a_name_or_version_that_is_no_release_name_before_any_work(tiny_runs, tmp_path, option, value):
    """Before: exported (~15 s), a newline went into the server's log line and the model card as it was, and
    `promote` refused the file later."""
    from serving.errors import InvalidInput
    from training.export import export

    out = tmp_path / "m.onnx"
    with pytest.raises(InvalidInput, match=f"--{option}"):
        export(tiny_runs[0], out, **{option: value})
    assert not out.exists()


def test_ensemble_refuses_members_trained_on_other_images(tiny_runs, tmp_path):
    """Before: averaged and calibrated on the first run's validation photos, the contract naming the first run's
    training data only."""
    from training.ensemble import EnsembleError, build

    with pytest.raises(EnsembleError, match="trained on other images"):
        build(list(tiny_runs), tmp_path / "ens")
    assert not (tmp_path / "ens" / "best.pt").exists()


def test_a_checkpoint_whose_preprocessing_breaks_every_input_is_refused_in_one_line(tiny_runs, tmp_path):
    """The same rule for `best.pt` (export, evaluate, ensemble read it): before, std 0 loaded and exported."""
    import torch

    from training.checkpoint import Checkpoint, CheckpointError

    raw = torch.load(tiny_runs[0] / "best.pt", weights_only=True)
    raw["spec"]["preprocessing"]["std"] = [0.0, 0.0, 0.0]
    torch.save(raw, tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match="preprocessing.std") as err:
        Checkpoint.load(tmp_path / "best.pt")
    assert "\n" not in str(err.value)


def test_a_cam_output_that_is_the_logits_never_loads(tmp_path):
    """Before: loaded with has_cam True, and `wildcheck explain` died in heat_grid with a ValueError traceback."""
    path = tiny_onnx(tmp_path / "cam.onnx", metadata={"cam": json.dumps({"output": "logits", "shape": [2, 1, 1]})})
    with pytest.raises(ContractError, match="cam output 'logits' is not one"):
        OnnxModel(path)
