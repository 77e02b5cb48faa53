"""The size route (``serving.contract.SizeRoute``): a blurred or noisy input is read at a smaller size, any other
at the model's own, each once -- in PyTorch and in the exported graph alike, whatever mix a batch holds; the
logits, heat maps and embedding of a routed input are those of the smaller read."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from serving.contract import SizeRoute
from serving.preprocess import Preprocessing
from training.conditions import Phone, Thumbnail

REPO = Path(__file__).resolve().parents[1]
PHOTO = REPO / "examples" / "ivory_13342.jpg"  # a CC0 Met photo: a carving on a plain backdrop


def _measures(images, size=320):
    from training.models import detail_ratio, luma_levels, noise_level

    pre = Preprocessing(input_size=size)
    x = torch.from_numpy(np.stack([pre(img) for img in images]))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (pre.mean, pre.std))
    y = luma_levels(x, mean, std)
    return detail_ratio(y).numpy(), noise_level(y).numpy()


def test_the_measures_tell_a_sharp_photo_from_its_thumbnail_and_its_noisy_copy():
    photo = Image.open(PHOTO).convert("RGB")
    rng = np.random.default_rng(0)
    thumbnail = Thumbnail().apply(photo, rng)
    noisy = Phone(blur=0.0, noise=8.0).apply(photo, rng)
    detail, noise = _measures([photo, thumbnail, noisy])
    route = SizeRoute()
    assert detail[0] > route.detail_below and noise[0] < route.noise_above  # the photo as it is: read at 320
    assert detail[1] < route.detail_below  # 96 px blown up: no detail at 320
    assert noise[2] > route.noise_above  # sensor noise


def test_the_noise_estimate_reads_the_standard_deviation_of_added_noise():
    side = Preprocessing(input_size=320).resize_size  # a picture preprocessing does not resample
    flat = np.full((side, side, 3), 128.0)
    rng = np.random.default_rng(1)
    for sigma in (4.0, 8.0, 16.0):  # in levels; below ~3 the picture's whole levels blur the estimate
        noisy = np.clip(flat + rng.normal(0, sigma, (side, side, 1)), 0, 255).round().astype(np.uint8)
        _, noise = _measures([Image.fromarray(noisy)])
        assert noise[0] == pytest.approx(sigma, rel=0.1)


def _network(run):
    from training.checkpoint import Checkpoint
    from training.models import create_model

    ck = Checkpoint.load(run / "best.pt")
    net = create_model(ck.spec.architecture, len(ck.spec.labels), pretrained="none")
    net.load_state_dict(ck.weights)
    return net.eval(), ck.spec.preprocessing


def _batch(pre):
    """(a sharp photo, a blurred one, the sharp one mirrored) preprocessed (at the tiny run's 64 px): row 1 routed."""
    sharp = Image.open(REPO / "examples" / "non_ivory_59208.jpg").convert("RGB")
    blurred = Image.open(PHOTO).convert("RGB").filter(ImageFilter.GaussianBlur(20))
    return torch.from_numpy(np.stack([pre(sharp), pre(blurred), pre(sharp.transpose(Image.Transpose.FLIP_LEFT_RIGHT))]))


def test_a_routed_input_scores_exactly_as_the_smaller_read(trained_run):
    from training.cam import WithCam
    from training.embedding import pooled_features
    from training.models import with_size_route

    net, pre = _network(trained_run)
    route = SizeRoute(size=48)
    model = with_size_route(net, route, pre)
    x = _batch(pre)
    with torch.inference_mode():
        assert model.is_routed(x).tolist() == [False, True, False]
        small = torch.nn.functional.interpolate(x[1:2], size=(48, 48), mode="bilinear", antialias=True,
                                                align_corners=False)
        expected = torch.cat([net(x[:1]), net(small), net(x[2:])])
        assert not torch.allclose(net(x[1:2]), net(small), atol=1e-3)  # the read's size matters to the network
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
        logits, cam = WithCam(model)(x)
        assert cam.shape[-2:] == WithCam(net)(x)[1].shape[-2:]  # every heat map on the model's own grid
        torch.testing.assert_close(cam.mean((2, 3)), logits, atol=1e-5, rtol=1e-5)  # each location's share
        torch.testing.assert_close(pooled_features(model, x)[1], pooled_features(net, small)[0], atol=1e-5, rtol=1e-5)


def test_a_route_that_does_not_read_smaller_is_refused(trained_run):
    from pydantic import ValidationError

    from serving.contract import ModelSpec
    from serving.errors import InvalidInput
    from training.models import with_size_route

    net, pre = _network(trained_run)
    with pytest.raises(InvalidInput, match="below the model's input size"):
        with_size_route(net, SizeRoute(size=pre.input_size), pre)
    with pytest.raises(ValidationError, match="must be below the input size"):
        ModelSpec(labels=["ivory", "other"], preprocessing=pre, thresholds={"ivory": {}}, architecture="x",
                  size_route=SizeRoute(size=pre.input_size))
    with pytest.raises(ValidationError):
        SizeRoute(size=48, detial_below=0.5)  # a misspelt setting is an error, not the default


@pytest.fixture(scope="module")
def routed_run(trained_run, tmp_path_factory) -> Path:
    """The session's run, calibrated again with a size route (`wildcheck calibrate --size-route 48`)."""
    from typer.testing import CliRunner

    from training.cli import app

    run = tmp_path_factory.mktemp("routed") / "run"
    shutil.copytree(trained_run, run)
    result = CliRunner().invoke(app, ["calibrate", str(run), "--size-route", "48"])
    assert result.exit_code == 0, result.output
    return run


def test_the_exported_graph_routes_each_row_as_pytorch_does(routed_run, tmp_path):
    from serving.checker import ImageChecker
    from serving.contract import read_contract
    from serving.runtime import OnnxModel
    from training.checkpoint import Checkpoint
    from training.export import export
    from training.predict import TorchPredictor

    ck = Checkpoint.load(routed_run / "best.pt")
    assert ck.spec.size_route == SizeRoute(size=48) and ck.config.decision.size_route == SizeRoute(size=48)
    out = tmp_path / "routed.onnx"
    report = export(routed_run, out, version="1.0.0")
    assert report["parity"]["max_abs_diff"] <= 1e-4 and report["parity"]["cam_max_abs_diff"] <= 1e-3
    assert read_contract(out).size_route == SizeRoute(size=48)

    onnx, torch_model = OnnxModel(out, threads=1), TorchPredictor(routed_run / "best.pt")
    x = _batch(read_contract(out).preprocessing).numpy()
    net, _ = _network(routed_run)
    for rows in ([0, 1, 2], [1], [0, 2], [1, 1], [2]):  # mixed, all routed, none routed: a branch may be empty
        batch = x[rows]
        np.testing.assert_allclose(onnx.predict_logits(batch), torch_model.predict_logits(batch), atol=1e-4)
        _, cam = onnx.predict_with_cam(batch)
        assert cam.shape[-2:] == tuple(read_contract(out).cam.shape[-2:])
    with torch.inference_mode():
        plain = net(torch.from_numpy(x[1:2])).numpy()
    assert not np.allclose(onnx.predict_logits(x[1:2]), plain, atol=1e-3)  # the blurred photo was read smaller
    assert ImageChecker(str(out)).describe()["size_route"]["size"] == 48


def test_calibrate_takes_a_route_off_with_zero(routed_run, tmp_path):
    from typer.testing import CliRunner

    from training.checkpoint import Checkpoint
    from training.cli import app

    run = tmp_path / "run"
    shutil.copytree(routed_run, run)
    result = CliRunner().invoke(app, ["calibrate", str(run), "--size-route", "0"])
    assert result.exit_code == 0, result.output
    assert Checkpoint.load(run / "best.pt").spec.size_route is None
    refused = CliRunner().invoke(app, ["calibrate", str(run), "--size-route", "64"])
    assert refused.exit_code == 2 and "below the model's input size" in refused.output
