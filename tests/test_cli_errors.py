"""The CLI turns a user's mistake (a WildcheckError) into one line on stderr and exit 2; a bug keeps its traceback."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from serving.errors import WildcheckError
from tests.conftest import REPO
from training.cli import app


def test_installed_entry_point_prints_the_message_and_exits_2(tmp_path):
    """Through `main()` as the `wildcheck` script runs it: no traceback, the message names the missing folder."""
    missing = tmp_path / "no-such-dataset"
    proc = subprocess.run([sys.executable, "-c", "from training.cli import main; main()", "data", "check", str(missing)],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and str(missing) in proc.stderr and "not found" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_cli_runner_on_app_sees_the_same_exit_status(tmp_path):
    """CliRunner().invoke(app) goes through the same single catch (the root group), not a per-command block."""
    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                                      "--config", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "error: config" in result.output and "nope.yaml not found" in result.output
    assert not (tmp_path / "run").exists()


def test_a_refusal_keeps_its_own_exit_status(tmp_path, monkeypatch):
    """Gate refusals (promote, export) exit 1 as before; the message is printed the same way."""
    import training.registry
    from training.registry import PromoteRefused

    def refuse(*args, **kwargs):
        raise PromoteRefused("the comparison gate failed (ivory recall dropped); --force to promote anyway")

    monkeypatch.setattr(training.registry, "promote", refuse)
    result = CliRunner().invoke(app, ["promote", str(tmp_path), "--registry", str(tmp_path / "reg")])
    assert result.exit_code == 1 and "error: the comparison gate failed" in result.output


def test_a_bug_is_not_swallowed(tmp_path, monkeypatch):
    """Only WildcheckError becomes a message: any other exception propagates with its traceback."""
    import training.data.check

    def broken(*args, **kwargs):
        raise KeyError("a bug")

    monkeypatch.setattr(training.data.check, "check_dataset", broken)
    result = CliRunner().invoke(app, ["data", "check", str(tmp_path)])
    assert isinstance(result.exception, KeyError) and result.exit_code == 1


@pytest.mark.parametrize("name", ["ContractError", "GalleryError", "PolicyError", "ImageError", "BentoBuildError",
                                  "ScanStopped", "ConditionsError", "ExportError", "PromoteRefused", "IngestConflict"])
def test_user_facing_errors_share_the_base(name):
    modules = {"ContractError": "serving.contract", "GalleryError": "serving.gallery", "PolicyError": "serving.policy",
               "ImageError": "serving.imageio", "BentoBuildError": "serving.bento", "ScanStopped": "serving.client",
               "ConditionsError": "training.conditions", "ExportError": "training.export",
               "PromoteRefused": "training.registry", "IngestConflict": "training.data.ingest"}
    import importlib

    cls = getattr(importlib.import_module(modules[name]), name)
    assert issubclass(cls, WildcheckError)


def test_ingest_of_a_missing_csv_is_a_message_and_writes_nothing(tmp_path):
    """Before, the CLI's per-command except FileNotFoundError hid open()'s error; now ingest names the file itself."""
    result = CliRunner().invoke(app, ["data", "ingest", str(tmp_path / "labels.csv"), "--into", str(tmp_path / "ds")])
    assert result.exit_code == 2 and "labels.csv not found" in result.output and not (tmp_path / "ds").exists()


def test_an_unknown_architecture_is_a_message_not_a_traceback(tmp_path, synth_root):
    """`--set model.name=...` with a name timm does not know: timm raises a bare RuntimeError, which printed a
    traceback; now the user reads what to do."""
    result = CliRunner().invoke(app, ["train", "--data", str(synth_root), "--out", str(tmp_path / "run"),
                                      "--epochs", "1", "--img-size", "64", "--set", "model.name=not_a_model",
                                      "--set", "model.pretrained=none"])
    assert result.exit_code == 2, result.output
    assert "'not_a_model' is no timm architecture" in result.output and "Traceback" not in result.output


def _no_traceback(result, *says):
    assert result.exit_code == 2, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit), result.exception
    for text in says:
        assert text in result.output, result.output


def test_train_out_that_is_a_file_is_a_message(tmp_path):
    """Before: FileExistsError from mkdir, with a traceback."""
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path), "--out", str(out)])
    _no_traceback(result, f"error: --out {out} is a file", "run directory")
    assert out.read_text() == "keep me"


@pytest.mark.parametrize("device, says", [("bogus", "is not a device torch knows"),
                                          ("cuda:x", "is not a device torch knows"),
                                          ("mps", "is not usable here"), ("meta", "holds no data")])
def test_an_unknown_device_is_a_message_before_any_work(tmp_path, device, says):
    """Before: torch.device's RuntimeError from training/distributed.py:init, with a traceback; mps (absent on
    Linux) and meta failed only after the data was read and the model built."""
    result = CliRunner().invoke(app, ["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
                                      "--set", f"train.device={device}"])
    _no_traceback(result, f"error: train.device {device!r} {says}", "--set train.device=auto")
    assert not (tmp_path / "run").exists()


def test_ingest_into_a_file_is_a_message(tmp_path):
    """Before: ValueError 'not in the subpath' from _load_manifest; --into must be a dataset folder."""
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\nx.jpg,ivory\n")
    into = tmp_path / "some.csv"
    into.write_text("path,label\n")
    result = CliRunner().invoke(app, ["data", "ingest", str(labels), "--into", str(into)])
    _no_traceback(result, f"error: --into {into} is a file", "dataset folder")
    assert into.read_text() == "path,label\n"


@pytest.mark.parametrize("args, option", [
    (["explain", "m.onnx", "x.jpg", "--out", "ex", "--max-side", "0"], "--max-side"),
    (["data", "synth", "sy", "--size", "0"], "--size"),
    (["data", "synth", "sy", "--size", "1"], "--size"),
    (["data", "synth", "sy", "--per-class", "0"], "--per-class"),
    (["data", "synth", "sy", "--per-class", "-3"], "--per-class"),
    (["export", "run", "--out", "m.onnx", "--int8-max-drop", "-1"], "--int8-max-drop"),
])
def test_out_of_range_options_are_usage_errors(tmp_path, monkeypatch, args, option):
    """Before: ZeroDivisionError (--max-side 0), numpy's 'high <= 0' (--size 0|1), 2 images per class written
    silently (--per-class 0), a negative INT8 tolerance accepted. Now typer refuses the value, exit 2, no work."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, args)
    _no_traceback(result, "Invalid value", option)
    assert not any(tmp_path.iterdir())


