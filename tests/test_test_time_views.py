"""Test-time views (``decision.test_time_views``): the model also scores mirror images or quarter turns of each
input and averages the logits, inside the exported graph, so calibration, evaluation and serving agree."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from tests.conftest import photo, record_pass_rows


def _network(run):
    from training.checkpoint import Checkpoint
    from training.models import create_model

    ck = Checkpoint.load(run / "best.pt")
    net = create_model(ck.spec.architecture, len(ck.spec.labels), pretrained="none")
    net.load_state_dict(ck.weights)
    return net.eval()


@pytest.fixture(scope="module")
def mirrored_run(trained_run, tmp_path_factory):
    """The session's trained run, calibrated again with a mirror view (`wildcheck calibrate --test-time-views hflip`)."""
    from training.calibrate import calibrate

    run = tmp_path_factory.mktemp("mirrored") / "run"
    shutil.copytree(trained_run, run)
    calibrate(run, decision_overrides={"test_time_views": ["hflip"]})
    return run


@pytest.fixture(scope="module")
def mirrored_export(mirrored_run, tmp_path_factory):
    """(ONNX path, export report) of the mirrored run."""
    from training.export import export

    out = tmp_path_factory.mktemp("mirrored_onnx") / "mirrored.onnx"
    return out, export(mirrored_run, out, version="1.0.0")


def test_logits_are_the_mean_over_the_views_and_heat_maps_align(trained_run):
    from training.cam import WithCam
    from training.models import ViewAveraged

    net = _network(trained_run)
    model = ViewAveraged(net, ["hflip", "rot90"]).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        flipped, turned = x.flip(-1), torch.rot90(x, 1, (2, 3))
        assert not torch.allclose(net(x), net(flipped), atol=1e-3)  # the network alone tells them apart
        torch.testing.assert_close(model(x), (net(x) + net(flipped) + net(turned)) / 3, atol=1e-5, rtol=1e-5)
        logits, cam = WithCam(model)(x)
        cams = [WithCam(net)(x)[1], WithCam(net)(flipped)[1].flip(-1), torch.rot90(WithCam(net)(turned)[1], -1, (2, 3))]
    torch.testing.assert_close(cam, sum(cams) / 3, atol=1e-5, rtol=1e-5)  # each view's map back on the photo
    torch.testing.assert_close(cam.mean((2, 3)), logits, atol=1e-5, rtol=1e-5)


def test_with_all_four_turns_a_sideways_photo_scores_as_the_upright_one(trained_run):
    from training.models import ViewAveraged

    net = _network(trained_run)
    model = ViewAveraged(net, ["rot90", "rot180", "rot270"]).eval()
    x = torch.randn(3, 3, 64, 64)
    sideways = torch.rot90(x, 1, (2, 3))
    with torch.inference_mode():
        assert not torch.allclose(net(sideways), net(x), atol=1e-3)
        torch.testing.assert_close(model(sideways), model(x), atol=1e-5, rtol=1e-5)


def test_a_run_calibrated_with_a_mirror_view_exports_and_serves_it(mirrored_run, mirrored_export, trained_run):
    from serving.checker import ImageChecker
    from serving.contract import read_contract
    from serving.runtime import OnnxModel
    from training.checkpoint import Checkpoint

    ck = Checkpoint.load(mirrored_run / "best.pt")
    assert ck.spec.test_time_views == ["hflip"] and ck.config.decision.test_time_views == ["hflip"]
    out, report = mirrored_export
    assert report["parity"]["max_abs_diff"] <= 1e-4 and report["parity"]["cam_max_abs_diff"] <= 1e-3
    assert read_contract(out).test_time_views == ["hflip"]

    onnx = OnnxModel(out, threads=1)
    pre = read_contract(out).preprocessing
    x = np.stack([pre(photo(seed)) for seed in (1, 2)])
    np.testing.assert_allclose(onnx.predict_logits(x), onnx.predict_logits(np.ascontiguousarray(x[..., ::-1])),
                               atol=1e-4)  # the graph scores a mirror image as the photo
    net = _network(trained_run)
    with torch.inference_mode():
        t = torch.from_numpy(x)
        expected = ((net(t) + net(t.flip(-1))) / 2).numpy()
    np.testing.assert_allclose(onnx.predict_logits(x), expected, atol=1e-4)  # the views are in the graph

    checker = ImageChecker(str(out))
    assert checker.describe()["test_time_views"] == ["hflip"]


def test_views_are_named_once_each_and_known():
    from pydantic import ValidationError
    from typer.testing import CliRunner

    from serving.contract import ModelSpec
    from serving.preprocess import Preprocessing
    from training.cli import app

    with pytest.raises(ValidationError, match="names a view twice"):
        ModelSpec(labels=["ivory", "other"], preprocessing=Preprocessing(), thresholds={"ivory": {}}, architecture="x",
                  test_time_views=["hflip", "hflip"])
    result = CliRunner().invoke(app, ["calibrate", "runs/none", "--test-time-views", "mirror"])
    assert result.exit_code == 2 and "hflip, vflip, rot90, rot180, rot270" in result.output


def test_a_pass_holds_fewer_photos_when_each_is_scored_twice(mirrored_run, mirrored_export, monkeypatch):
    """MAX_ROWS_PER_PASS bounds a pass's memory by the rows the backbone runs; with a mirror view each photo is
    two rows inside the graph, so a pass takes half as many photos (the checkpoint's passes alike)."""
    import serving.runtime as runtime
    from serving.runtime import OnnxModel
    from training.predict import TorchPredictor

    out = mirrored_export[0]
    monkeypatch.setattr(runtime, "MAX_ROWS_PER_PASS", 4)
    x = np.random.default_rng(0).normal(size=(5, 3, 64, 64)).astype(np.float32)
    model = OnnxModel(out)
    rows = record_pass_rows(model)
    whole = model.unrecorded.run([model.logits_output], {model.input_name: x})[0]
    np.testing.assert_allclose(model.predict_logits(x), whole, rtol=1e-4, atol=1e-5)
    assert rows == [2, 2, 1]
    torch_rows = []
    predictor = TorchPredictor(mirrored_run / "best.pt")
    predictor.model.register_forward_pre_hook(lambda m, args: torch_rows.append(len(args[0])))
    predictor.predict_logits(x)
    assert torch_rows == [2, 2, 1]
