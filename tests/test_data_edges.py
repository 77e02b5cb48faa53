"""Data that every command read differently, or not at all, without a word: unsplit manifest rows, linked source
folders, folders and files beside the layout, photos copied in after an ingest, Windows paths, report paths."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from serving.errors import InvalidInput
from tests.conftest import jpeg_bytes, photo
from training.data.check import check_dataset, format_report
from training.data.sources import discover, load_samples, select_split


def _cli(*args):
    from training.cli import app

    return CliRunner().invoke(app, list(map(str, args)))


def _images(folder: Path, names, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, name in enumerate(names):
        (folder / name).write_bytes(jpeg_bytes(photo(seed + k, (64, 64))))
        paths.append(folder / name)
    return paths


# --- 1: a manifest's rows without a split -------------------------------------------------------------------------

def _mixed_manifest(tmp_path: Path) -> Path:
    """Four rows without a split (training images) and two val rows: what a team's half-filled export looks like."""
    train = _images(tmp_path / "img" / "a", [f"t{i}.jpg" for i in range(4)])
    val = _images(tmp_path / "img" / "b", ["v0.jpg", "v1.jpg"], seed=50)
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label,split\n" + "".join(f"{p},ivory,\n" for p in train)
                        + "".join(f"{p},ivory,val\n" for p in val))
    return manifest


def test_unsplit_manifest_rows_are_train_for_every_command(tmp_path):
    """Before, `evaluate --split test` passed default_split=test and evaluated the four training images as test
    images (and --split val counted them as validation); training and data check counted them as train."""
    from training.robustness import RobustnessError, gather

    manifest = _mixed_manifest(tmp_path)
    for default in ("train", "val", "test"):
        assert [s.split for s in load_samples([manifest], default_split=default)] == ["train"] * 4 + ["val"] * 2
    assert len(select_split(load_samples([manifest], default_split="val"), "val")) == 2
    with pytest.raises(RobustnessError, match="no images in split 'test'"):
        gather([manifest], [], "test", ["ivory", "other"], "other")
    samples, _, _ = gather([manifest], [], "val", ["ivory", "other"], "other")
    assert sorted(s.path.name for s in samples) == ["v0.jpg", "v1.jpg"]

    unsplit = tmp_path / "unsplit.csv"  # no row names a split: the split the command asks for, like ROOT/<label>/
    unsplit.write_text("path,label\n" + "".join(f"{p},ivory\n" for p in sorted((tmp_path / "img" / "a").iterdir())))
    assert {s.split for s in load_samples([unsplit], default_split="test")} == {"test"}


def test_manifest_paths_with_backslashes_are_refused_with_the_fix(tmp_path):
    """Before, each Windows path failed on its own later with "No such file or directory"."""
    _images(tmp_path / "train" / "ivory", ["a.jpg"])
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label,split\ntrain\\ivory\\a.jpg,ivory,train\nC:\\data\\x.jpg,ivory,train\n")
    with pytest.raises(InvalidInput, match=r"2 path\(s\) with backslashes.*line 2: 'train\\\\ivory\\\\a.jpg'.*"
                                           r"line 3.*forward slashes"):
        discover(manifest)
    result = _cli("data", "check", manifest)
    assert result.exit_code == 2 and "forward slashes" in result.output
    manifest.write_text("path,label,split\ntrain/ivory/a.jpg,ivory,train\n")
    assert [s.path.name for s in discover(manifest)] == ["a.jpg"]


# --- 2: linked folders ----------------------------------------------------------------------------------------------

