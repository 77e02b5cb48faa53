"""Training end to end on synthetic data: learns, skips unreadable files, resumes after a kill, evaluates."""

import csv
import json
import signal
import subprocess
import sys
import time

import numpy as np
import torch
import pytest

from tests.conftest import tiny_config
from training.checkpoint import Checkpoint
from training.evaluate import evaluate
from training.fileio import load_checkpoint
from training.train import train


def test_trained_run_learns_and_writes_its_files(trained_run):
    for name in ("best.pt", "last.pt", "config.yaml", "labels.json", "history.csv", "history.png", "summary.json"):
        assert (trained_run / name).exists(), name
    summary = json.loads((trained_run / "summary.json").read_text())
    assert summary["val_metrics"]["accuracy"] > 0.6  # 4 classes: chance is 0.25
    with (trained_run / "history.csv").open() as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1, 2, 3]


def test_training_skips_unreadable_files_and_finishes(problem_root, tmp_path):
    root, files = problem_root
    summary = train([str(root)], tmp_path, tiny_config(epochs=1))
    skipped = {item["path"] for item in json.loads((tmp_path / "skipped.json").read_text())}
    assert skipped == {str(files["corrupt"]), str(files["zero"]), str(files["text"])}
    assert summary["skipped"] == 3 and (tmp_path / "best.pt").exists()


