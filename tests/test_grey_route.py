"""The grey route (``wildcheck grey-head``): photos without colour are read by a second head fitted on the training
photos in grey, any other photo by the trained head -- in PyTorch and in the exported graph alike; heat maps and the
embedding keep their meaning; ensembles join the heads; old checkpoints and contracts have no route."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from serving.runtime import OnnxModel
from tests.conftest import photo
from training.conditions import greyscale
from training.config import GreyHeadConfig
from training.data.sources import Sample


@pytest.fixture(scope="module")
def grey_run(trained_run, tmp_path_factory) -> Path:
    from training.grey_head import make_grey_head

    out = tmp_path_factory.mktemp("grey_run")
    make_grey_head(trained_run, out, GreyHeadConfig(lam=0.01), say=lambda *_: None)
    return out


@pytest.fixture(scope="module")
def cli_grey_run(synth_root, tmp_path_factory) -> tuple[Path, str]:
    """One epoch of the tiny recipe (another seed) through `wildcheck train` with `model.grey_head` in its config:
    (the run, the command's output)."""
    folder = tmp_path_factory.mktemp("cli_grey_run")
    config = folder / "grey.yaml"
    config.write_text("model: {grey_head: {lam: 0.01, pool_sample: 0}}\n"
                      "train: {epochs: 1, batch_size: 16, threads: 2, lr: 0.002, seed: 2}\n"
                      "data: {img_size: 64, num_workers: 0}\n")
    out = folder / "run"
    result = CliRunner().invoke(_app(), ["train", "--data", str(synth_root), "--out", str(out), "--config", str(config)])
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.fixture(scope="module")
def grey_onnx(grey_run, tmp_path_factory) -> Path:
    from training.export import export

    out = tmp_path_factory.mktemp("grey_onnx") / "model.onnx"
    export(grey_run, out, version="1.0.0")
    return out


def _inputs(pre, seeds=(0, 1)):
    """(a batch of the photos in grey, the same photos in colour) as the model's inputs."""
    grey = np.stack([pre(greyscale(photo(s))) for s in seeds])
    colour = np.stack([pre(photo(s)) for s in seeds])
    return grey, colour


def _heads(run: Path):
    """(the run's network, its trained head, its grey head) from its checkpoint."""
    from training.predict import TorchPredictor

    p = TorchPredictor(run / "best.pt")
    head = p.network.get_classifier()
    return p.network, (head.weight.detach(), head.bias.detach()), (p.checkpoint.grey_head.weight, p.checkpoint.grey_head.bias)


def _logits(network, x: np.ndarray, head) -> np.ndarray:
    from training.embedding import pooled_features

    with torch.inference_mode():
        return (pooled_features(network, torch.from_numpy(x)) @ head[0].T + head[1]).numpy()


def test_grey_photos_take_the_grey_head_and_colour_photos_the_trained_one(grey_run):
    from training.checkpoint import Checkpoint
    from training.predict import TorchPredictor

    ck = Checkpoint.load(grey_run / "best.pt")
    assert ck.spec.grey_route.tolerance == 1.0 and ck.spec.grey_route.fitted["lam"] == 0.01
    assert ck.spec.metrics["calibration"]["thresholds"] and ck.val_metrics["n"] > 0  # calibrated with the route
    predictor = TorchPredictor(grey_run / "best.pt")
    network, trained, grey_head = _heads(grey_run)
    grey, colour = _inputs(predictor.spec.preprocessing)
    assert np.abs(_logits(network, grey, grey_head) - _logits(network, grey, trained)).max() > 1e-2  # the heads differ

    mixed = np.stack([grey[0], colour[0], grey[1], colour[1]])  # each input routed on its own
    got = predictor.predict_logits(mixed)
    np.testing.assert_allclose(got[[0, 2]], _logits(network, grey, grey_head), atol=1e-4)
    np.testing.assert_allclose(got[[1, 3]], _logits(network, colour, trained), atol=1e-4)


def test_the_fit_reads_the_grey_training_photos_better_than_the_trained_head(grey_run):
    import json

    summary = json.loads((grey_run / "grey_head.json").read_text())
    acc = summary["grey_training_balanced_accuracy"]
    assert summary["photos"] == summary["main"] > 0 and not summary["skipped"]
    assert acc["grey_head"] >= acc["trained_head"] and acc["grey_head"] > 0.5


def test_colour_spread_is_in_8_bit_levels_of_the_photo_not_of_the_normalised_input():
    from serving.preprocess import Preprocessing
    from training.models import colour_spread

    pre = Preprocessing(input_size=32, crop_pct=1.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    base = np.asarray(greyscale(photo(3, size=(48, 48)))).astype(np.int16)
    tinted = base.copy()
    tinted[..., 2] = np.clip(tinted[..., 2] + 2, 0, 255)  # blue 2 levels up
    tinted[base[..., 2] > 253] -= 2  # where it would clip, lower the other channels instead
    from PIL import Image

    x = torch.from_numpy(np.stack([pre(Image.fromarray(a.astype(np.uint8))) for a in (base, tinted)]))
    shaped = [torch.tensor(v).view(1, 3, 1, 1) for v in (pre.mean, pre.std)]
    spread = colour_spread(x, *shaped).numpy()
    assert spread[0] < 1e-3  # unequal mean/std are undone before the channels are compared
    assert spread[1] == pytest.approx(2.0, abs=0.02)


def test_export_routes_in_the_graph_and_keeps_heat_maps_and_embedding(grey_run, grey_onnx, onnx_model):
    from serving.checker import ImageChecker

    model = OnnxModel(grey_onnx)
    assert model.contract.grey_route is not None and model.contract.grey_route.tolerance == 1.0
    assert ImageChecker(grey_onnx).describe()["grey_route"]["tolerance"] == 1.0  # /model lists it
    network, trained, grey_head = _heads(grey_run)
    grey, colour = _inputs(model.contract.preprocessing)
    for x, head in ((grey, grey_head), (colour, trained)):
        logits, cam = model.predict_with_cam(x)
        np.testing.assert_allclose(logits, _logits(network, x, head), atol=1e-4)
        np.testing.assert_allclose(cam.mean((2, 3)), logits, atol=1e-4)  # the routed head's heat maps
    plain = OnnxModel(onnx_model)  # the same weights without the route
    assert plain.contract.grey_route is None
    assert model.contract.embedding.size == plain.contract.embedding.size == 1280
    both = np.concatenate([grey, colour])
    np.testing.assert_allclose(model.embed(both), plain.embed(both), atol=1e-5)  # galleries match as before
    assert model.contract.model_version != plain.contract.model_version.replace("9.9.9", "1.0.0")


def test_contracts_and_checkpoints_without_a_route_read_as_none(onnx_model, trained_run, grey_run):
    import onnxruntime as ort

    from serving.contract import ModelContract
    from training.checkpoint import Checkpoint, CheckpointError
    from training.fileio import load_checkpoint

    props = dict(ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map)
    props.pop("wildcheck.grey_route")  # as files exported before the route existed
    assert ModelContract.from_metadata(props).grey_route is None
    raw = load_checkpoint(trained_run / "best.pt")
    raw.pop("grey_head")
    assert Checkpoint.from_dict(raw).grey_head is None
    routed = load_checkpoint(grey_run / "best.pt")
    routed["grey_head"] = None  # a route without its head must not load (it would silently score with one head)
    with pytest.raises(CheckpointError, match="grey head"):
        Checkpoint.from_dict(routed)


def test_an_ensemble_of_routed_runs_is_the_mean_of_their_routed_logits(grey_run, cli_grey_run, trained_run, tmp_path):
    from training.ensemble import EnsembleError, build
    from training.predict import TorchPredictor

    second = cli_grey_run[0]
    with pytest.raises(EnsembleError, match="grey"):
        build([trained_run, second], tmp_path / "mixed", say=lambda *_: None)  # all members routed, or none
    build([grey_run, second], tmp_path / "ens", say=lambda *_: None)

    ensemble = TorchPredictor(tmp_path / "ens" / "best.pt")
    assert ensemble.spec.grey_route is not None and len(ensemble.spec.grey_route.fitted["members"]) == 2
    members = [TorchPredictor(r / "best.pt") for r in (grey_run, second)]
    grey, colour = _inputs(ensemble.spec.preprocessing)
    x = np.concatenate([grey, colour])
    expected = np.mean([m.predict_logits(x) for m in members], axis=0)
    assert np.abs(members[0].predict_logits(x) - members[1].predict_logits(x)).max() > 1e-2  # or it proves nothing
    np.testing.assert_allclose(ensemble.predict_logits(x), expected, atol=1e-4)

    result = CliRunner().invoke(_app(), ["grey-head", str(tmp_path / "ens"), "--out", str(tmp_path / "no")])
    assert result.exit_code == 2 and "ensemble" in result.output and not (tmp_path / "no").exists()


def test_grey_head_refuses_to_overwrite_its_run(trained_run):
    result = CliRunner().invoke(_app(), ["grey-head", str(trained_run), "--out", str(trained_run)])
    assert result.exit_code == 2 and "new folder" in result.output


def _app():
    from training.cli import app

    return app


def test_a_loose_head_learns_the_features_and_a_tight_one_stays_put():
    from training.grey_head import fit_head

    rng = np.random.RandomState(0)
    y = np.arange(200) % 2
    x = rng.normal(0, 1, (200, 8)).astype(np.float32)
    x[:, 0] += np.where(y == 1, 3.0, -3.0)  # class 1 lies along +e0
    w0 = np.zeros((2, 8), np.float32)
    w0[1, 0], w0[0, 0] = -1.0, 1.0  # the trained head has the classes the wrong way round
    b0 = np.zeros(2, np.float32)
    assert np.mean((x @ w0.T + b0).argmax(1) == y) < 0.1
    w, b = fit_head(x, y, w0, b0, lam=1e-3)
    assert np.mean((x @ w.T + b).argmax(1) == y) > 0.95
    w, b = fit_head(x, y, w0, b0, lam=1e4)
    np.testing.assert_allclose(w, w0, atol=1e-3)


def test_the_training_photos_are_the_main_root_and_an_even_draw_of_the_pools():
    from training.grey_head import even_pool_sample

    main = [Sample(Path(f"m{i}.jpg"), "ivory" if i % 2 else "other", "train", pool="met-ivory") for i in range(10)]
    big = [Sample(Path(f"b{i}.jpg"), "other", "train", pool="big") for i in range(100)]
    small = [Sample(Path(f"s{i}.jpg"), "other", "train", pool="small") for i in range(5)]
    kept_main, pool = even_pool_sample(main + big + small, ["/data/met-ivory"], 30, seed=0)
    assert kept_main == main
    assert sum(s.pool == "small" for s in pool) == 5 and sum(s.pool == "big" for s in pool) == 25


def test_a_training_configured_with_a_grey_head_ends_routed_and_calibrated(cli_grey_run):
    from training.checkpoint import Checkpoint

    out, output = cli_grey_run
    assert "grey head" in output
    ck = Checkpoint.load(out / "best.pt")
    assert ck.grey_head is not None and ck.spec.grey_route.fitted["lam"] == 0.01
    assert ck.val_metrics["n"] > 0 and ck.spec.metrics["calibration"]["thresholds"]  # calibrated with the route


def test_fitting_again_with_another_lam_reuses_the_grey_features(trained_run, tmp_path):
    from training.checkpoint import Checkpoint
    from training.grey_head import FEATURES_FILE, fit_grey_head

    said: list[str] = []
    fit_grey_head(trained_run, tmp_path / "g", GreyHeadConfig(lam=0.01), say=said.append)
    loose = Checkpoint.load(tmp_path / "g" / "best.pt").grey_head.weight.clone()
    assert (tmp_path / "g" / FEATURES_FILE).is_file() and not any("reused" in s for s in said)
    fit_grey_head(trained_run, tmp_path / "g", GreyHeadConfig(lam=100.0), say=said.append)
    assert any("reused" in s for s in said)
    tight = Checkpoint.load(tmp_path / "g" / "best.pt")
    trained = Checkpoint.load(trained_run / "best.pt").weights["classifier.weight"]
    assert tight.spec.grey_route.fitted["lam"] == 100.0
    assert (tight.grey_head.weight - trained).norm() < (loose - trained).norm()  # held closer to the trained head


def test_test_time_views_wrap_the_route_and_keep_the_embedding(grey_run):
    from training.export import ExportGraph
    from training.models import with_grey_route, with_views
    from training.predict import TorchPredictor

    p = TorchPredictor(grey_run / "best.pt")
    network, trained, grey_head = _heads(grey_run)
    routed = with_views(with_grey_route(p.network, p.checkpoint.grey_head, p.spec.grey_route, p.spec.preprocessing),
                        ["hflip"])
    plain = with_views(p.network, ["hflip"])
    grey, colour = _inputs(p.spec.preprocessing)
    mirrored = {name: np.ascontiguousarray(x[..., ::-1]) for name, x in (("grey", grey), ("colour", colour))}
    with torch.inference_mode():
        for name, x, head in (("grey", grey, grey_head), ("colour", colour, trained)):
            logits, cam, embedding = ExportGraph(routed, with_cam=True)(torch.from_numpy(x))
            expected = (_logits(network, x, head) + _logits(network, mirrored[name], head)) / 2
            np.testing.assert_allclose(logits.numpy(), expected, atol=1e-4)  # each view routed, then averaged
            np.testing.assert_allclose(cam.mean((2, 3)).numpy(), logits.numpy(), atol=1e-4)
            np.testing.assert_allclose(embedding.numpy(), ExportGraph(plain, with_cam=True)(torch.from_numpy(x))[2].numpy(),
                                       atol=1e-5)


def test_unreadable_training_photos_are_skipped_and_named(trained_run, problem_root, tmp_path):
    """A corrupt, empty or text-as-jpg training photo costs the fit nothing but itself: it is named in
    grey_head.json, the readable ones (CMYK, 16-bit grey, alpha, EXIF-rotated) are used."""
    import json

    from training.grey_head import fit_grey_head

    root, files = problem_root
    summary = fit_grey_head(trained_run, tmp_path / "g", data=[str(root)], say=lambda *_: None)
    named = {Path(path).name: reason for path, reason in summary["skipped"]}
    assert {files[k].name for k in ("corrupt", "zero", "text")} <= set(named)
    assert not {files[k].name for k in ("cmyk", "png16", "alpha", "exif")} & set(named)
    assert json.loads((tmp_path / "g" / "grey_head.json").read_text())["skipped"] == summary["skipped"]
    assert summary["photos"] == summary["main"] - len(summary["skipped"])


def test_grey_head_refuses_an_out_holding_another_run(trained_run, tmp_path):
    """Before: best.pt replaced, exit 0, the other run's last.pt, history.csv and config.yaml kept beside it."""
    out = tmp_path / "run4"
    out.mkdir()
    for name in ("best.pt", "last.pt", "config.yaml", "history.csv"):
        (out / name).write_text(f"the other run's {name}")
    result = CliRunner().invoke(_app(), ["grey-head", str(trained_run), "--out", str(out)])
    assert result.exit_code == 2 and "already holds config.yaml, history.csv, last.pt" in result.output, result.output
    assert {p.name: p.read_text() for p in out.iterdir()} == {n: f"the other run's {n}" for n in
                                                               ("best.pt", "last.pt", "config.yaml", "history.csv")}