def test_synth_into_a_file_is_a_message(tmp_path):
    """Before: NotADirectoryError from mkdir."""
    out = tmp_path / "ds"
    out.write_text("")
    result = CliRunner().invoke(app, ["data", "synth", str(out), "--size", "64", "--per-class", "1"])
    _no_traceback(result, f"error: {out} is a file", "folder")


def test_calibrate_on_an_onnx_file_says_to_use_traffic_not_to_load_it_unsafely(tmp_path):
    """Before: torch's 'Re-running torch.load with weights_only=False will likely succeed' (wrong, and unsafe)."""
    model = tmp_path / "model.onnx"
    model.write_bytes(b"\x08\x07\x12\x07pytorch")  # an ONNX ModelProto's first fields
    result = CliRunner().invoke(app, ["calibrate", str(model)])
    _no_traceback(result, f"error: {model} is an exported ONNX model", "run dir or best.pt", "--traffic ROOT")
    assert "weights_only" not in result.output


def test_a_file_torch_cannot_load_safely_never_gets_weights_only_advice(tmp_path):
    """load_checkpoint on an ONNX file (any command taking a checkpoint), a pickle holding non-tensors, a text file
    (KeyError inside torch.load, a traceback before)."""
    import numpy as np
    import torch

    (tmp_path / "model.onnx").write_bytes(b"\x08\x07\x12\x07pytorch")
    torch.save({"model": np.zeros(2)}, tmp_path / "objects.pt")
    (tmp_path / "text.pt").write_text("hello world")
    for name, says in (("model.onnx", "is an exported ONNX model, not a wildcheck checkpoint"),
                       ("objects.pt", "is not a readable wildcheck checkpoint"),
                       ("text.pt", "is not a readable wildcheck checkpoint")):
        path = tmp_path / name
        result = CliRunner().invoke(app, ["export", str(path), "--out", str(tmp_path / "out.onnx")])
        _no_traceback(result, f"error: {path} {says}", "pass a run dir or the best.pt")
        assert "weights_only" not in result.output and "can still be loaded" not in result.output


