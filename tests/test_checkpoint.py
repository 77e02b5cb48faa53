"""best.pt is a typed Checkpoint; runs trained before it (loose dicts) still load, evaluate and export."""

import numpy as np
import pytest
import torch

from serving.contract import read_contract
from serving.decision import default_thresholds
from training.checkpoint import Checkpoint, CheckpointError
from training.evaluate import evaluate
from training.export import export
from training.predict import TorchPredictor


def legacy_layout(ckpt: Checkpoint) -> dict:
    """best.pt as `wildcheck train` + `wildcheck calibrate` wrote it before the typed checkpoint (e.g. runs/B42):
    the spec's fields loose at the top level, ``decision_rules`` and ``calibration`` beside them."""
    spec = ckpt.spec.model_dump(mode="json")
    return {
        "labels": spec["labels"], "preprocessing": spec["preprocessing"], "config": ckpt.config.model_dump(mode="json"),
        "architecture": spec["architecture"], "wildcheck_version": "0.1.0", "training_data": spec["training_data"],
        "data_roots": ckpt.data_roots, "init_from": None, "tiling": spec["tiling"], "model": ckpt.weights,
        "epoch": ckpt.epoch, "ema": ckpt.ema, "val_metrics": ckpt.val_metrics, "temperature": spec["temperature"],
        "thresholds": spec["thresholds"], "threshold_rules": spec["threshold_rules"], "decision_rules": spec["decision"],
        "never_block": spec["never_block"], "calibration": spec["metrics"]["calibration"],
        "val_curves": spec["val_curves"], "negative_scores": spec["negative_scores"],
    }


@pytest.fixture(scope="module")
def legacy_run(trained_run, tmp_path_factory):
    run = tmp_path_factory.mktemp("legacy_run")
    torch.save(legacy_layout(Checkpoint.load(trained_run / "best.pt")), run / "best.pt")
    return run


def test_best_pt_holds_the_spec_beside_the_weights_and_loads_weights_only(trained_run):
    raw = torch.load(trained_run / "best.pt", map_location="cpu", weights_only=True)
    assert raw["format"] == 2 and set(raw["spec"]["labels"]) == {"ivory", "other", "pangolin_scales", "tiger_skin"}
    assert "labels" not in raw and "thresholds" not in raw  # nothing of the spec loose beside it
    ckpt = Checkpoint.load(trained_run / "best.pt")
    assert ckpt.spec.temperature != 1.0 and ckpt.spec.decision is not None  # train calibrated it
    assert ckpt.spec.metrics["val"]["confusion_matrix"] == ckpt.val_metrics["confusion_matrix"]


def test_an_old_loose_checkpoint_loads_evaluates_and_exports_like_the_new_one(trained_run, legacy_run, synth_root,
                                                                              tmp_path):
    new, old = Checkpoint.load(trained_run / "best.pt"), Checkpoint.load(legacy_run / "best.pt")
    assert old.spec == new.spec and old.epoch == new.epoch and old.config == new.config
    assert old.data_roots == new.data_roots
    old_eval, new_eval = (evaluate(run, [str(synth_root)], split="test") for run in (legacy_run, trained_run))
    assert old_eval.model_dump(exclude={"model"}) == new_eval.model_dump(exclude={"model"})
    report = export(legacy_run, tmp_path / "old.onnx", version="0.9")
    assert report["parity"]["max_abs_diff"] <= 1e-4
    contract = read_contract(tmp_path / "old.onnx")
    assert contract.thresholds == new.spec.thresholds and contract.temperature == new.spec.temperature
    assert contract.decision == new.spec.decision and contract.metrics == new.spec.metrics


def test_an_uncalibrated_old_checkpoint_gets_the_default_thresholds(trained_run, tmp_path):
    legacy = legacy_layout(Checkpoint.load(trained_run / "best.pt"))
    for key in ("temperature", "thresholds", "threshold_rules", "decision_rules", "never_block", "calibration",
                "val_curves", "negative_scores"):
        del legacy[key]  # as train wrote it before calibration ran
    torch.save(legacy, tmp_path / "best.pt")
    spec = TorchPredictor(tmp_path / "best.pt").spec
    assert spec.temperature == 1.0 and spec.decision is None and spec.metrics["calibration"] == {}
    assert spec.thresholds == default_thresholds(spec.labels, "other") and "other" not in spec.thresholds


def test_a_file_that_is_no_checkpoint_says_so(tmp_path):
    """Before: a list or tensor saved as best.pt was an AttributeError traceback ('list' has no 'get')."""
    for content in ({"weights": {"w": torch.zeros(2)}}, [1, 2], torch.zeros(3)):
        torch.save(content, tmp_path / "best.pt")
        with pytest.raises(CheckpointError, match="not a readable wildcheck checkpoint"):
            Checkpoint.load(tmp_path / "best.pt")


def test_checkpoint_round_trips(trained_run, tmp_path):
    ckpt = Checkpoint.load(trained_run / "best.pt")
    ckpt.save(tmp_path / "copy.pt")
    again = Checkpoint.load(tmp_path / "copy.pt")
    assert again.spec == ckpt.spec and again.val_metrics == ckpt.val_metrics
    assert all(np.array_equal(again.weights[k].numpy(), v.numpy()) for k, v in ckpt.weights.items())


def test_the_checker_takes_any_predictor_and_a_checkpoint_decides_like_its_export(trained_run, onnx_model, synth_root):
    from serving.checker import ImageChecker
    from serving.runtime import OnnxModel, Predictor

    torch_model = TorchPredictor(trained_run / "best.pt")
    assert isinstance(torch_model, Predictor) and isinstance(OnnxModel(onnx_model), Predictor)
    from_ckpt, from_onnx = ImageChecker(torch_model), ImageChecker(str(onnx_model))
    for path in sorted((synth_root / "test").glob("*/*.jpg"))[::3]:
        a, b = from_ckpt.check(path.read_bytes()), from_onnx.check(path.read_bytes())
        assert a["decision"] == b["decision"], path
        assert a["scores"] == pytest.approx(b["scores"], abs=1e-4)
    assert a["model"]["version"].split("+")[1] == b["model"]["version"].split("+")[1]  # the same weights hash


def test_the_checker_opens_the_onnx_file_once(onnx_model, monkeypatch):
    """The contract comes from the inference session itself: no second parse of a large file at start-up."""
    import onnxruntime

    from serving.checker import ImageChecker

    opened = []
    real = onnxruntime.InferenceSession

    def counting(path, *args, **kwargs):
        opened.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", counting)
    checker = ImageChecker(str(onnx_model))
    assert opened == [str(onnx_model)] and checker.contract.labels
