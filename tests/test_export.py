"""Export: the ONNX file carries the contract, matches PyTorch, and broken files are refused."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from serving.contract import ContractError, read_contract
from serving.runtime import OnnxModel
from training.checkpoint import Checkpoint
from training.evaluate import evaluate
from training.export import ExportError, export, export_module
from training.predict import TorchPredictor, run_samples
from tests.conftest import REPO, photo, record_pass_rows


@pytest.fixture(scope="session")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    report = export(trained_run, out, version="1.2.0")
    return out, report


def test_export_is_one_self_contained_checked_file(exported):
    path, report = exported
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # no .onnx.data beside it
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 64, 64]
    assert report["parity"]["max_abs_diff"] <= 1e-4 and not report["parity"]["top1_mismatches"]


def test_metadata_round_trips_the_contract(exported, trained_run):
    path, _ = exported
    contract = read_contract(path)
    checkpoint = Checkpoint.load(trained_run / "best.pt")
    spec = checkpoint.spec
    assert contract.labels == spec.labels == ["ivory", "other", "pangolin_scales", "tiger_skin"]
    assert contract.preprocessing == spec.preprocessing
    assert set(contract.thresholds) == {"ivory", "pangolin_scales", "tiger_skin"}  # 'other' never blocks
    assert contract.model_version.startswith("1.2.0+") and len(contract.model_version) == len("1.2.0+") + 12
    assert contract.metrics["val"]["confusion_matrix"] == checkpoint.val_metrics["confusion_matrix"]
    assert contract.training_data["sha256"] and contract.architecture == "tf_efficientnet_lite0"
    raw = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert json.loads(raw["wildcheck.labels"]) == contract.labels  # plain JSON any ONNX tool can show


def test_onnx_evaluation_equals_checkpoint_evaluation(exported, trained_run, synth_root):
    path, _ = exported
    from_onnx = evaluate(path, [str(synth_root)], split="test")
    from_ckpt = evaluate(trained_run, [str(synth_root)], split="test")
    assert from_onnx.confusion_matrix == from_ckpt.confusion_matrix
    assert from_onnx.balanced_accuracy == from_ckpt.balanced_accuracy


def test_parity_gate_fails_on_a_broken_export(trained_run, tmp_path, monkeypatch):
    """An exporter that gets the graph wrong (here: one class's bias shifted in the file it writes) is caught by
    the parity gate with onnxruntime, and nothing is written."""
    import training.export as export_code

    faithful = export_code.torch_to_onnx

    def faulty(model, input_size, path):
        cam = faithful(model, input_size, path)
        graph = onnx.load(str(path))
        bias = next(t for t in graph.graph.initializer if t.name.endswith("classifier.bias"))
        shifted = onnx.numpy_helper.to_array(bias).copy()
        shifted[0] += 3.0
        bias.CopyFrom(onnx.numpy_helper.from_array(shifted, bias.name))
        onnx.save(graph, str(path))
        return cam

    monkeypatch.setattr(export_code, "torch_to_onnx", faulty)
    predictor = TorchPredictor(trained_run / "best.pt")
    val, _ = run_samples(predictor.checkpoint, None)
    with pytest.raises(ExportError, match="parity gate failed"):
        export_module(predictor.model, predictor.contract, tmp_path / "broken.onnx", predictor, val[:16])
    assert not (tmp_path / "broken.onnx").exists()


def test_model_without_metadata_is_rejected(tmp_path, exported):
    path, _ = exported
    bare = onnx.load(str(path))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(ContractError, match="wildcheck.labels"):
        read_contract(tmp_path / "bare.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ContractError, match="not a readable ONNX"):
        OnnxModel(tmp_path / "junk.onnx")


def _with_metadata(path, out, **changes):
    """A copy of ``path`` whose wildcheck metadata has ``changes`` (JSON values) written over it."""
    model = onnx.load(str(path))
    for entry in model.metadata_props:
        key = entry.key.removeprefix("wildcheck.")
        if key in changes:
            entry.value = json.dumps(changes[key])
    onnx.save(model, str(out))
    return out


def test_a_file_whose_contract_does_not_fit_it_never_loads(tmp_path, exported):
    """A file that lost its thresholds, or names more labels than its graph has logits, used to load and answer
    `allow` for everything (the missing class was never flagged; zip() cut the labels to fit the logits)."""
    path, _ = exported
    labels = read_contract(path).labels
    protected = [label for label in labels if label != "other"]
    no_thresholds = _with_metadata(path, tmp_path / "no_thresholds.onnx", thresholds={}, val_curves={},
                                   threshold_rules={}, negative_scores=None, decision=None)
    with pytest.raises(ContractError, match="protected classes without thresholds"):
        read_contract(no_thresholds)
    with pytest.raises(ContractError, match="protected classes without thresholds"):
        OnnxModel(no_thresholds)
    extra = _with_metadata(path, tmp_path / "extra_label.onnx", labels=labels + ["rhino_horn"],
                           thresholds={c: {"block": 0.9, "review": 0.5} for c in protected + ["rhino_horn"]})
    with pytest.raises(ContractError, match=f"gives {len(labels)} logits but the contract names {len(labels) + 1}"):
        OnnxModel(extra)
    twice = _with_metadata(path, tmp_path / "twice.onnx", labels=[labels[0]] * len(labels))
    with pytest.raises(ContractError, match="labels name a class twice"):
        OnnxModel(twice)
    small = read_contract(path).preprocessing.model_dump(mode="json") | {"input_size": 32}
    with pytest.raises(ContractError, match="32 px"):
        OnnxModel(_with_metadata(path, tmp_path / "small.onnx", preprocessing=small))
    for name, changes, message in (("negative", {"negative_label": "Other"}, "negative_label 'Other' is not one"),
                                   ("never_block", {"never_block": ["ivroy"]}, "never_block names labels")):
        with pytest.raises(ContractError, match=message):
            read_contract(_with_metadata(path, tmp_path / f"{name}.onnx", **changes))
    OnnxModel(path)  # the file as exported loads


def test_cli_export_fails_cleanly_on_a_missing_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "training.cli", "export", str(tmp_path / "nope"), "--out",
                           str(tmp_path / "m.onnx")], capture_output=True, text=True)
    assert proc.returncode == 2 and "no such run dir" in proc.stderr


def test_int8_export_gate(trained_run, tmp_path):
    out = tmp_path / "m.onnx"
    report = export(trained_run, out, int8=True, calib_images=32, int8_max_drop=100.0)
    q = report["int8"]
    int8_path = tmp_path / "m.int8.onnx"
    assert int8_path.exists() and q["bytes"] < out.stat().st_size / 2
    contract = read_contract(int8_path)
    assert contract.precision == "int8" and "int8_val" in contract.metrics
    assert any(n.op_type == "QuantizeLinear" for n in onnx.load(str(int8_path)).graph.node)
    probs = OnnxModel(int8_path).predict_proba(np.zeros((2, 3, 64, 64), np.float32))
    assert probs.shape == (2, 4) and np.allclose(probs.sum(1), 1, atol=1e-5)
    # a limit no quantised model can meet (a negative drop) refuses to write the file; exported again to the same
    # path, the FP32 model is replaced and the earlier INT8 copy (before: left beside it, another model) goes
    with pytest.raises(ExportError, match="INT8 refused"):
        export(trained_run, out, int8=True, calib_images=16, int8_max_drop=-100.0)
    assert out.exists() and not int8_path.exists()


def test_export_never_writes_over_the_run_or_into_a_folder(trained_run, tmp_path):
    """Before: --out RUN/best.pt replaced the run's checkpoint with the ONNX file, and --out FOLDER failed with
    IsADirectoryError after the whole export."""
    from serving.errors import InvalidInput

    before = (trained_run / "best.pt").read_bytes()
    with pytest.raises(InvalidInput, match="an exported model is an .onnx file"):
        export(trained_run, trained_run / "best.pt")
    assert (trained_run / "best.pt").read_bytes() == before
    with pytest.raises(InvalidInput, match="is a folder"):
        export(trained_run, tmp_path)


def test_a_model_with_broken_weights_is_never_exported_or_served(trained_run, exported, tmp_path, monkeypatch):
    """A NaN classifier bias (what a diverged training leaves): before, the parity gate passed it (NaN > 1e-4 is
    False), and served it allowed every photo, since NaN is below every threshold. It is refused before the
    ONNX export (~20 s; before, the refusal came after it)."""
    import training.export as export_code

    exported_graphs = []
    monkeypatch.setattr(export_code, "torch_to_onnx", lambda *a: exported_graphs.append(a))
    raw = torch.load(trained_run / "best.pt", weights_only=True)
    bias = next(k for k in raw["model"] if k.endswith("classifier.bias"))
    raw["model"][bias] = torch.full_like(raw["model"][bias], float("nan"))
    run = tmp_path / "diverged"
    run.mkdir()
    torch.save(raw, run / "best.pt")
    with pytest.raises(ExportError, match="not finite"):
        export(run, tmp_path / "nan.onnx")
    assert not (tmp_path / "nan.onnx").exists() and not exported_graphs

    path, _ = exported  # the same damage done to an exported file: it does not load
    model = onnx.load(str(path))
    init = next(t for t in model.graph.initializer if t.name.endswith("classifier.bias"))
    init.CopyFrom(onnx.numpy_helper.from_array(np.full(onnx.numpy_helper.to_array(init).shape, np.nan, np.float32),
                                               init.name))
    onnx.save(model, str(tmp_path / "nan_served.onnx"))
    with pytest.raises(ContractError, match="not finite"):
        OnnxModel(tmp_path / "nan_served.onnx")
    from serving.decision import ScoresNotFinite, decide
    from training.metrics import compute_metrics

    thresholds = read_contract(path).thresholds
    with pytest.raises(ScoresNotFinite):
        decide({label: float("nan") for label in thresholds}, thresholds)
    with pytest.raises(ScoresNotFinite, match="lower --set train.lr"):
        compute_metrics(np.array([0, 1]), np.array([[np.nan, 0.5], [0.5, 0.5]]), ["ivory", "other"])


def test_big_batches_run_in_passes_of_bounded_rows(exported, trained_run, monkeypatch):
    """A batch of many views (32 pictures of a collage's panels) is scored in passes of at most
    MAX_ROWS_PER_PASS rows, by the ONNX file and the checkpoint alike, with the scores of one big pass: the
    memory of one pass grows with its rows (the robustness report peaked at 9.9 GB in 160-row passes)."""
    import serving.runtime as runtime

    monkeypatch.setattr(runtime, "MAX_ROWS_PER_PASS", 4)
    x = np.random.default_rng(0).normal(size=(10, 3, 64, 64)).astype(np.float32)

    model = OnnxModel(exported[0])
    rows = record_pass_rows(model)
    whole = model.unrecorded.run([model.logits_output], {model.input_name: x})[0]
    np.testing.assert_allclose(model.predict_logits(x), whole, rtol=1e-4, atol=1e-5)
    assert rows == [4, 4, 2]
    rows.clear()
    logits, cam = model.predict_with_cam(x)
    assert rows == [4, 4, 2] and len(logits) == len(cam) == 10
    np.testing.assert_allclose(logits, whole, rtol=1e-4, atol=1e-5)

    torch_model, torch_rows = TorchPredictor(trained_run / "best.pt"), []
    torch_model.model.conv_stem.register_forward_pre_hook(lambda _module, args: torch_rows.append(len(args[0])))
    np.testing.assert_allclose(torch_model.predict_logits(x), whole, rtol=1e-3, atol=1e-4)
    assert torch_rows == [4, 4, 2]
    torch_rows.clear()
    logits, cam = torch_model.predict_with_cam(x)
    assert torch_rows == [4, 4, 2] and len(logits) == len(cam) == 10


def test_pictures_are_scored_a_few_at_a_time(exported, monkeypatch):
    """Evaluation and the robustness report make, score and drop the views of MAX_ROWS_PER_PASS pictures at a
    time, with the scores of one big batch: a batch of 32 collages was held whole before its passes (up to 320
    views, 390 MB at 320 px)."""
    import serving.runtime as runtime
    from training.predict import predict_images

    model = OnnxModel(exported[0])
    pictures = [photo(seed, (90, 70)) for seed in range(7)]
    one_batch = runtime.softmax(model.predict_logits(np.stack([model.preprocessing(p) for p in pictures])),
                                model.temperature)
    monkeypatch.setattr(runtime, "MAX_ROWS_PER_PASS", 2)
    scored, predict_proba = [], model.predict_proba
    model.predict_proba = lambda batch: (scored.append(len(batch)), predict_proba(batch))[1]
    np.testing.assert_allclose(predict_images(model, pictures), one_batch, rtol=1e-4, atol=1e-6)
    assert scored == [2, 2, 2, 1]


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not (REPO / "models" / "wildcheck-ivory.onnx").is_file(), reason="the shipped model is absent")
def test_a_server_model_gives_back_the_memory_of_a_big_pass():
    """A server worker keeps onnxruntime's arena warm for one-photo passes (without one a 320 px view took 1.9x
    the time) but gives back what a batch's bigger passes took (``release_above_rows``): with the arena kept,
    8 views of the shipped model left ~270 MB behind for good."""
    shipped = REPO / "models" / "wildcheck-ivory.onnx"
    left = {}
    for release in (1, None):
        model = OnnxModel(shipped, release_above_rows=release)
        size = model.preprocessing.input_size
        views = np.zeros((8, 3, size, size), np.float32)
        model.predict_logits(views[:1])
        before = _rss_mb()
        model.predict_logits(views)
        model.predict_logits(views[:1])
        left[release] = _rss_mb() - before
        del model
    assert left[None] > 100, left  # the control: the arena keeps the passes' peak
    assert left[1] < 50, left