def test_grey_head_refuses_an_infinite_lam_by_name(tmp_path):
    """typer's min=0 lets inf through; GreyHeadConfig refuses it (no NaN or inf in any config number) by the option's
    name, not with pydantic's traceback."""
    result = CliRunner().invoke(app, ["grey-head", str(tmp_path), "--out", str(tmp_path / "g"), "--lam", "inf"])
    _no_traceback(result, "error: --lam inf: Input should be a finite number")
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("option", ["--workers", "--threads-per-worker"])
def test_serve_refuses_zero_workers_or_threads_instead_of_ignoring_them(option, tmp_path):
    """`--workers 0` was silently dropped (the default 2 served) and `--workers -1` died in BentoML's schema."""
    from typer.testing import CliRunner

    from training.cli import app

    for value in ("0", "-1"):
        result = CliRunner().invoke(app, ["serve", str(REPO / "models" / "wildcheck-ivory.onnx"), option, value])
        assert result.exit_code == 2 and option in result.output, result.output


@pytest.mark.parametrize("command", ["evaluate", "robustness"])
@pytest.mark.parametrize("size", ["0", "-3"])
def test_a_batch_size_below_one_is_a_usage_error(onnx_model, synth_root, tmp_path, command, size):
    """Before: robustness died in range() (step 0) with a traceback; evaluate exited 2 naming another problem."""
    out = tmp_path / "report"
    result = CliRunner().invoke(app, [command, str(onnx_model), "--data", str(synth_root), "--out", str(out),
                                      "--batch-size", size])
    _no_traceback(result, "Invalid value", "--batch-size")
    assert not out.exists()


def test_a_size_route_below_the_contracts_least_is_a_message(trained_run, tmp_path):
    """Before: a pydantic ValidationError traceback (typer allowed any size >= 0, SizeRoute needs >= 32)."""
    before = (trained_run / "best.pt").read_bytes()
    for size in ("3", "20"):
        result = CliRunner().invoke(app, ["calibrate", str(trained_run), "--size-route", size])
        _no_traceback(result, f"error: --size-route {size}: give 32 px or more", "or 0 for no route")
    assert (trained_run / "best.pt").read_bytes() == before


def test_an_out_that_is_a_file_is_a_message_for_every_command(onnx_model, trained_run, synth_root, tmp_path):
    """Before: FileExistsError from mkdir, with a traceback (evaluate, robustness, ensemble, grey-head, explain)."""
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    image = next((synth_root / "val" / "ivory").iterdir())
    for args in (["evaluate", onnx_model, "--data", synth_root], ["robustness", onnx_model, "--data", synth_root],
                 ["ensemble", trained_run, trained_run], ["grey-head", trained_run], ["explain", onnx_model, image]):
        result = CliRunner().invoke(app, [*map(str, args), "--out", str(out)])
        _no_traceback(result, f"error: --out {out} is a file", "folder to write into")
        assert out.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_an_output_file_named_as_a_folder_is_a_message(onnx_model, synth_root, tmp_path):
    """Before: IsADirectoryError (evaluate --predictions DIR; calibrate --traffic ROOT --out DIR, from atomic_path)."""
    folder = tmp_path / "folder"
    folder.mkdir()
    result = CliRunner().invoke(app, ["evaluate", str(onnx_model), "--data", str(synth_root), "--predictions", str(folder)])
    _no_traceback(result, f"error: --predictions {folder} is a folder", f"--predictions {folder / 'predictions.csv'}")
    result = CliRunner().invoke(app, ["calibrate", str(onnx_model), "--traffic", str(synth_root / "val" / "other"),
                                      "--out", str(folder)])
    _no_traceback(result, f"error: --out {folder} is a folder", f"--out {folder / 'policy.yaml'}")
    assert not any(folder.iterdir())
