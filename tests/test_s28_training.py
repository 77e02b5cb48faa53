"""Session 28, tester B's training-side report: torchrun/DDP, config, data fingerprint, checkpoints.

Each test names the report's item it covers. The torchrun run (items 3, 5, 8, 11, 13) is one small run of three
CPU processes on gloo, shared by the tests that read it, with a timeout so that a regression fails, not hangs.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from serving.errors import InvalidInput, WildcheckError
from training.config import load_config, resolve_config
from training.distributed import DistInfo, ShardedSampler

REPO = Path(__file__).resolve().parents[1]


def _photo(path: Path, seed: int, size: int = 48) -> Path:
    from tests.conftest import photo

    path.parent.mkdir(parents=True, exist_ok=True)
    photo(seed, (size, size)).save(path, "JPEG", quality=90)
    return path


def _tiny_root(root: Path, train: dict[str, int], val: dict[str, int]) -> Path:
    seed = 0
    for split, counts in (("train", train), ("val", val)):
        for label, n in counts.items():
            (root / split / label).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                seed += 1
                _photo(root / split / label / f"{label}_{i}.jpg", seed)
    return root


def _config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


FAST = {"train": {"epochs": 1, "batch_size": 4, "threads": 1},
        "data": {"img_size": 32, "min_side": 8, "num_workers": 0, "cache_workers": 1},
        "decision": {"calibrate": False}}


# --- 1. every rank's shard has the length the sampler states (a shorter one hung DDP) --------------------------

@pytest.mark.parametrize("n", [1, 2, 3, 5])
@pytest.mark.parametrize("world", [2, 3, 5, 8])
def test_1_every_rank_takes_the_stated_number_of_items(n, world):
    shards = [list(ShardedSampler(range(n), DistInfo(rank=r, world=world))) for r in range(world)]
    stated = len(ShardedSampler(range(n), DistInfo(rank=0, world=world)))
    assert [len(s) for s in shards] == [stated] * world and stated >= 1
    assert set().union(*shards) == set(range(n))  # together the ranks still see every item


def test_8_training_shards_hold_at_least_two_items_per_rank():
    """5 ranks on 2 images: a rank with one image trained on a batch of one, which BatchNorm refuses at 32 px."""
    for r in range(5):
        shard = list(ShardedSampler(range(2), DistInfo(rank=r, world=5), min_per_rank=2))
        assert len(shard) == 2


# --- 3. gathering predictions when a rank's validation shard is empty ------------------------------------------

def test_3_gather_predictions_takes_the_class_count_from_the_ranks_that_predicted(monkeypatch):
    from training import distributed

    parts = [(np.array([0]), np.full((1, 4), 0.25, np.float32)), (np.array([], dtype=np.int64), np.zeros((0, 0), np.float32))]

    def all_gather_object(out, obj):
        out[:] = parts

    monkeypatch.setattr(distributed.dist, "all_gather_object", all_gather_object)
    for rank in (0, 1):
        idx, probs = parts[rank]
        out = distributed.gather_predictions(DistInfo(rank=rank, world=2), idx, probs, 1)
        assert out.shape == (1, 4) and np.allclose(out, 0.25)


# --- 2. image size and crop bounds ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, named", [
    ({"img_size": 100000}, "--img-size 100000"),
    ({"sets": ["data.img_size=999999999999"]}, "--set data.img_size=999999999999"),
    ({"sets": ["data.crop_pct=0.0001"]}, "--set data.crop_pct=0.0001"),
    ({"sets": ["data.crop_pct=0.3"]}, "--set data.crop_pct=0.3"),
])
def test_2_huge_images_or_tiny_crops_are_refused_naming_the_setting(kwargs, named):
    with pytest.raises(InvalidInput) as err:
        resolve_config(None, **kwargs)
    assert str(err.value).startswith(named + ":") and "\n" not in str(err.value)


def test_2_the_sizes_the_project_uses_still_validate():
    for size in (32, 224, 256, 320, 1024):
        assert resolve_config(None, img_size=size).config.data.img_size == size
    assert resolve_config(None, sets=["data.crop_pct=0.5"]).config.data.crop_pct == 0.5
    assert resolve_config(REPO / "configs" / "met_ivory.yaml").config.data.img_size == 256


# --- 4. a section that is not a mapping --------------------------------------------------------------------------

@pytest.mark.parametrize("text, section", [
    ("train: [1, 2]\n", "train"),
    ('data: "img_size: 64"\n', "data"),
    ("model: [1, 2]\n", "model"),
])
def test_4_a_section_that_is_not_a_mapping_is_refused_by_name(tmp_path, text, section):
    cfg = _config(tmp_path, text)
    for call in (lambda: resolve_config(cfg, epochs=1, img_size=32, batch_size=4),
                 lambda: load_config(cfg, {"train": {"epochs": 1}, "data": {"img_size": 64}})):
        with pytest.raises(InvalidInput, match=rf"{section} should be a mapping"):
            call()


def test_4_a_set_inside_a_section_that_is_not_a_mapping_is_refused(tmp_path):
    cfg = _config(tmp_path, "train:\n  mixup: 5\n")
    with pytest.raises(InvalidInput, match=r"train\.mixup should be a mapping.*--set train\.mixup\.prob=0"):
        resolve_config(cfg, sets=["train.mixup.prob=0"])
    assert resolve_config(_config(tmp_path, "train:\n")).config.train.epochs == 8  # an empty section: defaults


# --- 5. the world size is part of what a resume must keep --------------------------------------------------------

def test_5_a_resume_with_another_number_of_processes_is_refused():
    from training.config import Config, ConfigConflict
    from training.train import check_same_world

    config = Config()
    with pytest.raises(ConfigConflict, match=r"2 process\(es\).*--nproc_per_node=2.*--init-from"):
        check_same_world({"world": 2}, 1, config, Path("RUN/last.pt"))
    with pytest.raises(ConfigConflict, match="without torchrun"):
        check_same_world({"world": 1}, 4, config, Path("RUN/last.pt"))
    check_same_world({"world": 2}, 2, config, Path("RUN/last.pt"))
    check_same_world({}, 3, config, Path("RUN/last.pt"))  # a last.pt from before the count was kept


# --- 6, 7. pretrained weights: no internet, or a file that is no state dict ------------------------------------

def _hub_reachable() -> bool:
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=3):
            return True
    except OSError:
        return False


def test_6_hub_weights_without_internet_are_a_clear_error_at_once():
    if _hub_reachable() or any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy",
                                                          "HTTP_PROXY", "http_proxy")):
        pytest.skip("the hub is reachable here")
    from training.models import create_model

    started = time.monotonic()
    with pytest.raises(InvalidInput) as err:
        create_model("resnet18", 2, "hub")
    assert time.monotonic() - started < 20  # no ~45 s of retries
    assert "internet" in str(err.value) and "offline" in str(err.value) and "model.pretrained" in str(err.value)


def test_7_a_pretrained_file_that_is_no_state_dict_names_the_setting_safely(tmp_path):
    from training.models import create_model

    garbage = tmp_path / "garbage_weights.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(InvalidInput) as err:
        create_model("tf_efficientnet_lite0", 2, str(garbage))
    assert "model.pretrained" in str(err.value) and "weights_only" not in str(err.value)
    listed = tmp_path / "list.pt"
    torch.save([1, 2, 3], listed)
    with pytest.raises(InvalidInput, match="model.pretrained"):
        create_model("tf_efficientnet_lite0", 2, str(listed))


# --- 8. a batch of one image ---------------------------------------------------------------------------------------

def test_8_a_batch_size_of_one_is_refused_before_any_work(tmp_path):
    with pytest.raises(InvalidInput, match=r"^--batch-size 1: must be at least 2"):
        resolve_config(None, batch_size=1)
    with pytest.raises(InvalidInput, match=r"^--set train.batch_size=1: must be at least 2"):
        resolve_config(None, sets=["train.batch_size=1"])
    from training.train import train

    config = load_config(None, {**FAST, "train": {**FAST["train"], "batch_size": 1}})
    with pytest.raises(InvalidInput, match="train.batch_size 1: must be at least 2"):
        train([str(tmp_path / "nodata")], tmp_path / "run", config)
    assert not (tmp_path / "run").exists()


# --- 9. a config that is not UTF-8 -------------------------------------------------------------------------------

def test_9_a_config_that_is_not_utf8_is_a_clear_error(tmp_path):
    cfg = tmp_path / "binary.yaml"
    cfg.write_bytes(b"\xff\xfe bad")
    with pytest.raises(InvalidInput, match="not a UTF-8"):
        resolve_config(cfg)


# --- 10. the data fingerprint sees a file replaced by another of the same size -----------------------------------

def test_10_the_fingerprint_hashes_contents_and_resume_refuses_a_replaced_file(tmp_path):
    from training.data.sources import fingerprint, load_samples
    from training.loop.data import DataError
    from training.train import check_same_data

    root = _tiny_root(tmp_path / "data", {"ivory": 2, "other": 2}, {"ivory": 1, "other": 1})
    samples = load_samples([root])
    before = fingerprint(samples)
    target = root / "train" / "ivory" / "ivory_0.jpg"
    other = _photo(tmp_path / "x.jpg", 99)
    data = other.read_bytes()
    size = target.stat().st_size
    target.write_bytes(data[:size] + b"\0" * (size - len(data)))  # another picture, the same byte size
    assert target.stat().st_size == size
    after = fingerprint(samples)
    assert after["sha256"] != before["sha256"] and after["counts"] == before["counts"]
    last = tmp_path / "run" / "last.pt"
    meta = {"training_data": after, "data_roots": [str(root)]}
    with pytest.raises(DataError, match="other data"):
        check_same_data({"training_data": before, "data_roots": [str(root)]}, meta, last, samples=samples)
    # the same files moved elsewhere are the same data
    moved = tmp_path / "moved"
    shutil.copytree(root, moved)
    assert fingerprint(load_samples([moved]))["sha256"] == after["sha256"]


def test_10_a_last_pt_from_before_content_hashes_still_resumes_on_its_data(tmp_path):
    from training.data.sources import fingerprint, load_samples
    from training.train import check_same_data

    root = _tiny_root(tmp_path / "data", {"ivory": 1, "other": 1}, {"ivory": 1})
    samples = load_samples([root])
    legacy = fingerprint(samples, content=False)
    assert "method" not in legacy and fingerprint(samples)["method"] == "content"
    meta = {"training_data": fingerprint(samples), "data_roots": [str(root)]}
    check_same_data({"training_data": legacy, "data_roots": [str(root)]}, meta, tmp_path / "last.pt", samples=samples)


# --- 12. model and augmentation mistakes are found before the images are cached ---------------------------------

@pytest.mark.parametrize("sets, match", [
    ({"model": {"name": "nope_net"}}, "no timm architecture"),
    ({"model": {"name": "resnet18"}}, "no offline weights"),
    ({"model": {"freeze": ["nope"]}}, "model.freeze"),
    ({"model": {"pretrained": "/nonexistent/weights.pt"}}, "not found"),
    ({"augment": {"train": [{"name": "NopeAug"}]}}, "NopeAug"),
])
def test_12_model_and_augmentation_errors_come_before_caching(tmp_path, monkeypatch, sets, match):
    import training.loop.data as loop_data
    from training.train import train

    root = _tiny_root(tmp_path / "data", {"ivory": 1, "other": 1}, {"ivory": 1, "other": 1})

    def no_caching(*args, **kwargs):
        raise AssertionError("images were cached before the configuration was checked")

    monkeypatch.setattr(loop_data, "cache_images", no_caching)
    config = load_config(None, {**FAST, **sets})
    with pytest.raises(WildcheckError, match=match):
        train([str(root)], tmp_path / "run", config)


# --- 13. under torchrun, only rank 0 reports -------------------------------------------------------------------

def test_13_quiet_caching_shows_no_bar_and_no_warning_per_file(tmp_path, caplog, capsys):
    from serving.preprocess import Preprocessing
    from training.data.cache import cache_images
    from training.data.sources import Sample

    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    good = _photo(tmp_path / "good.jpg", 1)
    samples = [Sample(good, "a", "train"), Sample(bad, "a", "train")]
    with caplog.at_level(logging.WARNING):
        pixels, kept, skipped = cache_images(samples, Preprocessing(input_size=32), 8, 1, desc="caching test",
                                             quiet=True)
    assert len(kept) == 1 and len(skipped) == 1
    assert "skipping" not in caplog.text and "caching test" not in capsys.readouterr().err


# --- 14. messages -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, named", [
    ({"epochs": 0}, "--epochs 0"), ({"batch_size": 0}, "--batch-size 0"), ({"batch_size": -3}, "--batch-size -3"),
    ({"img_size": 8}, "--img-size 8"),
])
def test_14_flag_errors_are_one_line_naming_the_flag(kwargs, named):
    with pytest.raises(InvalidInput) as err:
        resolve_config(None, **kwargs)
    assert str(err.value).startswith(named + ":") and "pydantic" not in str(err.value) and "\n" not in str(err.value)


def test_14_a_set_wins_over_the_flag_it_overrides():
    with pytest.raises(InvalidInput, match=r"^--set train.epochs=0:"):
        resolve_config(None, epochs=3, sets=["train.epochs=0"])


@pytest.mark.parametrize("item", ["data.mean=[0.5,0.5]", "data.std=[1,1,1,1]"])
def test_14_mean_and_std_need_three_values(item):
    with pytest.raises(InvalidInput, match="needs 3 values"):
        resolve_config(None, sets=[item])


def test_14_an_unreadable_last_pt_on_resume_says_to_start_without_resume(tmp_path):
    from training.loop.rundir import RunDir

    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"\x00" * 100)
    for call in (lambda: RunDir(run).resume_state(), lambda: resolve_config(None, run_dir=run, resume=True)):
        with pytest.raises(InvalidInput) as err:
            call()
        assert "without --resume" in str(err.value) and "--init-from" in str(err.value)
        assert "pass a run dir" not in str(err.value)


def test_14_an_empty_training_folder_of_a_validated_label_is_refused(tmp_path):
    from training.loop.data import DataError, TrainData, resolve_preprocessing

    root = _tiny_root(tmp_path / "data", {"other": 2, "tiger": 2}, {"ivory": 2, "other": 1, "tiger": 1})
    (root / "train" / "ivory").mkdir()
    config = load_config(None, FAST)
    with pytest.raises(DataError, match=r"train/ivory.*val has 2 image"):
        TrainData.build([str(root)], config, resolve_preprocessing(config), say=lambda *a: None)
    (root / "train" / "ivory").rmdir()  # no folder at all: validation's extra label is only noted, as before
    notes = []
    data = TrainData.build([str(root)], config, resolve_preprocessing(config), say=notes.append)
    assert data.labels == ["other", "tiger"] and "left out of validation" in notes[0]


def test_14_a_folder_where_best_pt_goes_is_refused_before_any_work(tmp_path):
    from training.loop.rundir import RunDir

    run = tmp_path / "run"
    (run / "best.pt").mkdir(parents=True)
    with pytest.raises(InvalidInput, match=r"best\.pt"):
        RunDir(run).prepare()


# --- torchrun: 3 processes, 2 training images, 2 validation images, one unreadable file -------------------------

@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """Before: every rank trained on a batch of one image (BatchNorm: ValueError at 32 px); rank 2's empty
    validation shard broke gather_predictions; every rank warned about the unreadable file."""
    base = tmp_path_factory.mktemp("ddp")
    root = _tiny_root(base / "data", {"ivory": 1, "other": 1}, {"ivory": 1, "other": 1})
    (root / "train" / "ivory" / "broken.jpg").write_text("not an image")
    cfg = base / "cfg.yaml"
    cfg.write_text("data: {img_size: 32, min_side: 8, num_workers: 0, cache_workers: 1}\n"
                   "train: {epochs: 1, batch_size: 4, threads: 1, early_stopping_patience: null}\n"
                   "decision: {calibrate: false}\n")
    out, logs = base / "run", base / "logs"
    torchrun = str(Path(sys.executable).parent / "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        proc = subprocess.run(
            [torchrun, "--standalone", "--nproc_per_node=3", "--redirects=3", f"--log-dir={logs}",
             "-m", "tests.ddp_train", str(root), str(out), str(cfg)],
            capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    except subprocess.TimeoutExpired as exc:  # a hang is a failure, not a stuck suite
        pytest.fail(f"torchrun did not finish in 300 s: {exc}")
    rank_logs = {int(p.parent.name): p.read_text(errors="replace") for p in logs.rglob("stderr.log")}
    rank_out = {int(p.parent.name): p.read_text(errors="replace") for p in logs.rglob("stdout.log")}
    return proc, root, cfg, out, rank_logs, rank_out


@pytest.mark.slow
def test_3_8_torchrun_with_fewer_images_than_ranks_trains_and_validates(ddp_run):
    proc, root, cfg, out, rank_logs, rank_out = ddp_run
    detail = proc.stdout[-2000:] + proc.stderr[-2000:] + "".join(v[-1500:] for v in rank_logs.values())
    assert proc.returncode == 0, detail
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "last.pt"]
    seen = [np.load(out / "seen" / f"rank{r}_epoch1.npy") for r in range(3)]
    assert [len(s) for s in seen] == [2, 2, 2]  # each rank one batch of two: never one image


@pytest.mark.slow
def test_13_torchrun_warns_and_shows_progress_on_rank_0_only(ddp_run):
    proc, root, cfg, out, rank_logs, rank_out = ddp_run
    assert proc.returncode == 0
    assert sorted(rank_logs) == [0, 1, 2], rank_logs
    assert "skipping" in rank_logs[0] and "broken.jpg" in rank_logs[0]
    for rank in (1, 2):
        text = rank_logs[rank] + rank_out[rank]
        assert "skipping" not in text and "caching" not in text and "val:" not in text, text[-2000:]


@pytest.mark.slow
def test_11_torchrun_validation_scores_the_model_rank_0_saves(ddp_run):
    """Each rank validated its shard with its own BatchNorm statistics: the recorded val loss was not best.pt's."""
    from training.checkpoint import Checkpoint
    from training.data.cache import CachedImageDataset, cache_images
    from training.data.sources import load_samples, select_split
    from training.augment import EvalTransform
    from training.loop.steps import predict_dataset
    from training.metrics import compute_metrics
    from training.models import create_model

    proc, root, cfg, out, rank_logs, rank_out = ddp_run
    assert proc.returncode == 0
    best = Checkpoint.load(out / "best.pt")
    module = create_model(best.spec.architecture, len(best.spec.labels), "none")
    module.load_state_dict(best.weights)
    pre = best.spec.preprocessing
    val = select_split(load_samples([root]), "val")
    pixels, kept, _ = cache_images(val, pre, 8, 1)
    targets = [best.spec.labels.index(s.label) for s in kept]
    probs = predict_dataset(module, CachedImageDataset(pixels, targets, EvalTransform(pre)), 4, torch.device("cpu"),
                            channels_last=False, progress=False)
    nll = compute_metrics(np.asarray(targets), probs, best.spec.labels)["nll"]
    with (out / "history.csv").open() as fh:
        recorded = float(next(csv.DictReader(fh))["val_loss"])
    assert abs(recorded - nll) < 2e-5, (recorded, nll)  # history rounds to 5 decimals; before: ~1e-4 off


@pytest.mark.slow
def test_5_torchrun_run_records_its_world_and_a_one_process_resume_is_refused(ddp_run, tmp_path):
    from training.config import ConfigConflict
    from training.fileio import load_checkpoint
    from training.train import train

    proc, root, cfg, out, rank_logs, rank_out = ddp_run
    assert proc.returncode == 0
    assert load_checkpoint(out / "last.pt")["world"] == 3
    run = tmp_path / "run"
    shutil.copytree(out, run)
    config = load_config(cfg, {"train": {"epochs": 2}})
    with pytest.raises(ConfigConflict, match=r"3 process\(es\).*this one has 1"):
        train([str(root)], run, config, resume=True)
