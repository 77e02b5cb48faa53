"""s29 helper D: data check, evaluation and warm-start edges (each test failed on the code before its fix)."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import jpeg_bytes, photo, tiny_config


def _latin1_name(folder: Path, name: bytes) -> Path:
    """A path whose file name is not UTF-8 (a Latin-1 name from a Windows archive), as os.listdir returns it."""
    return Path(os.fsdecode(os.fsencode(str(folder)) + b"/" + name))


def _tiny_tree(root: Path, layout: dict[str, dict[str, int]], seed: int = 0) -> Path:
    """root/<split>/<label>/<i>.jpg with distinct small photos."""
    for split, labels in layout.items():
        for label, n in labels.items():
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                seed += 1
                (folder / f"{i}.jpg").write_bytes(jpeg_bytes(photo(seed, (64, 48))))
    return root


def test_data_check_report_names_a_file_whose_name_is_not_utf8_on_a_utf8_terminal(tmp_path):
    """Before, format_report returned the file name with os.fsdecode's surrogates: a UTF-8 terminal (LANG=en_US.UTF-8)
    failed the print with UnicodeEncodeError after all the checking, and the exit code was 1 for a traceback."""
    from training.data.check import check_dataset, format_report

    root = _tiny_tree(tmp_path / "d", {"train": {"ivory": 2, "other": 2}, "val": {"ivory": 1, "other": 1}})
    _latin1_name(root / "train" / "other", b"caf\xe9.jpg").write_bytes(b"not an image")
    report = check_dataset([root])
    assert [e["code"] for e in report["errors"]] == ["not_an_image"]
    text = format_report(report)
    assert "caf\\xe9.jpg: [not_an_image]" in text.encode("utf-8").decode("utf-8")  # strict: no surrogate left


def test_evaluate_predictions_csv_keeps_a_row_for_a_file_whose_name_is_not_utf8(tmp_path):
    """Before, write_predictions raised UnicodeEncodeError on such a name: `wildcheck evaluate --out` ended in a
    traceback after metrics.json and the plots, and predictions.csv was never written."""
    from training.data.sources import Sample
    from training.evaluate import write_predictions

    odd = _latin1_name(tmp_path, b"caf\xe9.jpg")
    samples = [Sample(tmp_path / "a.jpg", "ivory", "val"), Sample(odd, "other", "val")]
    out = tmp_path / "predictions.csv"
    write_predictions(out, samples, np.array([[0.9, 0.1], [0.2, 0.8]]), ["ivory", "other"])
    raw = out.read_bytes()
    assert b"caf\xe9.jpg,other,other," in raw  # the row names the file by its own bytes
    with out.open(newline="", encoding="utf-8", errors="surrogateescape") as fh:
        rows = list(csv.DictReader(fh))
    assert Path(rows[1]["path"]) == odd and rows[0]["pred"] == "ivory"


def test_data_check_warns_of_labels_the_splits_do_not_share(tmp_path):
    """Before, `tiger` with val images and no training image, and `pangolin` with no val image, passed data check
    without a word: training then drops tiger's val images and never measures pangolin."""
    from training.data.check import check_dataset

    root = _tiny_tree(tmp_path / "d", {"train": {"ivory": 2, "other": 2, "pangolin": 1},
                                       "val": {"ivory": 1, "other": 1, "tiger": 2}, "test": {"ivory": 1}})
    report = check_dataset([root])
    found = {w["code"]: w["message"] for w in report["warnings"] if "code" in w}
    assert "['tiger'] have 2 val image(s) and no training image" in found["label_not_in_train"]
    assert "['pangolin'] have training images and no val image" in found["label_not_in_val"]
    # a test-only root (no train split) is an evaluation set: nothing to say
    test_only = _tiny_tree(tmp_path / "t", {"test": {"ivory": 1, "tiger": 1}}, seed=50)
    assert not [w for w in check_dataset([test_only])["warnings"] if w.get("code", "").startswith("label_not")]


