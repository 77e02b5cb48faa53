"""benchmarks/ensemble_check.py: the screen shows each photo as `wildcheck robustness` does."""

import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from ensemble_check import condition_images  # noqa: E402

from training.conditions import condition_rng, default_conditions  # noqa: E402
from training.data.sources import Sample  # noqa: E402
from training.robustness import image_key  # noqa: E402


def _kept(n: int) -> list:
    rng = np.random.default_rng(3)
    return [(Sample(Path(f"/data/met/val/ivory/photo{i}.jpg"), "ivory", "val"),
             Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8))) for i in range(n)]


def test_a_photo_under_phone_noise_is_the_same_whatever_is_screened_with_it():
    """The screen drew every photo's noise from one generator, so a photo's image depended on the photos before
    it (and differed from the robustness report's); now each photo has the report's own generator."""
    kept = _kept(4)
    forward = condition_images("phone", kept)
    backward = condition_images("phone", kept[::-1])[::-1]
    alone = condition_images("phone", kept[2:3])
    for a, b in zip(forward, backward):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert np.array_equal(np.asarray(forward[2]), np.asarray(alone[0]))
    sample, img = kept[1]
    report = default_conditions()["phone"].apply(img, condition_rng(0, "phone", image_key(sample)), [])
    assert np.array_equal(np.asarray(forward[1]), np.asarray(report))
    assert not np.array_equal(np.asarray(forward[1]), np.asarray(img))  # the condition did change the photo


def test_clean_is_the_photos_themselves():
    kept = _kept(2)
    assert condition_images("clean", kept) == [img for _, img in kept]


def test_a_run_of_another_input_size_is_refused_by_a_cache(tmp_path):
    """The screen preprocessed every photo once, by the first run's spec: 1.4.0's 320 px members were screened
    on 256 px arrays next to 256 px runs. Now the cache records its preprocessing and refuses other runs."""
    import pytest
    from ensemble_check import check_runs, preprocessing_of

    from serving.preprocess import Preprocessing

    shipped = REPO / "models" / "wildcheck-ivory.onnx"
    np.savez(tmp_path / "meta.npz", preprocessing=np.array(Preprocessing(input_size=256).model_dump_json()))
    with pytest.raises(SystemExit, match="wildcheck-ivory.onnx preprocess photos unlike"):
        check_runs([shipped], tmp_path)
    np.savez(tmp_path / "meta.npz", preprocessing=np.array(preprocessing_of(shipped)))
    check_runs([shipped], tmp_path)  # the same preprocessing passes


def test_a_run_that_validates_on_other_photos_is_refused_by_a_cache(tmp_path, trained_run, synth_root, onnx_model):
    """Session 13's first screen named a run recovered without its negatives pools first: the budget was Met
    val's alone and every other run was scored on those photos only. The cache now records its validation
    photos and refuses a run dir whose recorded data differ."""
    import shutil

    import pytest
    from ensemble_check import check_runs, preprocessing_of, validation_of

    from training.checkpoint import Checkpoint

    with_pool = tmp_path / "with_pool"
    with_pool.mkdir()
    ckpt = Checkpoint.load(trained_run / "best.pt")
    ckpt.config.data.negatives = [str(synth_root)]  # a negatives pool the plain run does not record
    ckpt.save(with_pool / "best.pt")
    shutil.copy(trained_run / "labels.json", with_pool / "labels.json")
    assert validation_of(with_pool) != validation_of(trained_run)
    np.savez(tmp_path / "meta.npz", preprocessing=np.array(preprocessing_of(trained_run)),
             validation=np.array(validation_of(trained_run)))
    with pytest.raises(SystemExit, match="with_pool validate on other photos"):
        check_runs([trained_run, with_pool], tmp_path)
    check_runs([trained_run], tmp_path)  # the cache's own run passes
    assert validation_of(onnx_model) is None  # an ONNX file records no data: it is scored on the cache's photos


