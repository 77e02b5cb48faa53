"""`pip install wildcheck` serves without the training stack: proved in a Python where torch & co cannot be imported."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from training.cli import TRAIN_MODULES

# torch, torchvision, timm, albumentations, sklearn, onnx, scipy, matplotlib, imagehash, ...: all of `.[train]`
BLOCKED = tuple(sorted(TRAIN_MODULES))
# Installed first thing in the child interpreter (sitecustomize): these imports fail as if never installed.
BLOCKER = f"""
import sys

class _TrainingStackBlocker:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (serving-only install)", name=name)
        return None

sys.meta_path.insert(0, _TrainingStackBlocker())
"""


@pytest.fixture(scope="module")
def serving_only_env(tmp_path_factory):
    site = tmp_path_factory.mktemp("serving_only")
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WILDCHECK_")}
    env.update(PYTHONPATH=os.pathsep.join([str(site), str(REPO)]), BENTOML_DO_NOT_TRACK="true",
               BENTOML_HOME=str(site / "bentoml"))
    return env


def _run(env, *args, code=None):
    argv = [sys.executable, *(["-c", code] if code else ["-m", "training.cli", *args])]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, cwd=REPO)


def test_the_blocker_blocks(serving_only_env):
    proc = _run(serving_only_env, code="import torch")
    assert proc.returncode != 0 and "serving-only install" in proc.stderr


def test_service_answers_a_real_photo_without_the_training_stack(serving_only_env, onnx_model):
    photo = REPO / "examples" / "ivory_13342.jpg"
    code = f"""
import json, sys
from starlette.testclient import TestClient
import serving.service as service
import training.registry  # `wildcheck serve --registry` resolves the current model without torch
with TestClient(service.WildCheck.to_asgi()) as client:
    r = client.post("/v1/check", files={{"image": ("a.jpg", open({str(photo)!r}, "rb"), "image/jpeg")}})
loaded = sorted(m for m in sys.modules if m.partition(".")[0] in {BLOCKED!r} + ("training",))
print(json.dumps({{"status": r.status_code, "body": r.json(), "loaded": loaded}}))
"""
    env = dict(serving_only_env, WILDCHECK_MODEL=str(onnx_model), WILDCHECK_WORKERS="1")
    proc = _run(env, code=code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["status"] == 200, out
    assert out["body"]["decision"] in ("block", "review", "allow")
    assert out["body"]["image"]["width"] == 384 and set(out["body"]["scores"]) >= {"ivory", "other"}
    # the explicit import and the light modules it needs (file writes, the release-name rule), nothing else
    assert out["loaded"] == ["training", "training.fileio", "training.names", "training.registry"]


def test_serving_commands_work_and_training_commands_say_what_to_install(serving_only_env, tmp_path):
    for command in ("serve", "scan", "build"):
        proc = _run(serving_only_env, command, "--help")
        assert proc.returncode == 0, proc.stderr
        assert "Usage" in proc.stdout
    proc = _run(serving_only_env, "train", "--data", str(tmp_path), "--out", str(tmp_path / "run"))
    assert proc.returncode == 2
    assert "install wildcheck[train]" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_serving_never_imports_training_or_its_stack():
    offenders = {}
    for path in sorted((REPO / "serving").glob("*.py")):
        bad = {m for m in _imported_modules(path) if m.partition(".")[0] in TRAIN_MODULES | {"training"}}
        if bad:
            offenders[path.name] = sorted(bad)
    assert not offenders, f"serving must not import training or the training stack: {offenders}"


def test_the_ast_check_sees_lazy_imports(tmp_path):
    lazy = tmp_path / "lazy.py"
    lazy.write_text("def f():\n    from training.export import export\n    import torch.nn\n")
    assert _imported_modules(lazy) == {"training.export", "torch.nn"}
