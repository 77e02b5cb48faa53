"""s32 helper H2: file names that are not UTF-8 (a Latin-1 name from a Windows archive) in training, robustness and
galleries, and `gallery build`'s quiet cases (no negatives; --out among what it reads). Each failed before its fix."""

from __future__ import annotations

import hashlib
import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from tests.conftest import jpeg_bytes, photo, tiny_config

LATIN1 = b"caf\xe9.jpg"  # "café.jpg" in Latin-1: not UTF-8, so os.listdir gives it with a surrogate ('\udce9')


def _cli(*args):
    from training.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _latin1_name(folder: Path, name: bytes = LATIN1) -> Path:
    """A path whose file name is not UTF-8, as os.listdir returns it (written through its bytes)."""
    return Path(os.fsdecode(os.fsencode(str(folder)) + b"/" + name))


def _tree(root: Path, layout: dict[str, dict[str, int]], seed: int = 0) -> Path:
    for split, labels in layout.items():
        for label, n in labels.items():
            (root / split / label).mkdir(parents=True)
            for i in range(n):
                seed += 1
                (root / split / label / f"{label}_{i}.jpg").write_bytes(jpeg_bytes(photo(seed, (64, 48))))
    return root


def _fingerprint_as_before(samples) -> str:
    """The training-data hash as every run recorded it (``str.encode()`` of each line): what --resume compares."""
    h = hashlib.sha256()
    for s in sorted(samples, key=lambda s: (s.split, s.label, str(s.path))):
        data = s.path.read_bytes()
        h.update(f"{s.split}\t{s.label}\t{s.path.name}\t{len(data)}\t{hashlib.sha256(data).hexdigest()}\n".encode())
    return h.hexdigest()


# ---- training: the data fingerprint ------------------------------------------------------------------------------

def test_fingerprint_hashes_a_name_that_is_not_utf8_by_its_bytes_and_keeps_every_utf8_fingerprint(tmp_path):
    """Before: UnicodeEncodeError ('\\udce9': surrogates not allowed) from `wildcheck train`, after the caching."""
    from training.data.sources import fingerprint, load_samples

    root = _tree(tmp_path / "d", {"train": {"ivory": 2, "other": 2}, "val": {"ivory": 1, "other": 1}})
    (root / "train" / "ivory" / "café.jpg").write_bytes(jpeg_bytes(photo(40, (64, 48))))  # UTF-8, not ASCII
    utf8_only = load_samples([root])
    assert fingerprint(utf8_only)["sha256"] == _fingerprint_as_before(utf8_only)  # resume/compare still match

    latin1 = _latin1_name(root / "train" / "ivory")
    latin1.write_bytes(jpeg_bytes(photo(41, (64, 48))))
    first = fingerprint(load_samples([root]))
    assert first["counts"]["train"]["ivory"] == 4 and first["sha256"] != fingerprint(utf8_only)["sha256"]
    # the name's own bytes are hashed: another Latin-1 name for the same bytes is other data (no '?' for both)
    os.rename(os.fsencode(str(latin1)), os.fsencode(str(root / "train" / "ivory")) + b"/caf\xe8.jpg")
    assert fingerprint(load_samples([root]))["sha256"] != first["sha256"]


def test_train_runs_on_a_dataset_with_a_file_name_that_is_not_utf8(tmp_path):
    from training.train import train

    root = _tree(tmp_path / "d", {"train": {"ivory": 3, "other": 3}, "val": {"ivory": 1, "other": 1}})
    _latin1_name(root / "train" / "ivory").write_bytes(jpeg_bytes(photo(50, (64, 48))))
    summary = train([str(root)], tmp_path / "run", tiny_config(epochs=1, batch_size=4))
    assert (tmp_path / "run" / "best.pt").is_file() and summary


# ---- robustness: the seeds and the conditions file ---------------------------------------------------------------

def test_condition_seeds_are_unchanged_for_utf8_keys_and_take_a_latin1_name_by_its_bytes():
    from training.conditions import condition_rng

    def draws(rng):
        return rng.random(4)

    for key in ("val/ivory/a.jpg", "val/ivory/café.jpg"):  # the seeds every report was made with
        before = np.random.default_rng([7, zlib.crc32("jpeg".encode()), zlib.crc32(key.encode())])
        assert np.array_equal(draws(condition_rng(7, "jpeg", key)), draws(before))
    key = os.fsdecode(b"val/ivory/" + LATIN1)  # before: UnicodeEncodeError
    raw = np.random.default_rng([7, zlib.crc32(b"jpeg"), zlib.crc32(b"val/ivory/" + LATIN1)])
    assert np.array_equal(draws(condition_rng(7, "jpeg", key)), draws(raw))