def test_a_linked_source_folder_inside_a_label_is_read(tmp_path):
    """Python 3.11's rglob does not follow folder links: train/other/coco -> /store/coco vanished from every count."""
    store = tmp_path / "store" / "coco"
    _images(store, ["c0.jpg", "c1.jpg", "c2.jpg"])
    root = tmp_path / "data"
    _images(root / "train" / "other", ["o.jpg"], seed=20)
    os.symlink(store, root / "train" / "other" / "coco")
    os.symlink("..", root / "train" / "other" / "loop")  # back up the tree: not walked (or other/ would be read twice)
    samples = discover(root)
    assert sorted(str(s.path.relative_to(root)) for s in samples) == [
        "train/other/coco/c0.jpg", "train/other/coco/c1.jpg", "train/other/coco/c2.jpg", "train/other/o.jpg"]
    assert {s.source for s in samples if s.path.parent.name == "coco"} == {"coco"}
    assert check_dataset([root])["counts"] == {"train": {"other": 4}}


# --- 3: what no command reads -------------------------------------------------------------------------------------

def test_data_check_names_folders_and_files_no_command_reads(tmp_path):
    """Test/ beside train/, a label folder beside the splits, .jfif / extension-less / trailing-space names and an
    empty label folder were all left out of every count without a word; what trains does not change."""
    root = tmp_path / "data"
    _images(root / "train" / "ivory", ["a.jpg", "b.jpg"])
    _images(root / "val" / "ivory", ["c.jpg"], seed=10)
    _images(root / "Test" / "ivory", ["t0.jpg", "t1.jpg", "t2.jpg"], seed=20)
    _images(root / "ivory", ["x.jpg"], seed=30)
    jpeg = jpeg_bytes(photo(40, (64, 64)))
    for name in ("phone.jfif", "noext", "trail.jpg "):
        (root / "train" / "ivory" / name).write_bytes(jpeg)
    (root / "train" / "pangolin_scales").mkdir()
    (root / "train" / "loose.jpg").write_bytes(jpeg)
    (root / "PROVENANCE.txt").write_text("where the photos came from\n")  # not an image: no warning

    report = check_dataset([root])
    assert report["counts"] == {"train": {"ivory": 2}, "val": {"ivory": 1}}  # unchanged
    found = {(Path(i["path"]).relative_to(root).as_posix(), i["code"]): i for i in report["not_read"]}
    assert set(found) == {("Test", "ignored_folder"), ("ivory", "ignored_folder"), ("train", "loose_images"),
                          ("train/ivory", "not_an_image_name"), ("train/pangolin_scales", "empty_label")}
    assert found[("Test", "ignored_folder")]["count"] == 3 and "rename it to test/" in found[("Test", "ignored_folder")]["message"]
    assert "move its label folders under train/" in found[("ivory", "ignored_folder")]["message"]
    names = found[("train/ivory", "not_an_image_name")]
    assert names["count"] == 3 and sorted(names["examples"]) == ["noext", "phone.jfif", "trail.jpg "]
    assert "ends with a space" in names["message"] and "extension .jfif" in names["message"]
    assert report["summary"]["files_not_read"] == 3 + 1 + 1 + 3
    text = format_report(report)
    assert "[ignored_folder]" in text and "rename it to test/" in text and "8 files no command reads" in text


# --- 4: photos copied into an ingested dataset; an ingest that adds nothing ---------------------------------------

def _labels_csv(tmp_path: Path, rows) -> Path:
    path = tmp_path / "labels.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return path


def test_an_ingest_that_adds_nothing_writes_no_manifest(tmp_path):
    """Before, an ingest of duplicates only wrote manifest.csv into a folder dataset: from then on the dataset was read
    from the manifest, and photos copied into its folders later were left out."""
    from training.data.ingest import format_ingest, ingest

    root = tmp_path / "data"
    (dup,) = _images(root / "train" / "ivory", ["a.jpg"])
    incoming = tmp_path / "in"
    incoming.mkdir()
    shutil.copy(dup, incoming / "again.jpg")
    report = ingest(_labels_csv(tmp_path, [[incoming / "again.jpg", "ivory"]]), root)
    assert not report["added"] and len(report["duplicates"]) == 1
    assert not (root / "manifest.csv").exists()
    assert "nothing added" in format_ingest(report)
    _images(root / "train" / "ivory", ["later.jpg"], seed=9)  # still a folder dataset: the new photo counts
    assert sorted(s.path.name for s in discover(root)) == ["a.jpg", "later.jpg"]


