"""`wildcheck ensemble`: trainings of one recipe averaged into one model that calibrates, exports and explains."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serving.runtime import OnnxModel
from tests.conftest import photo, tiny_config


@pytest.fixture(scope="module")
def second_run(tmp_path_factory, synth_root):
    """The session's trained run's recipe with another seed (one epoch: its weights only need to differ)."""
    from training.train import train

    out = tmp_path_factory.mktemp("run_seed2")
    train([str(synth_root)], out, tiny_config(epochs=1, seed=2))
    return out


@pytest.fixture(scope="module")
def ensemble_run(trained_run, second_run, tmp_path_factory):
    from training.ensemble import make_ensemble

    out = tmp_path_factory.mktemp("ensemble")
    make_ensemble([trained_run, second_run], out)
    return out


def test_logits_are_the_members_mean_and_cams_average(trained_run, second_run):
    from training.cam import WithCam
    from training.checkpoint import Checkpoint
    from training.models import Ensemble
    from training.models import create_model

    members = []
    for run in (trained_run, second_run):
        ck = Checkpoint.load(run / "best.pt")
        m = create_model(ck.spec.architecture, len(ck.spec.labels), pretrained="none")
        m.load_state_dict(ck.weights)
        members.append(m.eval())
    ensemble = Ensemble(members).eval()
    x = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        expected = torch.stack([m(x) for m in members]).mean(0)
        assert not torch.allclose(members[0](x), members[1](x))  # two different models, or the test proves nothing
        torch.testing.assert_close(ensemble(x), expected, atol=1e-5, rtol=1e-5)
        logits, cam = WithCam(ensemble)(x)
        member_cams = torch.stack([WithCam(m)(x)[1] for m in members]).mean(0)
    torch.testing.assert_close(cam, member_cams, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cam.mean((2, 3)), logits, atol=1e-5, rtol=1e-5)  # a CAM's mean is its logit


def test_ensemble_run_is_calibrated_and_exports_one_file(ensemble_run, trained_run, tmp_path):
    from training.checkpoint import Checkpoint
    from training.export import export

    ck = Checkpoint.load(ensemble_run / "best.pt")
    assert ck.spec.architecture == "ensemble2:" + Checkpoint.load(trained_run / "best.pt").spec.architecture
    assert [m["seed"] for m in ck.spec.training_data["ensemble"]] == [42, 2]
    assert ck.spec.metrics["val"]["n"] > 0 and "balanced_accuracy" in ck.spec.metrics["val"]
    assert ck.spec.metrics["calibration"]["thresholds"]  # thresholds solved for the ensemble itself
    assert (ensemble_run / "calibration.json").is_file()

    out = tmp_path / "ensemble.onnx"
    report = export(ensemble_run, out, version="1.0.0")
    assert report["parity"]["max_abs_diff"] < 1e-4 and not report["parity"]["top1_mismatches"]
    model = OnnxModel(out)
    assert model.contract.architecture.startswith("ensemble2:")
    assert model.contract.embedding.size == 2 * 1280  # both members' pooled features
    assert model.contract.cam is not None  # heat maps survive the averaging
    x = np.stack([model.contract.preprocessing(photo(s)) for s in range(2)])
    logits, cam = model.predict_with_cam(x)
    np.testing.assert_allclose(cam.mean((2, 3)), logits, atol=1e-4)


def test_runs_of_different_recipes_are_refused(trained_run, tmp_path, synth_root):
    from training.ensemble import EnsembleError, build
    from training.train import train

    other = tmp_path / "other"
    train([str(synth_root)], other, tiny_config(img_size=48, epochs=1))
    with pytest.raises(EnsembleError, match="preprocessing"):
        build([trained_run, other], tmp_path / "bad")
    with pytest.raises(EnsembleError, match="twice"):
        build([trained_run, trained_run], tmp_path / "bad2")
    before = (trained_run / "best.pt").read_bytes()
    with pytest.raises(EnsembleError, match="one of the runs"):  # would overwrite a member's best.pt
        build([other, trained_run], trained_run)
    assert (trained_run / "best.pt").read_bytes() == before
    assert not (tmp_path / "bad" / "best.pt").exists() and not (tmp_path / "bad2" / "best.pt").exists()


def test_cli_ensemble_then_refuses_to_nest(ensemble_run, trained_run, tmp_path):
    from typer.testing import CliRunner

    from training.cli import app

    result = CliRunner().invoke(app, ["ensemble", str(ensemble_run), str(trained_run), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "ensemble already" in result.output


def test_cli_ensemble_bad_runs_exit_2_and_write_nothing(trained_run, tmp_path):
    from typer.testing import CliRunner

    from training.cli import app

    corrupt, empty = tmp_path / "corrupt", tmp_path / "empty"
    for folder, content in ((corrupt, b"not a checkpoint"), (empty, b"")):
        folder.mkdir()
        (folder / "best.pt").write_bytes(content)
    for bad, says in ((tmp_path / "missing", "no such run dir"), (corrupt, "not a readable wildcheck checkpoint"),
                      (empty, "not a readable wildcheck checkpoint")):
        out = tmp_path / f"out_{bad.name}"
        result = CliRunner().invoke(app, ["ensemble", str(trained_run), str(bad), "--out", str(out)])
        assert result.exit_code == 2 and says in result.output, result.output
        assert not out.exists()


def test_cli_ensemble_refuses_a_size_route_not_below_the_input_and_writes_nothing(trained_run, second_run, tmp_path):
    # was a pydantic traceback from the contract's validator, after the members were loaded
    from typer.testing import CliRunner

    from training.checkpoint import Checkpoint
    from training.cli import app

    size = Checkpoint.load(trained_run / "best.pt").spec.preprocessing.input_size
    for route in (size, size + 32):
        out = tmp_path / f"out_{route}"
        result = CliRunner().invoke(app, ["ensemble", str(trained_run), str(second_run), "--out", str(out),
                                          "--size-route", str(route)])
        assert result.exit_code == 2, result.output
        assert f"reads blurred photos at {route} px, not below the model's input size {size}" in result.output
        assert not out.exists()


def _another_run(folder):
    """A training's run dir as far as the files go (what `ensemble --out` used to half-overwrite)."""
    folder.mkdir()
    for name, text in (("best.pt", "its best"), ("last.pt", "its last"), ("config.yaml", "train: {}\n"),
                       ("history.csv", "epoch\n1\n")):
        (folder / name).write_text(text)
    return {p.name: p.read_text() for p in folder.iterdir()}


