"""`wildcheck build`: a Bento with the service, the model through BentoML's model store, and the serving packages."""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest
import yaml

from serving.launch import ServerProcess, free_port
from tests.conftest import REPO

WILDCHECK = [sys.executable, "-m", "training.cli"]


def _env(home: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WILDCHECK_")}
    return dict(env, BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="true", PYTHONPATH=str(REPO), **extra)


def test_bentofile_lists_exactly_the_serving_dependencies():
    bentofile = yaml.safe_load((REPO / "serving" / "bentofile.yaml").read_text())
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert bentofile["python"]["packages"] == project["dependencies"]
    assert bentofile["python"]["lock_packages"] is False  # no index at build time
    assert not any(p.split(">")[0].split("=")[0] in ("torch", "timm", "onnx") for p in project["dependencies"])


STORE_SCRIPT = """
import json, sys
from pathlib import Path
import onnx
from serving.bento import BentoBuildError, store_model, use_stored_model
import bentoml

model, tmp = Path(sys.argv[1]), Path(sys.argv[2])
first, again = store_model(model), store_model(model)
tampered = onnx.load(str(model))
for p in tampered.metadata_props:
    if p.key == "wildcheck.created_at":
        p.value = '"2000-01-01T00:00:00Z"'
onnx.save(tampered, str(tmp / "tampered.onnx"))
try:
    store_model(tmp / "tampered.onnx")
    refused = ""
except BentoBuildError as exc:
    refused = str(exc)
gallery = tmp / "refs.gallery"
gallery.write_bytes(b"reference embeddings")
with_gallery = store_model(model, gallery)
env = {}
use_stored_model(bentoml.models.BentoModel(with_gallery), environ=env)
with_embedder = store_model(model, gallery, embedder=model)  # any wildcheck ONNX stands in for the embedder
embedder_env = {}
use_stored_model(bentoml.models.BentoModel(with_embedder), environ=embedder_env)
print(json.dumps({"first": first, "again": again, "refused": refused, "with_gallery": with_gallery,
                  "model_same": Path(env["WILDCHECK_MODEL"]).read_bytes() == model.read_bytes(),
                  "gallery": Path(env["WILDCHECK_GALLERY"]).read_bytes().decode(), "no_embedder": "WILDCHECK_EMBEDDER" not in env,
                  "with_embedder": with_embedder,
                  "embedder_same": Path(embedder_env["WILDCHECK_EMBEDDER"]).read_bytes() == model.read_bytes()}))
"""


def test_model_store_tags_by_version_and_refuses_other_bytes_under_a_tag(onnx_model, tmp_path):
    from serving.contract import read_contract

    version = read_contract(onnx_model).model_version  # "9.9.9+<weights hash>"
    proc = subprocess.run([sys.executable, "-c", STORE_SCRIPT, str(onnx_model), str(tmp_path)],
                          env=_env(tmp_path / "bentoml"), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["first"] == out["again"] == f"wildcheck-tf_efficientnet_lite0:{version.replace('+', '-')}"
    assert f"bentoml models delete {out['first']}" in out["refused"]
    assert out["with_gallery"].startswith(out["first"] + "-g") and out["model_same"]
    assert out["gallery"] == "reference embeddings"
    assert out["no_embedder"] and out["embedder_same"]  # a gallery's embedder travels with it, under its own tag
    assert out["with_embedder"].startswith(out["first"] + "-g") and out["with_embedder"] != out["with_gallery"]


@pytest.mark.slow
def test_build_a_bento_and_serve_it_from_the_model_store(onnx_model, tmp_path):
    from serving.contract import read_contract

    home = tmp_path / "bentoml"
    built = subprocess.run([*WILDCHECK, "build", str(onnx_model)], env=_env(home), capture_output=True, text=True,
                           timeout=300, cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-3000:]
    tag = built.stdout.split("built Bento ")[1].split()[0]
    info = yaml.safe_load(next((home / "bentos").glob(f"{tag.replace(':', '/')}/bento.yaml")).read_text())
    version = read_contract(onnx_model).model_version
    assert info["services"][0]["models"][0]["tag"].endswith(version.replace("+", "-"))
    assert "torch" not in info["image"]["python_requirements"]
    src = {p.name for p in (home / "bentos" / tag.replace(":", "/") / "src" / "serving").glob("*")}
    assert "service.py" in src and not any(name.endswith(".onnx") for name in src)

    port = free_port()
    bentoml_cli = str(Path(sys.executable).parent / "bentoml")
    # WILDCHECK_MODEL points nowhere: the Bento must take its model from the store
    env = _env(home, WILDCHECK_MODEL=str(tmp_path / "nowhere.onnx"))
    env.pop("PYTHONPATH")  # the Bento's own copy of serving/ runs
    argv = [bentoml_cli, "serve", tag, "--port", str(port), "--host", "127.0.0.1"]
    with ServerProcess(argv, port, tmp_path / "serve.log", env=env, cwd=tmp_path, ready_timeout=90) as server:
        photo = REPO / "examples" / "non_ivory_59208.jpg"
        r = httpx.post(server.base + "/v1/check", files={"image": (photo.name, photo.read_bytes(), "image/jpeg")},
                       timeout=30)
        assert r.status_code == 200, r.text + server.log_tail()
        body = r.json()
        assert body["model"]["version"] == version and body["decision"] in ("block", "review", "allow")
        assert body["image"]["sha256"] and body["image"]["width"] == 384