def test_data_check_names_images_an_ingested_manifest_does_not_list(tmp_path):
    from training.data.ingest import ingest

    src = _images(tmp_path / "in", ["a.jpg", "b.jpg"])
    root = tmp_path / "data"
    ingest(_labels_csv(tmp_path, [[p, "ivory"] for p in src]), root)
    _images(root / "train" / "ivory", ["copied_later.jpg"], seed=70)  # copied in by hand after the ingest
    report = check_dataset([root])
    assert report["n_images"] == 2
    (item,) = report["not_read"]
    assert item["code"] == "not_in_manifest" and item["count"] == 1
    assert item["examples"] == ["train/ivory/copied_later.jpg"] and "wildcheck data ingest" in item["message"]
    assert "copied_later.jpg" in format_report(report)


# --- 8: report paths ----------------------------------------------------------------------------------------------

def test_report_paths_are_checked_before_any_work(tmp_path, synth_root):
    """Before: a folder as --report was a traceback after the check, and after `data ingest` had committed."""
    folder = tmp_path / "reports"
    folder.mkdir()
    result = _cli("data", "check", synth_root, "--report", folder)
    assert result.exit_code == 2 and f"--report {folder} is a folder" in result.output, result.output
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    result = _cli("data", "check", synth_root, "--report", a_file / "r.json")
    assert result.exit_code == 2 and "is a file, not a folder" in result.output, result.output

    src = _images(tmp_path / "in", ["a.jpg"])
    labels = _labels_csv(tmp_path, [[src[0], "ivory"]])
    root = tmp_path / "data"
    result = _cli("data", "ingest", labels, "--into", root, "--report", folder)
    assert result.exit_code == 2 and "is a folder" in result.output
    assert not root.exists()  # nothing ingested
    deep = tmp_path / "new" / "sub" / "ingest.json"  # a missing folder is created
    result = _cli("data", "ingest", labels, "--into", root, "--report", deep)
    assert result.exit_code == 0, result.output
    assert len(json.loads(deep.read_text())["added"]) == 1


# --- 15 -------------------------------------------------------------------------------------------------------------

def test_ingest_summary_names_each_kind_in_words(tmp_path):
    from training.data.ingest import format_ingest, ingest

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "broken.jpg").write_bytes(b"not a jpeg")
    text = format_ingest(ingest(_labels_csv(tmp_path, [[tmp_path / "in" / "broken.jpg", "ivory"]]), tmp_path / "data"))
    assert "  unreadable: line 2" in text and "unreadabl:" not in text


# --- user CSVs that are not UTF-8 (one reader: serving/csvio.read_rows) ----------------------------------------------

def test_a_manifest_or_labels_csv_that_is_not_utf8_is_a_clear_error_not_a_traceback(tmp_path):
    """A Latin-1 manifest, or labels CSV given to ingest, raised UnicodeDecodeError with a traceback; the scan and
    gallery CSV readers already said what to do. All four read through one function now."""
    from training.data.ingest import ingest
    from training.data.sources import load_samples

    photo_path = tmp_path / "a.jpg"
    photo_path.write_bytes(jpeg_bytes(photo(0)))
    latin1 = "path,label\na.jpg,ivo\xe9ry\n".encode("latin-1")
    manifest = tmp_path / "manifest.csv"
    manifest.write_bytes(latin1)
    with pytest.raises(InvalidInput, match="is not UTF-8 text .* save the CSV as UTF-8"):
        load_samples([manifest])
    labels = tmp_path / "labels.csv"
    labels.write_bytes(latin1)
    with pytest.raises(InvalidInput, match="is not UTF-8 text .* save the CSV as UTF-8"):
        ingest(labels, tmp_path / "dataset")
    assert not (tmp_path / "dataset").exists()  # nothing written