def test_robustness_reports_a_dataset_with_a_file_name_that_is_not_utf8(onnx_model, synth_root, tmp_path):
    import json

    data = tmp_path / "data"
    shutil.copytree(synth_root, data)
    shutil.copy(sorted((data / "val" / "ivory").glob("*.jpg"))[0], _latin1_name(data / "val" / "ivory"))
    spec = tmp_path / "conditions.yaml"
    spec.write_text("conditions:\n  jpeg: {}\n")
    result = _cli("robustness", onnx_model, "--data", data, "--conditions", spec, "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "r" / "robustness.json").read_text())["counts"]["ivory"] == 5


def test_a_conditions_file_that_is_not_utf8_is_a_one_line_error(synth_root, tmp_path):
    """Before: a UnicodeDecodeError traceback (a Latin-1 'é' in a comment), as train configs no longer do."""
    spec = tmp_path / "conditions.yaml"
    spec.write_bytes(b"conditions:\n  jpeg: {quality: 20}  # caf\xe9\n")
    model = tmp_path / "model.onnx"  # never opened: the conditions are read before any work
    result = _cli("robustness", model, "--data", synth_root, "--conditions", spec, "--out", tmp_path / "r")
    assert result.exit_code == 2, result.output
    assert f"conditions file {spec} is not a UTF-8 text file" in result.output and "save it as UTF-8" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "r").exists()


# ---- galleries ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def refs(tmp_path_factory) -> Path:
    """refs/seized/: three photos with UTF-8 names."""
    refs = tmp_path_factory.mktemp("names") / "refs"
    (refs / "seized").mkdir(parents=True)
    for i in range(3):
        (refs / "seized" / f"s_{i}.jpg").write_bytes(jpeg_bytes(photo(60 + i)))
    return refs


def test_a_gallery_with_a_reference_named_not_utf8_saves_loads_and_removes_it(onnx_model, refs, tmp_path):
    """Before: PydanticSerializationError (surrogates not allowed) at save, after all the embedding. The id is kept
    as data check shows such a name (\\xNN escapes): `gallery remove` takes it as shown or as the file's own bytes."""
    from serving.gallery import Gallery

    latin1_refs = tmp_path / "refs"
    shutil.copytree(refs, latin1_refs)
    _latin1_name(latin1_refs / "seized").write_bytes(jpeg_bytes(photo(70)))
    out = tmp_path / "g.npz"
    result = _cli("gallery", "build", latin1_refs, "--model", onnx_model, "--out", out)
    assert result.exit_code == 0, result.output
    ids = Gallery.load(out).header.reference_ids
    assert sorted(ids) == ["seized/caf\\xe9.jpg", "seized/s_0.jpg", "seized/s_1.jpg", "seized/s_2.jpg"]
    assert _cli("gallery", "info", out).exit_code == 0
    shutil.copy(out, tmp_path / "copy.npz")
    for gallery, typed in ((out, os.fsdecode(b"seized/" + LATIN1)), (tmp_path / "copy.npz", "seized/caf\\xe9.jpg")):
        removed = _cli("gallery", "remove", gallery, "--reference", typed)
        assert removed.exit_code == 0 and "removed 1 reference(s)" in removed.output, removed.output
        assert sorted(Gallery.load(gallery).header.reference_ids) == ["seized/s_0.jpg", "seized/s_1.jpg", "seized/s_2.jpg"]


def test_a_gallery_built_without_negatives_warns_that_its_thresholds_are_unmeasured(onnx_model, refs, tmp_path):
    """Before: "thresholds solved on 0 negatives" and nothing more, while 50 negatives got a warning."""
    result = _cli("gallery", "build", refs, "--model", onnx_model, "--out", tmp_path / "g.npz")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if "warning" in line]
    assert len(warnings) == 1, result.output
    warning = warnings[0]
    assert "no negatives" in warning and "unmeasured defaults" in warning and "--negatives" in warning
    assert "solved on 0 negatives" not in result.output


def test_a_negative_named_not_utf8_is_listed_escaped_when_left_out_as_a_copy(onnx_model, refs, tmp_path):
    neg = tmp_path / "neg" / "other"
    neg.mkdir(parents=True)
    for i in range(6):
        (neg / f"n_{i}.jpg").write_bytes(jpeg_bytes(photo(200 + i)))
    shutil.copy(refs / "seized" / "s_0.jpg", _latin1_name(neg))  # a reference's copy among the negatives
    result = _cli("gallery", "build", refs, "--model", onnx_model, "--out", tmp_path / "g.npz",
                  "--negatives", tmp_path / "neg")
    assert result.exit_code == 0, result.output
    assert f"{tmp_path / 'neg' / 'other'}/caf\\xe9.jpg (a seized reference)" in result.output
    assert "\udce9" not in result.output


def test_gallery_build_refuses_an_out_among_the_negatives_or_not_named_npz_and_writes_nothing(onnx_model, refs, tmp_path):
    """Before: `--out neg/g.txt --negatives neg` wrote a gallery (a zip under a .txt name) into the negatives."""
    neg = tmp_path / "neg"
    neg.mkdir()
    (neg / "n.jpg").write_bytes(jpeg_bytes(photo(300)))
    for out, says in ((neg / "g.npz", f"--out {neg / 'g.npz'} is inside the negatives folder {neg}"),
                      (neg / "sub" / "g.npz", "is inside the negatives folder"),
                      (tmp_path / "g.txt", f"--out {tmp_path / 'g.txt'} is not named .npz"),
                      (tmp_path / "gallery", "name it e.g. --out " + str(tmp_path / "gallery.npz"))):
        result = _cli("gallery", "build", refs, "--model", onnx_model, "--out", out, "--negatives", neg)
        assert result.exit_code == 2 and says in result.output, result.output
        assert not out.exists()
    assert sorted(p.name for p in neg.rglob("*")) == ["n.jpg"]  # nothing written among the negatives
