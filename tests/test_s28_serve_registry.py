"""Session 28 serving start-up, settings, registry and build fixes: `wildcheck serve` refuses what a worker would
refuse (a worker that fails at start-up was restarted forever, the port open and never ready), `bentoml serve`
exits instead, promote never skips its gate on a broken `current` and refuses cheaply before the export, the
registry serves only its own models, and settings that are positive but absurd refuse to start."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests.conftest import REPO

SHIPPED = REPO / "models" / "wildcheck-ivory.onnx"
needs_shipped = pytest.mark.skipif(not SHIPPED.is_file(), reason=f"{SHIPPED} not present (make model)")


@pytest.fixture(autouse=True)
def _no_wildcheck_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith("WILDCHECK_"):
            monkeypatch.delenv(key)


@pytest.fixture
def execs(monkeypatch):
    """`wildcheck serve` ends in os.execve(bentoml ...): record the call instead of starting a server."""
    calls = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append((argv, env)))
    return calls


def _serve(*args, env=None):
    from training.cli import app

    return CliRunner().invoke(app, ["serve", *[str(a) for a in args]], env=env)


def _said(result) -> str:
    return " ".join(result.output.split())  # the message, wherever the terminal width wrapped it


@pytest.fixture(scope="module")
def wrong_labels(onnx_model, tmp_path_factory) -> Path:
    """The test model with one label more than its graph has logits: `read_contract` reads it, a worker
    (OnnxModel) refuses it. `read_contract` was all `wildcheck serve` checked."""
    import onnx

    model = onnx.load(str(onnx_model))
    meta = {p.key: p for p in model.metadata_props}
    labels = json.loads(meta["wildcheck.labels"].value)
    thresholds = json.loads(meta["wildcheck.thresholds"].value)
    meta["wildcheck.labels"].value = json.dumps(labels + ["extra"])
    meta["wildcheck.thresholds"].value = json.dumps({**thresholds, "extra": {"block": 0.99, "review": 0.5}})
    out = tmp_path_factory.mktemp("wrong_labels") / "wrong_labels.onnx"
    onnx.save(model, str(out))
    return out


# --- 1: serve checks everything a worker checks, once, before bentoml starts -------------------------------------

def test_serve_refuses_a_model_that_every_worker_would_refuse(wrong_labels, execs):
    result = _serve(wrong_labels, "--port", "3999")
    assert result.exit_code == 2 and "logits" in _said(result), result.output
    assert execs == []  # bentoml never started


def test_serve_checks_the_policy_named_by_the_environment_not_only_the_flag(onnx_model, tmp_path, execs):
    policy = tmp_path / "policy.yaml"
    policy.write_text("classes:\n  no_such_class: {block: 0.5}\n")
    result = _serve(onnx_model, env={"WILDCHECK_POLICY": str(policy)})
    assert result.exit_code == 2 and "no_such_class" in _said(result), result.output
    assert execs == []


def test_serve_passes_a_healthy_setup_on_to_bentoml(onnx_model, execs):
    result = _serve(onnx_model, "--port", "65535", env={"WILDCHECK_MIN_SIDE": "32"})
    assert result.exit_code == 0, result.output
    (argv, env), = execs
    assert argv[-2:] == ["--port", "65535"] and env["WILDCHECK_MODEL"] == str(onnx_model.resolve())


def _bentoml_serve(env: dict, timeout: float = 60.0) -> tuple[int, str]:
    """`bentoml serve serving.service:WildCheck` as the README gives it: its exit status and output, or a failure
    when it is still running after ``timeout`` (a worker restarted forever), its process group stopped."""
    port = __import__("serving.launch", fromlist=["free_port"]).free_port()
    bentoml_cli = str(Path(sys.executable).parent / "bentoml")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("WILDCHECK_")}
    full_env.update(BENTOML_DO_NOT_TRACK="true", PYTHONPATH=str(REPO), WILDCHECK_WORKERS="1", **env)
    proc = subprocess.Popen([bentoml_cli, "serve", "serving.service:WildCheck", "--port", str(port), "--host",
                             "127.0.0.1"], env=full_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        pytest.fail(f"bentoml serve still running after {timeout:.0f} s (workers restarted in a loop):\n{out[-2000:]}")
    return proc.returncode, out


@pytest.mark.slow
def test_plain_bentoml_serve_exits_with_the_message_instead_of_restarting_workers(wrong_labels, tmp_path):
    """Without WILDCHECK_MODEL, or with a model the worker refuses, the worker's start failed and BentoML
    restarted it forever (138 restarts in 10 min; /livez and /readyz hung). The service now opens the model when
    `bentoml serve` imports it, before any worker starts, and BentoML prints the message and exits."""
    home = str(tmp_path / "bentoml")
    rc, out = _bentoml_serve({"BENTOML_HOME": home})
    assert rc != 0 and "set WILDCHECK_MODEL" in out and "Traceback" not in out, out[-2000:]
    rc, out = _bentoml_serve({"BENTOML_HOME": home, "WILDCHECK_MODEL": str(wrong_labels)})
    assert rc != 0 and "logits" in out and "Traceback" not in out, out[-2000:]


# --- 3, 5: options that were ignored or wrapped around -----------------------------------------------------------

def test_serve_refuses_a_model_and_a_registry_together_and_a_name_without_registry(onnx_model, tmp_path, execs):
    registry = _registry(tmp_path / "reg", onnx_model)
    both = _serve(onnx_model, "--registry", registry)
    assert both.exit_code == 2 and "not both" in _said(both), both.output
    name = _serve("--name", "foo", onnx_model)
    assert name.exit_code == 2 and "--registry" in _said(name), name.output
    assert execs == []


@pytest.mark.parametrize("port", ["70000", "0", "-5"])
def test_serve_refuses_a_port_outside_1_to_65535(onnx_model, port, execs):
    """70000 was served on 4464 (70000 mod 65536) while both logs said 70000; -5 was a BentoML traceback."""
    result = _serve(onnx_model, f"--port={port}")
    assert result.exit_code == 2 and "--port" in _said(result), result.output
    assert execs == []


# --- 4, 10: the registry serves only its own models, and says what is wrong -------------------------------------

def _registry(root: Path, model: Path, name: str | None = None, version: str | None = None) -> Path:
    """REGISTRY/<name>/<version>/model.onnx and current -> <version>, as promote lays it out (by hand: no export)."""
    from serving.contract import read_contract

    contract = read_contract(model)
    folder = root / (name or contract.model_name) / (version or contract.model_version)
    folder.mkdir(parents=True)
    shutil.copyfile(model, folder / "model.onnx")
    (folder.parent / "current").symlink_to(folder.name)
    return root


def test_the_registry_serves_its_current_version_resolved(onnx_model, tmp_path):
    from serving.contract import read_contract
    from training.registry import current_model

    registry = _registry(tmp_path / "reg", onnx_model)
    served = current_model(registry)
    assert served.parent.name == read_contract(onnx_model).model_version and not served.parent.is_symlink()


def test_current_pointing_outside_the_registry_is_refused(onnx_model, tmp_path):
    from training.registry import NoCurrentModel, current_model

    registry = _registry(tmp_path / "reg", onnx_model)
    name = next(registry.iterdir()).name
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copyfile(onnx_model, outside / "model.onnx")
    link = registry / name / "current"
    for target in (str(outside), "../../outside"):
        link.unlink()
        link.symlink_to(target)
        with pytest.raises(NoCurrentModel, match="outside") as err:
            current_model(registry)
        assert target in str(err.value)


@pytest.mark.parametrize("name", ["../reg2/x", "/abs/path", "a b"])
def test_a_name_that_is_a_path_is_refused_like_promote_refuses_it(onnx_model, tmp_path, name):
    from serving.errors import InvalidInput
    from training.registry import current_model

    registry = _registry(tmp_path / "reg", onnx_model)
    with pytest.raises(InvalidInput, match="cannot name a folder of the registry"):
        current_model(registry, name)


def test_a_model_that_is_not_the_one_its_folders_name_is_refused(onnx_model, tmp_path):
    from serving.contract import read_contract
    from training.registry import NoCurrentModel, current_model

    contract = read_contract(onnx_model)
    for name, version in (("other-name", None), (None, "1.0.0")):
        registry = _registry(tmp_path / f"reg-{name}-{version}", onnx_model, name=name, version=version)
        with pytest.raises(NoCurrentModel, match="registry folders say") as err:
            current_model(registry)
        assert contract.model_name in str(err.value) and contract.model_version in str(err.value)


@pytest.mark.parametrize("target", ["nosuchversion", "current"])
def test_a_dangling_or_looping_current_names_the_link_target(onnx_model, tmp_path, target):
    from training.registry import NoCurrentModel, current_model

    registry = _registry(tmp_path / "reg", onnx_model)
    name = next(registry.iterdir()).name
    link = registry / name / "current"
    link.unlink()
    link.symlink_to(target)
    for given in (None, name):  # `found none; pass --name`, then `has no current model; promote one`
        with pytest.raises(NoCurrentModel, match=f"-> {target}, which does not exist"):
            current_model(registry, given)


def test_serve_says_what_is_wrong_with_the_registry_or_the_model_path(onnx_model, tmp_path, execs):
    result = _serve("--registry", tmp_path / "nonexistent")
    assert result.exit_code == 2 and "does not exist" in _said(result) and "--name" not in _said(result), result.output
    result = _serve("--registry", onnx_model)
    assert result.exit_code == 2 and "is a file" in _said(result), result.output
    result = _serve(tmp_path)  # a folder given as the model said `does not exist`
    assert result.exit_code == 2 and "is a folder" in _said(result), result.output
    registry = _registry(tmp_path / "reg", onnx_model)
    folder = next(registry.iterdir())
    (folder / "current").unlink()
    (folder / "current").write_text("not a link")
    result = _serve("--registry", registry)
    assert result.exit_code == 2 and "is a file" in _said(result), result.output
    (folder / "current").unlink()
    (folder / "current").symlink_to("empty")
    (folder / "empty").mkdir()
    result = _serve("--registry", registry)
    assert result.exit_code == 2 and "has no model.onnx" in _said(result), result.output
    assert execs == []


# --- 2, 6, 11: promote -------------------------------------------------------------------------------------------

@pytest.fixture
def no_export(monkeypatch):
    """Refusals that need no exported file must come before the ~30 s export."""
    import training.export

    def export(*args, **kwargs):
        raise AssertionError("promote exported before refusing")

    monkeypatch.setattr(training.export, "export", export)


@pytest.mark.parametrize("target", ["nosuchversion", "current"])
def test_promote_does_not_skip_the_gate_when_current_dangles_or_loops(trained_run, tmp_path, target, no_export):
    from training.registry import PromoteRefused, promote

    link = tmp_path / "reg" / "m" / "current"
    link.parent.mkdir(parents=True)
    link.symlink_to(target)
    with pytest.raises(PromoteRefused, match=f"current -> {target}, which does not exist.*--force"):
        promote(trained_run, tmp_path / "reg", name="m")


def test_promote_refuses_cheaply_before_exporting(trained_run, onnx_model, tmp_path, no_export):
    from serving.errors import InvalidInput
    from training.registry import PromoteRefused, promote

    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(InvalidInput, match="is a file"):
        promote(trained_run, afile)
    with pytest.raises(InvalidInput, match="300 characters long"):
        promote(trained_run, tmp_path / "reg", version="x" * 300, force=True)
    for value in ("a b\nc", "\n", "caf\u00e9"):  # folders the message called invalid were made
        with pytest.raises(InvalidInput, match="cannot name a folder"):
            promote(trained_run, tmp_path / "reg", name=value)
    registry = _registry(tmp_path / "reg", onnx_model, name="m", version="1")
    with pytest.raises(PromoteRefused, match="no comparison with the current model"):
        promote(trained_run, registry, name="m", version="2")
    (registry / "m" / "current").unlink()
    (registry / "m" / "current").write_text("a file")
    with pytest.raises(InvalidInput, match="current is a file, not the link"):  # said `is a folder`
        promote(trained_run, registry, name="m", version="2")


@pytest.mark.slow
def test_promote_with_force_replaces_a_dangling_current_and_records_the_full_run_path(trained_run, tmp_path,
                                                                                      monkeypatch):
    from training.registry import current_model, promote

    link = tmp_path / "reg" / "m" / "current"
    link.parent.mkdir(parents=True)
    link.symlink_to("nosuchversion")
    monkeypatch.chdir(trained_run.parent)
    result = promote(Path(trained_run.name), tmp_path / "reg", name="m", version="3", force=True)
    assert result["previous"] == "nosuchversion"
    event = json.loads((tmp_path / "reg" / "m" / "promotions.jsonl").read_text().splitlines()[-1])
    assert event["run"] == str(trained_run.resolve()) and event["forced"] is True
    assert current_model(tmp_path / "reg").parent.name == result["version"]


# --- 7: limits that are positive but absurd -----------------------------------------------------------------------

@pytest.mark.parametrize("name,value,says", [
    ("WILDCHECK_MIN_SIDE", "100000", "from 1 to"),
    ("WILDCHECK_MAX_PIXELS", "1", "at least"),
    ("WILDCHECK_BODY_TIMEOUT_S", "0.0000001", "at least 1"),
    ("WILDCHECK_MAX_BODY_BYTES", "1", "at least 262144"),
    ("WILDCHECK_MAX_DECODE_BYTES", "1", "at least 4194304"),
    ("WILDCHECK_WORKERS", "99999999999999999999999", "from 1 to 64"),
    ("WILDCHECK_THREADS", "100000", "from 1 to 256"),
])
def test_a_positive_but_absurd_limit_refuses_to_start_naming_it_and_its_range(onnx_model, name, value, says, execs):
    """Each of these started, reported ready and refused every request with a 4xx blaming the client."""
    result = _serve(onnx_model, env={name: value})
    assert result.exit_code == 2 and name in _said(result) and says in _said(result), result.output
    assert execs == []


@needs_shipped
def test_a_views_budget_below_one_picture_of_the_model_is_refused(execs):
    from serving.contract import read_contract

    views = read_contract(SHIPPED).tiling.max_views  # 10: the whole photo and up to 9 collage panels
    result = _serve(SHIPPED, env={"WILDCHECK_MAX_BATCH_VIEWS": str(views - 1)})
    assert result.exit_code == 2 and "WILDCHECK_MAX_BATCH_VIEWS" in _said(result) and f"at least {views}" in _said(result)
    assert _serve(SHIPPED, env={"WILDCHECK_MAX_BATCH_VIEWS": str(views)}).exit_code == 0 and len(execs) == 1


def test_limits_under_one_mib_are_not_rounded_to_zero_in_messages():
    import asyncio
    import io

    from PIL import Image

    from serving.imageio import ImageError, decode_image
    from serving.middleware import BodyLimitMiddleware

    buf = io.BytesIO()
    Image.new("RGBA", (200, 200)).save(buf, "PNG")
    with pytest.raises(ImageError) as err:
        decode_image(buf.getvalue(), max_decode_bytes=100_000)  # 200*200*8 = 312.5 KiB needed
    assert "0 MiB" not in err.value.message and "312 KiB" in err.value.message and "97.7 KiB" in err.value.message

    sent = []

    async def app(scope, receive, send):
        raise AssertionError("the app ran")

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"x" * 2000, "more_body": False}

    scope = {"type": "http", "method": "POST", "headers": [(b"content-length", b"2000")]}
    asyncio.run(BodyLimitMiddleware(app, max_bytes=1000)(scope, receive, send))
    body = json.loads(sent[1]["body"])
    assert sent[0]["status"] == 413 and "1000 bytes" in body["error"]["message"], body


# --- 8: build ------------------------------------------------------------------------------------------------------

def _build(model: Path, home: Path, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("WILDCHECK_")}
    full.update(BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="true", PYTHONPATH=str(REPO), **env)
    return subprocess.run([sys.executable, "-m", "training.cli", "build", str(model)], env=full, capture_output=True,
                          text=True, timeout=300, cwd=home.parent)


def test_build_checks_the_settings_before_storing_anything(onnx_model, tmp_path):
    home = tmp_path / "bentoml"
    proc = _build(onnx_model, home, WILDCHECK_WORKERS="0")
    assert proc.returncode == 2 and "WILDCHECK_WORKERS" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not any(home.rglob("model.onnx"))  # nothing was put into the model store


@pytest.mark.slow
def test_build_does_not_freeze_the_builders_settings_into_the_bento_and_says_so(onnx_model, tmp_path):
    """WILDCHECK_WORKERS=7 at build time was written into bento.yaml, yet a Bento serves with the settings of the
    environment it is served in: the record only misled."""
    import yaml

    home = tmp_path / "bentoml"
    proc = _build(onnx_model, home, WILDCHECK_WORKERS="7", WILDCHECK_TIMEOUT_S="500")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "not part of the Bento: WILDCHECK_TIMEOUT_S, WILDCHECK_WORKERS" in " ".join(proc.stdout.split())
    info = yaml.safe_load(next((home / "bentos").rglob("bento.yaml")).read_text())
    config = info["services"][0]["config"]
    assert config["workers"] == 2 and config["traffic"]["timeout"] == 35, config


# --- 9: the launcher's SIGKILL reaches the workers -----------------------------------------------------------------

ARBITER = """
import os, signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # an arbiter that does not leave on SIGTERM
worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
open(sys.argv[1], "w").write(str(worker.pid))  # BentoML's workers sit in process groups of their own
time.sleep(120)
"""


def test_the_launchers_sigkill_also_stops_workers_in_their_own_process_groups(tmp_path):
    import psutil

    from serving.launch import ServerProcess

    pid_file = tmp_path / "worker.pid"
    server = ServerProcess([sys.executable, "-c", ARBITER, str(pid_file)], 1, tmp_path / "log", grace=0.5)
    deadline = time.time() + 30
    while not (pid_file.exists() and pid_file.read_text()) and time.time() < deadline:
        time.sleep(0.1)
    worker = psutil.Process(int(pid_file.read_text()))
    try:
        server.stop()
        assert server.proc.returncode == -signal.SIGKILL
        worker.wait(timeout=10)  # gone, not orphaned and still serving
    finally:
        if worker.is_running() and worker.status() != psutil.STATUS_ZOMBIE:
            worker.kill()