def test_near_duplicates_of_exact_copies_are_one_pair_not_every_copy_with_every_copy(tmp_path):
    """Before, each of 20 copies of a photo in train was paired with each of 20 copies of its re-encoded version in
    val: 400 near-duplicate pairs and warnings (the pairs grow with the square of the copies: 4,000 copies of one
    placeholder took 8 million pairs and 830 MiB in near_pairs alone). Now one pair, its splits the copies' union."""
    from training.data.check import check_dataset

    root = _tiny_tree(tmp_path / "d", {"train": {"ivory": 1, "other": 1}, "val": {"ivory": 1, "other": 1}}, seed=10)
    base = photo(99, (160, 120))
    big, small = jpeg_bytes(base), jpeg_bytes(base.resize((120, 90)))
    for i in range(20):
        (root / "train" / "other" / f"placeholder_{i}.jpg").write_bytes(big)
        (root / "val" / "other" / f"placeholder_small_{i}.jpg").write_bytes(small)
    report = check_dataset([root])
    pairs = [e for e in report["near_duplicates"] if "placeholder" in e["paths"][0]]
    assert len(pairs) == 1
    assert pairs[0]["cross_split"] and pairs[0]["splits"] == ["train", "val"] and pairs[0]["copies"] == 38
    assert sum("near-duplicate" in w["message"] for w in report["warnings"]) == len(report["near_duplicates"])
    groups = {len(e["paths"]) for e in report["exact_duplicates"]}
    assert groups == {20} and report["summary"]["exact_duplicate_groups"] == 2  # the copies: still each listed


class _Stop(Exception):
    pass


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data, run): one epoch at 32 px on six photos, a real best.pt and last.pt in a few seconds."""
    from training.train import train

    base = tmp_path_factory.mktemp("tiny_run")
    data = _tiny_tree(base / "data", {"train": {"ivory": 2, "other": 2}, "val": {"ivory": 1, "other": 1}}, seed=200)
    train([str(data)], base / "run", tiny_config(img_size=32, epochs=1, batch_size=4))
    return data, base / "run"


def test_a_warm_start_from_its_own_out_is_refused_and_keeps_the_weights(tiny_run, tmp_path):
    """Before, `train --init-from runs/v1 --out runs/v1` loaded best.pt, then removed best.pt and last.pt as a fresh
    run does: a run stopped in its first epoch (Ctrl-C, a crash; here _Stop) had lost the weights it started from."""
    from training.loop.model import WarmStartError
    from training.train import train

    data, trained = tiny_run
    run = tmp_path / "v1"
    shutil.copytree(trained, run)
    before = (run / "best.pt").read_bytes()

    def stop(epoch, indices):
        raise _Stop

    for init in (run, run / "last.pt", tmp_path / "v1" / "." / "best.pt"):
        with pytest.raises((WarmStartError, _Stop)) as err:
            train([str(data)], run, tiny_config(img_size=32, epochs=1, batch_size=4), init_from=init, on_batch=stop)
        assert (run / "best.pt").is_file() and (run / "last.pt").is_file(), "the weights it started from are gone"
        assert (run / "best.pt").read_bytes() == before
        assert err.type is WarmStartError and "inside --out" in str(err.value)
    # a new --out still warm-starts from it
    new = train([str(data)], tmp_path / "v2", tiny_config(img_size=32, epochs=1, batch_size=4), init_from=run)
    assert new["epochs_run"] == 1 and (tmp_path / "v2" / "best.pt").is_file()


def test_a_warm_start_from_a_folder_that_is_no_run_is_refused_before_any_work(tiny_run, tmp_path):
    """Before, a folder without best.pt was reported as "no such run dir, checkpoint or ONNX file" (it exists)
    after the data was read and the run directory made; a run that only has last.pt got no hint."""
    from training.loop.model import WarmStartError
    from training.train import train

    data, _ = tiny_run
    out = tmp_path / "new"
    with pytest.raises(WarmStartError, match="no best.pt in that folder"):
        train([str(data)], out, tiny_config(img_size=32, epochs=1), init_from=data)
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "last.pt").write_bytes(b"x")
    with pytest.raises(WarmStartError, match="only last.pt"):
        train([str(data)], out, tiny_config(img_size=32, epochs=1), init_from=unfinished)
    assert not out.exists()


def test_a_near_distance_where_every_photo_matches_lists_a_bounded_number_of_pairs(tmp_path, monkeypatch):
    """Before, --near-distance 32 (where unrelated photos match) paired nearly every image with every other: on
    the 7,385 photos of two shared pools that is millions of pairs, gigabytes of memory and report. Now the list
    stops at MAX_NEAR_PAIRS, says so in a warning and in the summary, and near_pairs itself stops early."""
    from training.data import check
    from training.data.neardup import near_pairs

    assert len(near_pairs(["d72028d22880d7d7"] * 3000, 4, limit=10)) == 10  # stops early: not 4.5 million first
    monkeypatch.setattr(check, "MAX_NEAR_PAIRS", 5)
    root = _tiny_tree(tmp_path / "d", {"train": {"ivory": 3, "other": 3}, "val": {"ivory": 2, "other": 2}}, seed=30)
    report = check.check_dataset([root], near_distance=64)  # 64 bits: every pair of the 10 photos (45) matches
    assert len(report["near_duplicates"]) == 5 and report["summary"]["near_duplicates_truncated"] is True
    cut = [w for w in report["warnings"] if w.get("code") == "near_duplicates_truncated"]
    assert len(cut) == 1 and "lower --near-distance" in cut[0]["message"]
    assert "5 (the first; lower --near-distance) near-duplicate pairs" in check.format_report(report)
    assert check.check_dataset([root])["summary"]["near_duplicates_truncated"] is False


def test_a_root_given_twice_reports_its_unread_files_once(tmp_path):
    """Before, `data check d ./d/` read the images once but listed each file no command reads twice (and counted
    files_not_read double)."""
    from training.data.check import check_dataset

    root = _tiny_tree(tmp_path / "d", {"train": {"ivory": 1, "other": 1}, "val": {"ivory": 1, "other": 1}}, seed=70)
    (root / "train" / "ivory" / "x.jfif").write_bytes(jpeg_bytes(photo(80)))
    report = check_dataset([root, f"{root}/", root / "train" / ".."])
    assert report["n_images"] == 4 and report["summary"]["files_not_read"] == 1
    assert [item["code"] for item in report["not_read"]] == ["not_an_image_name"]


def test_evaluate_with_predictions_elsewhere_leaves_no_earlier_predictions_in_out(tiny_run, tmp_path):
    """Before, `evaluate --out E --predictions P.csv` after an earlier `evaluate --out E` left the earlier run's
    E/predictions.csv beside the new metrics.json (as evaluate removes an earlier false_positives.png it does
    not draw, README): read as this evaluation's rows."""
    from training.evaluate import evaluate

    data, run = tiny_run
    out = tmp_path / "eval"
    evaluate(run, [str(data)], out_dir=out)
    assert (out / "predictions.csv").is_file()
    evaluate(run, [str(data)], out_dir=out, predictions=tmp_path / "p.csv")
    assert not (out / "predictions.csv").exists() and (out / "metrics.json").is_file()
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 3  # header + the two val photos
    evaluate(run, [str(data)], out_dir=out, predictions=out / "predictions.csv")  # named explicitly: written
    assert len((out / "predictions.csv").read_text().splitlines()) == 3