def test_evaluate_writes_metrics_predictions_and_plots(trained_run, synth_root, tmp_path):
    metrics = evaluate(trained_run, [str(synth_root)], split="test", out_dir=tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["n"] == 16 and saved["labels"] == ["ivory", "other", "pangolin_scales", "tiger_skin"]
    assert set(saved["per_class"]["ivory"]) >= {"precision", "recall", "f1", "support", "pr_auc", "roc_auc"}
    assert np.array(saved["confusion_matrix"]).sum() == 16
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 1000 and (tmp_path / "pr_curves.png").exists()
    with (tmp_path / "predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 16 and {"path", "label", "pred", "p_ivory", "p_other"} <= set(rows[0])
    assert metrics.accuracy == pytest.approx(np.mean([r["label"] == r["pred"] for r in rows]))


def test_single_label_split_and_unknown_labels(trained_run, synth_root, tmp_path):
    only_other = tmp_path / "neg" / "other"
    only_other.mkdir(parents=True)
    rhino = tmp_path / "neg" / "rhino_horn"
    rhino.mkdir()
    for i, src in enumerate(sorted((synth_root / "test" / "other").glob("*.jpg"))):
        (only_other / f"{i}.jpg").write_bytes(src.read_bytes())
        (rhino / f"{i}.jpg").write_bytes(src.read_bytes())
    metrics = evaluate(trained_run, [str(tmp_path / "neg")], split=None, out_dir=tmp_path / "eval")
    assert metrics.n == 4 and metrics.unknown_labels == {"rhino_horn": 4}
    assert metrics.per_class["other"]["pr_auc"] is None  # undefined with one class present, not a crash
    # negatives-only: false-positive rates per product class, and a grid of the most confident ones
    fp = metrics.false_positives
    assert fp["negatives"] == 4 and set(fp["per_class"]) == {"ivory", "pangolin_scales", "tiger_skin"}
    for rates in fp["per_class"].values():
        assert 0.0 <= rates["at_block"] <= rates["at_review"] <= 1.0
    assert (tmp_path / "eval" / "false_positives.png").stat().st_size > 1000


def test_evaluation_of_checkpoint_matches_training_validation(trained_run, synth_root):
    """Training's cached validation and evaluation's decode+preprocess path give the same numbers."""
    best = Checkpoint.load(trained_run / "best.pt")
    metrics = evaluate(trained_run, [str(synth_root)], split="val")
    assert metrics.confusion_matrix == best.val_metrics["confusion_matrix"]


def _run_cli(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "training.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_kill_mid_epoch_then_resume_continues(synth_root, tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text(
        "data: {img_size: 64, num_workers: 0}\ntrain: {epochs: 4, batch_size: 8, threads: 2, early_stopping_patience: null}\n"
    )
    out = tmp_path / "run"
    args = ["train", "--data", str(synth_root), "--out", str(out), "--config", str(config)]
    proc = _run_cli(args)
    deadline = time.time() + 240
    while not (out / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert (out / "last.pt").exists(), "no checkpoint after the first epoch"
    time.sleep(1.0)  # into epoch 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = load_checkpoint(out / "last.pt")["epoch"]
    assert 1 <= done < 4, "the run finished before it could be killed"

    resumed = _run_cli([*args, "--resume"])
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert f"resuming from epoch {done}" in output
    with (out / "history.csv").open() as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1, 2, 3, 4]
    assert load_checkpoint(out / "last.pt")["epoch"] == 4
    # no temporary files left behind by the kill
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(synth_root, tmp_path):
    full, split_run = tmp_path / "full", tmp_path / "split"
    train([str(synth_root)], full, tiny_config(epochs=2, early_stopping_patience=None))
    paused = train([str(synth_root)], split_run, tiny_config(epochs=2, early_stopping_patience=None), stop_after=1)
    assert load_checkpoint(split_run / "last.pt")["epoch"] == 1
    assert (paused["paused"], paused["epochs_run"]) == (True, 1)  # a caller can tell a pause from the end
    done = train([str(synth_root)], split_run, tiny_config(epochs=2, early_stopping_patience=None), resume=True)
    assert (done["paused"], done["epochs_run"]) == (False, 2)
    a, b = load_checkpoint(full / "last.pt")["model"], load_checkpoint(split_run / "last.pt")["model"]
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < 1e-4, f"resumed weights differ by {worst}"


def test_frozen_modules_keep_pretrained_weights_and_batchnorm_statistics(synth_root, tmp_path):
    from training.models import create_model

    config = tiny_config(epochs=1)
    config.model.freeze = ["conv_stem", "bn1", "blocks.0"]
    train([str(synth_root)], tmp_path, config)
    trained = load_checkpoint(tmp_path / "last.pt")["model"]
    pretrained = create_model(config.model.name, 4, "offline").state_dict()
    frozen = [k for k in trained if k.split(".")[0] in ("conv_stem", "bn1") or k.startswith("blocks.0.")]
    assert any("running_mean" in k for k in frozen) and any(k.endswith("weight") for k in frozen)
    for key in frozen:
        if "num_batches_tracked" not in key:
            assert torch.equal(trained[key], pretrained[key]), f"{key} changed although frozen"
    # and the rest did train
    assert not torch.equal(trained["blocks.3.0.conv_pw.weight"], pretrained["blocks.3.0.conv_pw.weight"])
    assert not torch.equal(trained["blocks.3.0.bn1.running_mean"], pretrained["blocks.3.0.bn1.running_mean"])


@pytest.mark.parametrize("dies_in", ["append_history", "atomic_torch_save"])
def test_a_kill_between_history_and_checkpoint_writes_loses_no_epoch(synth_root, tmp_path, monkeypatch, dies_in):
    """Whichever of the two end-of-epoch writes a kill interrupts, resume yields history 1..N without gaps."""
    import training.loop.rundir as train_module

    real = getattr(train_module, dies_in)

    def dying(*args):
        if dies_in == "append_history" and args[1]["epoch"] == 2:
            raise KeyboardInterrupt("killed while appending the history row of epoch 2")
        if dies_in == "atomic_torch_save" and str(args[1]).endswith("last.pt") and args[0]["epoch"] == 2:
            raise KeyboardInterrupt("killed while writing last.pt of epoch 2")
        return real(*args)

    monkeypatch.setattr(train_module, dies_in, dying)
    config = tiny_config(epochs=3, early_stopping_patience=None)
    with pytest.raises(KeyboardInterrupt):
        train([str(synth_root)], tmp_path, config)
    monkeypatch.setattr(train_module, dies_in, real)
    train([str(synth_root)], tmp_path, config, resume=True)
    with (tmp_path / "history.csv").open() as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1, 2, 3]


def test_a_fresh_run_replaces_the_history_left_in_its_directory(synth_root, tmp_path):
    """Killed in epoch 1 after its history row (no last.pt yet), the user starts again without --resume."""
    (tmp_path / "history.csv").write_text("epoch,train_loss\n1,0.9\n5,0.1\n")
    train([str(synth_root)], tmp_path, tiny_config(epochs=2, early_stopping_patience=None))
    with (tmp_path / "history.csv").open() as fh:
        assert [int(r["epoch"]) for r in csv.DictReader(fh)] == [1, 2]


def test_a_fresh_run_that_fails_leaves_no_checkpoint_of_the_run_it_replaced(synth_root, trained_run, tmp_path):
    """A fresh run into a finished run's folder that failed in its first epoch used to leave the old best.pt
    beside its own config.yaml and labels.json: a mixed run that `wildcheck export` took."""
    import shutil

    from training.loop.data import DataError

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    old_config = (run / "config.yaml").read_text()

    def fail(epoch, indices):
        raise RuntimeError("the machine went away")

    with pytest.raises(RuntimeError, match="went away"):
        train([str(synth_root)], run, tiny_config(epochs=1, seed=5), on_batch=fail)
    assert not any((run / name).exists() for name in ("best.pt", "last.pt", "summary.json", "calibration.json"))
    assert (run / "config.yaml").read_text() != old_config  # the new run's setup, and nothing of the old run
    # a data mistake found before any write leaves the old run as it was
    shutil.rmtree(run)
    shutil.copytree(trained_run, run)
    with pytest.raises(DataError, match="negative_label 'Other' is not one of the labels"):
        train([str(synth_root)], run, tiny_config(epochs=1).model_copy(
            update={"data": tiny_config().data.model_copy(update={"negative_label": "Other"})}))
    assert (run / "best.pt").exists() and (run / "config.yaml").read_text() == old_config


def test_misnamed_decision_labels_and_new_labels_on_resume_are_clear_errors(synth_root, trained_run, tmp_path):
    from training.config import load_config
    from training.loop.data import DataError

    config = load_config(None, {"train": {"epochs": 1, "threads": 2}, "data": {"img_size": 64, "num_workers": 0},
                                "decision": {"never_block": ["ivroy"]}})
    with pytest.raises(DataError, match=r"never_block names labels the data does not have: \['ivroy'\]"):
        train([str(synth_root)], tmp_path / "nb", config)
    # resuming with a dataset that gained a label: a KeyError traceback before
    import shutil

    grown = tmp_path / "grown"
    shutil.copytree(synth_root, grown)
    (grown / "train" / "rhino_horn").mkdir()
    for p in sorted((grown / "train" / "ivory").glob("*.jpg"))[:4]:
        shutil.copy(p, grown / "train" / "rhino_horn" / p.name)
    run = tmp_path / "resumed"
    shutil.copytree(trained_run, run)
    with pytest.raises(DataError, match=r"labels the resumed run was not trained on: \['rhino_horn'\]"):
        train([str(grown)], run, tiny_config(epochs=4), resume=True)


def test_layer_decay_slows_early_layers_only(synth_root, tmp_path):
    """timm's layer-wise lr decay: the stem barely moves from its pretrained weights, the last blocks train."""
    from training.models import create_model

    pretrained = create_model("tf_efficientnet_lite0", 4, "offline").state_dict()

    def moved(run, key):
        return (load_checkpoint(run / "last.pt")["model"][key] - pretrained[key]).abs().mean().item()

    plain, decayed = tmp_path / "plain", tmp_path / "decayed"
    one_lr = tiny_config(epochs=1, ema=False)
    one_lr.train.layer_decay = None
    train([str(synth_root)], plain, one_lr)
    train([str(synth_root)], decayed, tiny_config(epochs=1, ema=False, layer_decay=0.5))
    stem, late = "conv_stem.weight", "blocks.6.0.conv_pw.weight"
    # 0.5 per block over 17 blocks: the stem's lr is ~1e-5 of the head's
    assert moved(decayed, stem) < 0.01 * moved(plain, stem)
    assert moved(decayed, late) > 0.2 * moved(plain, late)
    history = list(csv.DictReader((decayed / "history.csv").open()))
    assert float(history[0]["lr"]) > 1e-4  # the head's (peak) lr is what the history reports


def _train_with_a_pool(synth_root, out, mixup_prob: float, epochs: int, init_from=None) -> dict:
    """A tiny run with the synthetic 'other' images as its negatives pool (half drawn per epoch); its last.pt."""
    import shutil

    negatives = out.parent / f"{out.name}_negatives"
    for split in ("train", "val"):
        shutil.copytree(synth_root / split / "other", negatives / split / "other")
    config = tiny_config(epochs=epochs, early_stopping_patience=None)
    config.data.negatives, config.data.negatives_per_epoch = [str(negatives)], 0.5
    config.train.mixup.prob = mixup_prob
    train([str(synth_root)], out, config, init_from=init_from)
    return load_checkpoint(out / "last.pt")


def test_mixed_batches_train_but_do_not_feed_hard_negative_mining(synth_root, tmp_path):
    """Mixup/CutMix images are blends, so their scores must not mark single pool negatives as hard."""
    mixed = _train_with_a_pool(synth_root, tmp_path / "mixed", mixup_prob=1.0, epochs=2)
    plain = _train_with_a_pool(synth_root, tmp_path / "plain", mixup_prob=0.0, epochs=2)
    assert mixed["epoch"] == 2 and np.isfinite(mixed["best_f1"])
    assert not mixed["hardness"].any()
    assert plain["hardness"].any()


def test_mixup_needs_a_mixing_kind():
    from training.config import load_config

    with pytest.raises(ValueError, match="mixup_alpha or cutmix_alpha"):
        load_config(None, {"train": {"mixup": {"prob": 0.5, "mixup_alpha": 0.0, "cutmix_alpha": 0.0}}})


def test_early_stopping_ends_a_run_whose_validation_macro_f1_stops_improving(synth_root, tmp_path):
    # at lr 1e-12 the zero-initialised head stays at zero: every epoch predicts the same, so macro-F1
    # improves only at epoch 1 and patience 2 ends the 5-epoch run after epoch 3
    config = tiny_config(epochs=5, lr=1e-12, early_stopping_patience=2)
    config.train.mixup.prob = 0.0
    train([str(synth_root)], tmp_path, config)
    with (tmp_path / "history.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert [int(r["best"]) for r in rows] == [1, 0, 0]
    assert load_checkpoint(tmp_path / "best.pt")["epoch"] == 1


def test_a_warm_start_scores_the_pool_before_its_first_epoch(synth_root, trained_run, tmp_path):
    """A fine-tune's first epoch drew its negatives uniformly: the miner knew only what that epoch's batches had
    scored (session 13's 3-epoch fine-tunes mined 0 negatives in epoch 1). A warm start now scores the pool with
    its starting weights first. Every batch here is mixed (nothing reaches the miner from training), so the
    hardness can only come from that scoring, and epoch 1 already draws hard negatives."""
    warm = _train_with_a_pool(synth_root, tmp_path / "warm", mixup_prob=1.0, epochs=1, init_from=trained_run)["hardness"]
    history = list(csv.DictReader((tmp_path / "warm" / "history.csv").open()))
    assert (warm > 0).all() and warm.std() > 0  # every pool image scored, and not all alike
    assert int(history[0]["mined_negatives"]) > 0
    # a fresh start has nothing to score with and stays as it was: test_mixed_batches_train_but_do_not_feed_...


def test_decoding_reads_ahead_a_bounded_number_of_pictures(monkeypatch):
    """Executor.map would decode every sample ahead of the model (a 50,000-photo evaluation held in memory at
    once); decoded_batches keeps at most a few batches decoded ahead of the one handed out."""
    import threading
    import time
    from pathlib import Path

    from PIL import Image

    import training.predict as predict
    from training.data.sources import Sample

    decoded = 0
    lock = threading.Lock()

    def fake_decode(sample, spec):
        nonlocal decoded
        with lock:
            decoded += 1
        return Image.new("RGB", (8, 8))

    monkeypatch.setattr(predict, "decode_sample", fake_decode)
    samples = [Sample(Path(f"p{i}.jpg"), "other", "val") for i in range(400)]
    consumed, most_ahead = 0, 0
    for _, images, _ in predict.decoded_batches(samples, spec=None, skipped=[], batch_size=10):
        time.sleep(0.02)  # a slow model: the decoders would run ahead
        consumed += len(images)
        most_ahead = max(most_ahead, decoded - consumed)
    assert consumed == 400
    assert most_ahead <= 40, most_ahead  # two batches ahead (20), plus the pool's in-flight work


def test_an_out_inside_the_data_is_refused_before_any_work(onnx_model, synth_root, tmp_path):
    """Before: evaluate --out DATA/val/ivory/eval wrote its PNGs into the ivory folder (the next evaluation counted
    them as ivory images), and train --out DATA/train/ivory/run its history.png and reliability.png."""
    import shutil

    from typer.testing import CliRunner

    from training.cli import app

    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    out = data / "val" / "ivory" / "eval"
    result = CliRunner().invoke(app, ["evaluate", str(onnx_model), "--data", str(data), "--out", str(out)])
    assert result.exit_code == 2 and f"error: --out {out} is inside {data}" in result.output, result.output
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before  # nothing written among the data
    assert evaluate(onnx_model, [tmp_path / "data"], "val", out_dir=tmp_path / "eval").n == 16  # beside it is fine


@pytest.mark.parametrize("where", ["data", "negatives"])
def test_a_run_dir_inside_the_data_or_a_negatives_pool_is_refused_before_any_work(synth_root, tmp_path, where):
    """Before: train --out DATA/train/ivory/run wrote history.png (and calibrate reliability.png) among its images."""
    import shutil

    from serving.errors import InvalidInput

    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    config = tiny_config(epochs=1)
    if where == "negatives":
        config.data.negatives = [str(data)]
    with pytest.raises(InvalidInput, match="is inside"):
        train([str(data if where == "data" else synth_root)], data / "train" / "other" / "run", config)
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
