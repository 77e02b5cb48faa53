"""``wildcheck data check`` names every problem in a dataset of troublesome files."""

import json
import subprocess
import sys

import pytest

from serving.errors import InvalidInput
from training.data.check import check_dataset
from training.data.sources import discover, load_samples


def _by_path(items):
    out = {}
    for item in items:
        out.setdefault(item["path"], []).append(item)
    return out


def test_check_names_each_problem(problem_root):
    root, files = problem_root
    report = check_dataset([root])
    errors = _by_path(report["errors"])
    assert errors[str(files["corrupt"])][0]["code"] == "corrupt"
    assert errors[str(files["zero"])][0]["code"] == "empty"
    assert errors[str(files["text"])][0]["code"] == "not_an_image"
    leak = [e for e in report["errors"] if e["code"] == "leakage"]
    assert len(leak) == 1 and str(files["leak_val"]) in leak[0]["message"]
    assert report["summary"]["cross_split_exact"] == 1
    notes = {item["path"]: item["message"] for item in report["notes"]}
    assert "CMYK" in notes[str(files["cmyk"])]
    assert "16-bit" in notes[str(files["png16"])]
    assert "alpha" in notes[str(files["alpha"])]
    assert "EXIF" in notes[str(files["exif"])]
    # the readable odd files are not errors
    for key in ("cmyk", "png16", "alpha", "exif"):
        assert str(files[key]) not in errors
    assert report["counts"]["val"]["ivory"] == 5  # 4 synthetic + the leaked copy


def test_cli_exit_codes_and_json_report(problem_root, synth_root, tmp_path):
    root, _ = problem_root
    report_path = tmp_path / "report.json"
    bad = subprocess.run([sys.executable, "-m", "training.cli", "data", "check", str(root), "--report", str(report_path)],
                         capture_output=True, text=True)
    assert bad.returncode == 1, bad.stderr
    assert "ERRORS" in bad.stdout and "leakage" in bad.stdout
    assert json.loads(report_path.read_text())["summary"]["errors"] >= 4
    good = subprocess.run([sys.executable, "-m", "training.cli", "data", "check", str(synth_root)],
                          capture_output=True, text=True)
    assert good.returncode == 0, good.stdout + good.stderr


def test_near_duplicates_found_across_splits(tmp_path):
    from PIL import Image

    from tests.conftest import photo

    for split in ("train", "val"):
        (tmp_path / split / "other").mkdir(parents=True)
    base = photo(40, (200, 200))
    base.save(tmp_path / "train" / "other" / "a.jpg", quality=95)
    base.resize((150, 150)).save(tmp_path / "val" / "other" / "a_small.jpg", quality=70)  # same picture, other bytes
    photo(41, (200, 200)).transpose(Image.Transpose.ROTATE_90).save(tmp_path / "val" / "other" / "b.jpg")
    report = check_dataset([tmp_path])
    assert report["summary"]["cross_split_near"] == 1
    assert {p.rsplit("/", 1)[1] for p in report["near_duplicates"][0]["paths"]} == {"a.jpg", "a_small.jpg"}


def test_layouts_manifest_and_combined_roots(tmp_path, synth_root):
    flat = tmp_path / "flat"
    (flat / "ivory").mkdir(parents=True)
    src = next((synth_root / "train" / "ivory").glob("*.jpg"))
    (flat / "ivory" / "x.jpg").write_bytes(src.read_bytes())
    assert [(s.label, s.split) for s in discover(flat, default_split="val")] == [("ivory", "val")]
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"path,label,split\n{src},rhino_horn,test\n")
    assert [(s.label, s.split) for s in discover(manifest)] == [("rhino_horn", "test")]
    combined = load_samples([synth_root, manifest])
    assert {s.label for s in combined if s.split == "test"} == {"ivory", "other", "pangolin_scales", "tiger_skin", "rhino_horn"}


def test_unknown_split_in_a_manifest_is_an_error_naming_the_rows(tmp_path, synth_root):
    """Before, a misspelt split (`vali`) became a split of its own: check listed it and train silently dropped it."""
    from typer.testing import CliRunner

    from training.cli import app

    images = sorted((synth_root / "train" / "ivory").glob("*.jpg"))[:3]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label,split\n" f"{images[0]},ivory,train\n" f"{images[1]},ivory,vali\n"
                        f"{images[2]},ivory,\n")
    with pytest.raises(InvalidInput, match=r"line 3: 'vali'.*train, val, test"):
        discover(manifest)
    result = CliRunner().invoke(app, ["data", "check", str(manifest)])
    assert result.exit_code == 2 and "'vali'" in result.output and "error:" in result.output
    manifest.write_text("path,label,split\n" f"{images[0]},ivory,train\n" f"{images[1]},ivory,val\n"
                        f"{images[2]},ivory,\n")  # the fix: a known split, or empty (train: other rows name splits)
    assert [s.split for s in discover(manifest, default_split="test")] == ["train", "val", "train"]


def test_a_near_duplicate_labelled_differently_is_called_a_label_conflict(tmp_path):
    """Before, a recompressed ivory photo filed under `other` was a plain "near-duplicate" warning; data ingest
    already stops on the same pair as a conflict."""
    from tests.conftest import photo

    for label in ("ivory", "other"):
        (tmp_path / "train" / label).mkdir(parents=True)
    base = photo(40, (200, 200))
    base.save(tmp_path / "train" / "ivory" / "a.jpg", quality=95)
    base.save(tmp_path / "train" / "other" / "a_again.jpg", quality=60)  # the same picture, other bytes, other label
    photo(42, (200, 200)).save(tmp_path / "train" / "other" / "b.jpg")
    photo(42, (200, 200)).save(tmp_path / "train" / "other" / "b_again.jpg", quality=60)  # same label: no conflict
    report = check_dataset([tmp_path])
    pairs = {tuple(sorted(p.rsplit("/", 1)[1] for p in e["paths"])): e for e in report["near_duplicates"]}
    assert pairs[("a.jpg", "a_again.jpg")]["label_conflict"] and not pairs[("b.jpg", "b_again.jpg")]["label_conflict"]
    assert report["summary"]["near_label_conflicts"] == 1
    messages = [w["message"] for w in report["warnings"] if "near-duplicate" in w["message"]]
    conflict = [m for m in messages if "a_again.jpg" in m or "/a.jpg" in m]
    assert len(conflict) == 1 and "labelled 'ivory' here and 'other' there" in conflict[0] and "label conflict" in conflict[0]
    assert not any("label conflict" in m for m in messages if "b_again.jpg" in m)
