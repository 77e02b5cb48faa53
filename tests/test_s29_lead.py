"""Session 29, the lead's fixes from the helpers' unfixed findings. Each test failed before its fix."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

import training.robustness as robustness_module
from tests.conftest import photo
from training.cli import app


def _cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_a_collage_without_enough_readable_negatives_is_refused_before_any_scoring(onnx_model, tmp_path, monkeypatch):
    """Four negatives, one unreadable: the count check passed (4 > 3), then a negative's collage found only two
    readable others and the run stopped part-way, its scoring lost."""
    root = tmp_path / "data"
    for label, n in (("ivory", 2), ("other", 4)):
        (root / "val" / label).mkdir(parents=True)
        for i in range(n):
            photo(10 * len(label) + i, (96, 80)).save(root / "val" / label / f"{i}.jpg")
    (root / "val" / "other" / "3.jpg").write_bytes(b"not an image")
    spec = tmp_path / "conditions.yaml"
    spec.write_text("conditions:\n  collage: {}\n")
    scored = []
    real = robustness_module.predict_images
    monkeypatch.setattr(robustness_module, "predict_images", lambda *a, **k: scored.append(1) or real(*a, **k))
    result = _cli("robustness", onnx_model, "--data", root, "--conditions", spec, "--out", tmp_path / "r")
    text = " ".join(result.output.split())
    assert result.exit_code == 2, text
    assert "collage needs more than 3 readable 'other' images" in text and "1 unreadable" in text
    assert scored == [] and not (tmp_path / "r" / "robustness.json").exists()


def test_an_interrupted_scan_says_how_to_resume_and_exits_130(tmp_path, monkeypatch):
    """Before: Ctrl-C ended `wildcheck scan` with a KeyboardInterrupt traceback and no word on resuming."""
    import serving.client

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(serving.client, "scan", interrupted)
    result = _cli("scan", tmp_path, "--url", "http://127.0.0.1:9", "--out", tmp_path / "scan.jsonl")
    assert result.exit_code == 130, result.output
    assert "run the same command again" in result.output and str(tmp_path / "scan.jsonl") in result.output


def test_the_data_fingerprint_never_reads_a_pipe_listed_in_a_manifest(tmp_path):
    """A named pipe (or /dev/zero) in a manifest is skipped by decoding (0 bytes), but the training data's
    fingerprint opened it and waited for a writer for ever (/dev/zero: read for ever)."""
    import os
    import threading

    from training.data.sources import Sample, fingerprint

    pipe = tmp_path / "listed.jpg"
    os.mkfifo(pipe)
    good = tmp_path / "a.jpg"
    photo(1).save(good)
    found = {}
    worker = threading.Thread(target=lambda: found.update(fingerprint([Sample(good, "ivory", "train", ""),
                                                                       Sample(pipe, "ivory", "train", "")])),
                              daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert not worker.is_alive() and found["counts"] == {"train": {"ivory": 2}}


def test_a_threshold_written_as_true_or_as_text_in_a_contract_is_refused():
    """pydantic coerced `"block": true` in a model's metadata to 1.0 (the class never blocked) and `"0.9"` to 0.9;
    policies already refused true/false, contracts did not."""
    import json

    import pytest

    from serving.contract import ContractError, ModelContract
    from tests.conftest import REPO

    shipped = REPO / "models" / "wildcheck-ivory.onnx"
    if not shipped.is_file():
        pytest.skip("the shipped model is absent")
    from serving.contract import read_contract

    metadata = read_contract(shipped).to_metadata()
    assert ModelContract.from_metadata(metadata).thresholds["ivory"].block < 1
    for bad in (True, "0.9"):
        thresholds = json.loads(metadata["wildcheck.thresholds"])
        thresholds["ivory"]["block"] = bad
        with pytest.raises(ContractError, match="thresholds.ivory.block: .*not " + repr(bad).replace(".", r"\.")):
            ModelContract.from_metadata({**metadata, "wildcheck.thresholds": json.dumps(thresholds)})


def test_resume_with_init_from_is_refused_before_any_work(tmp_path):
    """Before: `train --resume --init-from OTHER` resumed from last.pt and dropped --init-from without a word."""
    result = _cli("train", "--data", tmp_path / "data", "--out", tmp_path / "run", "--resume",
                  "--init-from", tmp_path / "other")
    assert result.exit_code == 2 and "give one of them" in result.output, result.output
    assert not (tmp_path / "run").exists()


def test_export_refuses_a_folder_where_the_int8_copy_goes_before_any_work(tmp_path):
    """Before: the whole export ran, then removing the 'stale' MODEL.int8.onnx failed with IsADirectoryError."""
    import pytest

    from serving.errors import InvalidInput
    from training.export import export

    (tmp_path / "m.int8.onnx").mkdir()
    with pytest.raises(InvalidInput, match="m.int8.onnx is not a file"):
        export(tmp_path / "no-run-needed", tmp_path / "m.onnx")  # refused before the run is even looked up
    assert not (tmp_path / "m.onnx").exists()