def test_data_check_never_reads_a_pipe_or_an_oversized_file_a_manifest_lists(tmp_path):
    """Before, data check read every listed path whole: a named pipe in a manifest hung it for ever (a device such
    as /dev/zero filled memory), and a 300 MiB file was read whole before decoding failed. Now both are
    `unreadable` errors naming why, as data ingest reports them."""
    import threading

    from training.data.check import check_dataset

    root = tmp_path / "d"
    root.mkdir()
    (root / "a.jpg").write_bytes(jpeg_bytes(photo(1)))
    (root / "b.jpg").write_bytes(jpeg_bytes(photo(2)))
    os.mkfifo(root / "pipe.jpg")
    with open(root / "huge.jpg", "wb") as fh:  # sparse: no disk used
        fh.truncate(300 * 2**20)
    (root / "manifest.csv").write_text("path,label,split\na.jpg,ivory,train\nb.jpg,other,val\n"
                                       "pipe.jpg,other,train\nhuge.jpg,other,train\n")
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(check_dataset([root])), daemon=True)
    worker.start()
    worker.join(30)
    try:
        assert not worker.is_alive(), "data check hung reading the pipe"
    finally:
        try:  # let a reader blocked on the pipe see its end
            os.close(os.open(root / "pipe.jpg", os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass
        worker.join(10)
    errors = {Path(e["path"]).name: e for e in result["errors"]}
    assert errors["pipe.jpg"]["code"] == "unreadable" and "not a file" in errors["pipe.jpg"]["message"]
    assert errors["huge.jpg"]["code"] == "unreadable" and "over the 256 MiB" in errors["huge.jpg"]["message"]
    assert result["n_images"] == 4 and len(result["errors"]) == 2