def test_cli_ensemble_refuses_an_out_holding_another_run(trained_run, second_run, tmp_path):
    """Before: best.pt replaced, exit 0, the other run's last.pt, history.csv and config.yaml kept beside it."""
    from typer.testing import CliRunner

    from training.cli import app

    before = _another_run(tmp_path / "run4")
    result = CliRunner().invoke(app, ["ensemble", str(trained_run), str(second_run), "--out", str(tmp_path / "run4")])
    assert result.exit_code == 2 and "already holds config.yaml, history.csv, last.pt" in result.output, result.output
    assert "choose a new folder" in result.output.lower()
    assert {p.name: p.read_text() for p in (tmp_path / "run4").iterdir()} == before


def test_an_earlier_output_of_the_same_command_may_be_replaced_another_runs_never(tmp_path):
    from serving.errors import InvalidInput
    from training.ensemble import ENSEMBLE_FILES
    from training.grey_head import GREY_HEAD_FILES
    from training.outputs import new_run_folder

    new_run_folder(tmp_path / "new", ENSEMBLE_FILES)
    (tmp_path / "empty").mkdir()
    new_run_folder(tmp_path / "empty", ENSEMBLE_FILES)
    ens, grey = tmp_path / "ens", tmp_path / "grey"
    for folder, names in ((ens, ENSEMBLE_FILES), (grey, GREY_HEAD_FILES)):
        folder.mkdir()
        for name in names:
            (folder / name).write_text("x")
        (folder / ".best.pt.abc.tmp").write_text("left by a kill")
    new_run_folder(ens, ENSEMBLE_FILES)  # an ensemble again into its own folder
    new_run_folder(grey, GREY_HEAD_FILES, marker="grey_head.json")  # another --lam: the features are reused
    with pytest.raises(InvalidInput, match="grey_features.npz, grey_head.json"):
        new_run_folder(grey, ENSEMBLE_FILES)
    with pytest.raises(InvalidInput, match="holds best.pt"):  # an ensemble is not a grey head's earlier output
        new_run_folder(ens, GREY_HEAD_FILES, marker="grey_head.json")


def test_cli_ensemble_size_route_below_the_contracts_least_is_a_message(trained_run, second_run, tmp_path):
    """Before: a pydantic ValidationError traceback (typer allowed any size >= 0, SizeRoute needs >= 32)."""
    from typer.testing import CliRunner

    from training.cli import app

    out = tmp_path / "ens"
    result = CliRunner().invoke(app, ["ensemble", str(trained_run), str(second_run), "--out", str(out),
                                      "--size-route", "3"])
    assert result.exit_code == 2 and "error: --size-route 3: give 32 px or more" in result.output, result.output
    assert not out.exists()


def test_ensemble_and_grey_head_never_write_into_the_data_they_read(trained_run, second_run, synth_root):
    """Before: --out DATA/val/ens was accepted, and its reliability.png was then a validation image of label
    'ens' (README: an output inside a data folder the command reads is refused)."""
    from typer.testing import CliRunner

    from training.cli import app

    for args in (["ensemble", str(trained_run), str(second_run)], ["grey-head", str(trained_run)]):
        out = synth_root / "val" / "ens"
        result = CliRunner().invoke(app, [*args, "--out", str(out)])
        assert result.exit_code == 2 and "which this command reads" in result.output, result.output
        assert not out.exists()


def test_a_failed_ensemble_leaves_no_uncalibrated_model(trained_run, second_run, tmp_path):
    """Before: calibration failing (no validation images) left the ensemble's best.pt behind, uncalibrated; it
    exported with the default thresholds and no metrics."""
    from training.calibrate import NoValidationData
    from training.ensemble import make_ensemble

    no_val = tmp_path / "no_val"
    (no_val / "train" / "other").mkdir(parents=True)
    photo(1).save(no_val / "train" / "other" / "a.jpg")
    out = tmp_path / "ens"
    with pytest.raises(NoValidationData):
        make_ensemble([trained_run, second_run], out, data=[str(no_val)])
    assert not (out / "best.pt").exists()