def test_a_model_replaced_under_the_same_name_is_scored_again(tmp_path, trained_run):
    """The cache named a run by its folder (or file) name only: models/wildcheck-ivory.onnx cached as 1.4.0 in
    session 16 would have been read back as 1.5.0's logits after the release. Entries now carry the model
    file's sha256, and a replaced file is scored again."""
    import shutil

    from ensemble_check import cache_logits

    from training.checkpoint import Checkpoint

    run, cache = tmp_path / "member", tmp_path / "cache"
    shutil.copytree(trained_run, run)
    cache.mkdir()
    cache_logits([run], ["clean"], cache)
    before = np.load(cache / "member.npz")["clean"]
    cache_logits([run], ["clean"], cache)  # unchanged: read from the cache
    assert np.array_equal(np.load(cache / "member.npz")["clean"], before)
    ckpt = Checkpoint.load(run / "best.pt")
    shifted = [name for name, tensor in ckpt.weights.items()  # another training: the classifier's bias moved
               if name.endswith("bias") and tensor.shape == (len(ckpt.spec.labels),)]
    assert len(shifted) == 1
    ckpt.weights[shifted[0]][0] += 3.0
    ckpt.save(run / "best.pt")
    cache_logits([run], ["clean"], cache)
    after = np.load(cache / "member.npz")["clean"]
    assert after.shape == before.shape
    assert np.allclose(after[:, 0], before[:, 0] + 3.0, atol=1e-2) and np.allclose(after[:, 1:], before[:, 1:], atol=1e-2)


def test_condition_misses_lists_the_photos_caught_as_is_and_missed_under_the_condition(tmp_path, trained_run):
    """benchmarks/condition_misses.py: from a screen's cache, exactly the protected photos above the 1% budget
    as is and at or under it with the condition, with a contact sheet of them as the model saw them."""
    import csv
    import shutil
    import subprocess

    from ensemble_check import budget_threshold, cache_logits, class_margin

    run, cache = tmp_path / "member", tmp_path / "cache"
    shutil.copytree(trained_run, run)
    cache.mkdir()
    cache_logits([run], ["clean", "crop"], cache)
    meta, cached = np.load(cache / "meta.npz"), dict(np.load(cache / "member.npz"))
    c = list(meta["labels"]).index("ivory")
    positive = meta["y"] == c
    clean = class_margin(cached["clean"], c)
    threshold = budget_threshold(clean[~positive], 0.01)
    caught = np.flatnonzero(positive & (clean > threshold))
    assert len(caught) >= 2
    crop = cached["clean"].copy()  # the condition changes nothing but one caught photo, pushed under the threshold
    crop[caught[1], c] -= 100.0
    cached["clean"][caught[0], c] -= 100.0  # and one photo missed as is too: not the condition's miss
    crop[caught[0], c] -= 100.0
    np.savez(cache / "member.npz", **{**cached, "crop": crop})
    out = tmp_path / "misses"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "condition_misses.py"), "--cache", str(cache),
                           "--runs", str(run), "--conditions", "crop", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = list(csv.DictReader(open(out / "misses.csv")))
    assert [r["condition"] for r in rows] == ["crop"]
    from training.checkpoint import Checkpoint
    from training.predict import run_samples

    val, _ = run_samples(Checkpoint.load(run / "best.pt"), None)  # the cache's order (every synthetic photo decodes)
    assert Path(rows[0]["path"]) == Path(val[caught[1]].path)
    assert float(rows[0]["under_condition"]) <= float(rows[0]["threshold"]) < float(rows[0]["clean"])
    assert Image.open(out / "missed_crop.png").size == (8 * 160, 160)  # one row of the contact sheet


def test_a_budget_over_all_negatives_charges_false_flags_on_degraded_photos():
    """Clean negatives score low, blurred ones high: held over the clean ones only, the threshold lets 40% of the
    blurred negatives through; held over all, no condition's negatives pass more than the budget allows in total."""
    from ensemble_check import recall_at_budget

    rng = np.random.default_rng(0)
    positive = np.r_[np.ones(100, bool), np.zeros(400, bool)]
    clean = np.r_[rng.uniform(2, 4, 100), rng.uniform(-4, 0, 400)]
    blurred = np.r_[rng.uniform(0.5, 3, 100), rng.uniform(-4, 0, 240), rng.uniform(1, 3, 160)]
    score = {"clean": clean, "phone": blurred}
    recall, flagged, recall_blur, flagged_blur = recall_at_budget(score, positive, ["clean", "phone"])
    assert flagged <= 0.01 and flagged_blur == pytest.approx(0.4, abs=0.02) and recall == 1.0
    over = recall_at_budget(score, positive, ["clean", "phone"], over_all=True, budget=0.01)
    assert (over[1] + over[3]) / 2 <= 0.01  # the budget holds over the 800 negatives together
    assert over[3] <= 0.02 and over[2] < recall_blur  # recall under blur paid for with its false flags
