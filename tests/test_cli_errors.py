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
