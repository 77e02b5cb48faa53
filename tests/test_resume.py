"""--resume continues the run saved in last.pt: its config (not config.yaml's), its data, and, extended with
--epochs, a schedule rebuilt for the new length."""

import csv
import re
import shutil

import pytest
import torch

from tests.conftest import tiny_config
from training.config import ConfigConflict, dump_config, load_config, resolve_config
from training.fileio import atomic_torch_save, load_checkpoint

# --- the config: last.pt's is the run's --------------------------------------------------------------------------


def _saved_run(tmp_path):
    """A run dir as `train` leaves it, but small: last.pt holding the config (96 px), config.yaml its copy."""
    run = tmp_path / "run"
    run.mkdir()
    config = load_config(None, {"train": {"epochs": 2, "batch_size": 8}, "data": {"img_size": 96}})
    atomic_torch_save({"config": config.model_dump(mode="json"), "epoch": 1}, run / "last.pt")
    (run / "config.yaml").write_text(dump_config(config))
    return run, config


def test_resume_takes_the_config_from_last_pt_when_config_yaml_is_gone(tmp_path):
    """Before, a deleted config.yaml made --resume continue a 96 px run at the default 224 px."""
    run, saved = _saved_run(tmp_path)
    (run / "config.yaml").unlink()
    resolved = resolve_config(None, run_dir=run, resume=True)
    assert resolved.config == saved and resolved.config.data.img_size == 96


def test_resume_refuses_an_edited_config_yaml_by_name(tmp_path):
    """Before, config.yaml edited to 128 px was what the resumed run silently trained with."""
    run, saved = _saved_run(tmp_path)
    (run / "config.yaml").write_text(dump_config(saved).replace("img_size: 96", "img_size: 128"))
    with pytest.raises(ConfigConflict) as exc:
        resolve_config(None, run_dir=run, resume=True)
    message = str(exc.value)
    assert "data.img_size: saved 96, asked 128" in message and str(run / "last.pt") in message
    assert f"--init-from {run}" in message and "config.yaml" in message


def test_resume_applies_what_a_run_may_change_and_refuses_the_rest(tmp_path):
    run, saved = _saved_run(tmp_path)
    resolved = resolve_config(None, run_dir=run, resume=True, epochs=4,
                              sets=["data.num_workers=3", "train.device=cpu", "train.threads=2"]).config
    assert (resolved.train.epochs, resolved.data.num_workers, resolved.train.device, resolved.train.threads) == (4, 3, "cpu", 2)
    assert resolved.model_copy(update={"train": saved.train, "data": saved.data}) == saved  # nothing else moved
    for asked, key in (({"batch_size": 16}, "train.batch_size"), ({"sets": ["train.warmup_epochs=0"]}, "train.warmup_epochs"),
                       ({"sets": ["decision.tiling={grid: 2}"]}, "decision.tiling")):
        with pytest.raises(ConfigConflict, match=re.escape(key)):
            resolve_config(None, run_dir=run, resume=True, **asked)
    # a config file's epochs do not extend the run (--epochs does), and the user is told
    (run / "config.yaml").write_text(dump_config(saved).replace("epochs: 2", "epochs: 9"))
    kept = resolve_config(None, run_dir=run, resume=True)
    assert kept.config.train.epochs == 2 and "--epochs 9" in kept.notes[0]


# --- train(): the config and the data it resumes with ------------------------------------------------------------

from training.loop.data import DataError  # noqa: E402
from training.train import train  # noqa: E402


def _config(**train):
    return tiny_config(**{"early_stopping_patience": None, **train})


@pytest.fixture(scope="module")
def one_epoch_run(synth_root, tmp_path_factory):
    run = tmp_path_factory.mktemp("resume") / "run"
    train([str(synth_root)], run, _config(epochs=1))
    return run


def _copy(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def _history(run) -> list[dict]:
    with (run / "history.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_train_refuses_to_resume_with_another_config(one_epoch_run, synth_root, tmp_path):
    run = _copy(one_epoch_run, tmp_path)
    with pytest.raises(ConfigConflict, match=re.escape("data.img_size: saved 64, asked 96")):
        train([str(synth_root)], run, tiny_config(img_size=96, epochs=2, early_stopping_patience=None), resume=True)
    assert load_checkpoint(run / "last.pt")["epoch"] == 1


def test_resume_on_other_data_is_refused_and_last_pt_keeps_the_runs(one_epoch_run, synth_root, tmp_path):
    """Before, another --data was taken silently and last.pt recorded only the new roots and fingerprint."""
    run = _copy(one_epoch_run, tmp_path)
    before = load_checkpoint(run / "last.pt")
    other = tmp_path / "other"
    shutil.copytree(synth_root, other)
    sorted((other / "train" / "ivory").glob("*.jpg"))[0].unlink()
    with pytest.raises(DataError) as exc:
        train([str(other)], run, _config(epochs=2), resume=True)
    assert "trained on other data" in str(exc.value) and f"--init-from {run}" in str(exc.value)
    after = load_checkpoint(run / "last.pt")
    assert after["epoch"] == 1 and after["data_roots"] == before["data_roots"] == [str(synth_root.resolve())]
    assert after["training_data"] == before["training_data"] and len(_history(run)) == 1


def test_an_extension_trains_on_the_longer_schedule_and_moved_data_is_the_same_data(one_epoch_run, synth_root,
                                                                                     tmp_path, monkeypatch, capsys):
    """--resume --epochs 2 of a finished 1-epoch run trained its second epoch at the floor lr (lr x min_lr_ratio):
    the restored schedule was the 1-epoch run's. It now takes the lrs a run planned with 2 epochs takes."""
    import training.train as train_module
    from training.loop.optim import build_optimization, peak_lr

    run = _copy(one_epoch_run, tmp_path)
    moved = tmp_path / "moved"
    shutil.copytree(synth_root, moved)
    used, real = [], train_module.build_optimization

    def recording(*args, **kwargs):
        opt = real(*args, **kwargs)
        opt.optimizer.register_step_pre_hook(lambda optimizer, a, k: used.append(peak_lr(optimizer)))
        return opt

    monkeypatch.setattr(train_module, "build_optimization", recording)
    train([str(moved)], run, _config(epochs=2), resume=True)
    steps = load_checkpoint(one_epoch_run / "last.pt")["step"]
    # the schedule of a run planned with 2 epochs, on a one-layer net (its lr is the head's: what peak_lr reads)
    planned = build_optimization(torch.nn.Linear(2, 2), _config(epochs=2, layer_decay=None).train, steps, 1,
                                 torch.device("cpu"), 4)
    expected = []
    for step in range(steps, 2 * steps):
        planned.scheduler.step_update(step)
        expected.append(peak_lr(planned.optimizer))
    floor = 2e-3 * 0.01  # tiny_config's lr x min_lr_ratio
    assert used == pytest.approx(expected, rel=1e-6) and min(used) > 5 * floor
    assert [r["epoch"] for r in _history(run)] == ["1", "2"]
    saved = load_checkpoint(run / "last.pt")
    assert f"the run's data moved from {[str(synth_root.resolve())]}" in capsys.readouterr().out
    assert saved["data_roots"] == [str(moved.resolve())]  # the same files, where they are now
    assert saved["training_data"] == load_checkpoint(one_epoch_run / "last.pt")["training_data"]
