"""The service as a Bento: the model (and gallery) travel through BentoML's model store, tagged with the version.

``wildcheck build MODEL.onnx`` puts the ONNX file into the model store as ``<model_name>:<model_version>`` and
runs ``bentoml build --arg model=<tag>`` on ``serving/bentofile.yaml``. The Bento keeps that argument, so when
it is served (``bentoml serve <bento>``, a container, BentoCloud) the service finds its model in the store. The
``WILDCHECK_*`` settings are not part of a Bento: it serves with those of the environment it is served in.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import bentoml

from serving.errors import MissingInput, WildcheckError

BENTOFILE = Path(__file__).with_name("bentofile.yaml")
MODEL_FILE = "model.onnx"
GALLERY_FILE = "gallery"  # + the gallery's own suffix
EMBEDDER_FILE = "embedder.onnx"


class BentoBuildError(WildcheckError, RuntimeError):
    """``bentoml build`` or the model store refused; the message says what to do."""


def _tag_part(text: str) -> str:
    """BentoML tags allow lowercase letters, digits, ``-``, ``_`` and ``.``: '1.0.0+ab12' -> '1.0.0-ab12'."""
    part = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    if not part:
        raise BentoBuildError(f"{text!r} gives an empty BentoML tag part; export the model with --name/--version")
    return part[:63]


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _servable(path: Path):
    """The file opened as the server opens it (``serving.runtime.OnnxModel``): labels against logits, input size,
    finite scores on a plain picture."""
    from serving.runtime import OnnxModel

    return OnnxModel(path, threads=1)


def store_model(model: str | Path, gallery: str | Path | None = None, embedder: str | Path | None = None) -> str:
    """Put the ONNX file (and gallery, and the embedder it was built with) into BentoML's model store as
    ``name:version[-g<gallery (+ embedder) hash>]``.

    Returns the tag. The same files again reuse the stored model; other bytes under the same tag are refused.
    """
    model = Path(model)
    contract = _servable(model).contract  # a file the server would refuse stops here, not at serve time
    if gallery is not None and not Path(gallery).is_file():
        raise MissingInput(f"gallery {gallery} does not exist")
    if gallery is None and (contract.is_embedder or not contract.thresholds):
        raise BentoBuildError(f"{model} has no protected class to flag (a model from `wildcheck export-embedder`?): "
                              "served alone it would allow every photo. Build the classifier from `wildcheck export`, "
                              "or give --gallery for an embedder-only service")
    if embedder is not None:
        if gallery is None:
            raise BentoBuildError(f"an embedder ({embedder}) only serves a gallery: give --gallery too")
        if _servable(Path(embedder)).embedding_output is None:
            raise BentoBuildError(f"{embedder} has no embedding output: give a model from `wildcheck export-embedder`")
    version = _tag_part(contract.model_version)
    digest = _sha256(model)
    if gallery:  # the same model with another gallery is another stored model
        gallery_digest = _sha256(Path(gallery))
        if embedder is not None:  # another embedder is another stored model too
            gallery_digest = hashlib.sha256(f"{gallery_digest}+{_sha256(Path(embedder))}".encode()).hexdigest()
        version, digest = f"{version}-g{gallery_digest[:8]}", f"{digest}+{gallery_digest}"
    tag = f"{_tag_part(contract.model_name)}:{version}"
    try:
        existing = bentoml.models.get(tag)
    except bentoml.exceptions.NotFound:
        existing = None
    if existing is not None:
        if existing.info.metadata.get("sha256") == digest:
            return tag
        raise BentoBuildError(f"the model store already holds {tag} with other files; remove it with "
                              f"`bentoml models delete {tag}` or export the new model with another --version")
    metadata = {"sha256": digest, "model_file": MODEL_FILE, "model_version": contract.model_version,
                "labels": contract.labels, "precision": contract.precision}
    if gallery:
        metadata["gallery_file"] = GALLERY_FILE + Path(gallery).suffix
    if embedder:
        metadata["embedder_file"] = EMBEDDER_FILE
    with bentoml.models.create(tag, labels={"project": "wildcheck"}, metadata=metadata) as stored:
        shutil.copyfile(model, stored.path_of(MODEL_FILE))
        if gallery:
            shutil.copyfile(gallery, stored.path_of(metadata["gallery_file"]))
        if embedder:
            shutil.copyfile(embedder, stored.path_of(EMBEDDER_FILE))
    return tag


def build_bento(model: str | Path, gallery: str | Path | None = None, embedder: str | Path | None = None) -> str:
    """Store the model, then ``bentoml build`` the service around it; returns the Bento tag."""
    model_tag = store_model(model, gallery, embedder)
    build_ctx = BENTOFILE.parent.parent  # the folder holding serving/: the checkout, or site-packages
    bentoml_cli = shutil.which("bentoml", path=str(Path(sys.executable).parent)) or shutil.which("bentoml")
    if not bentoml_cli:
        raise BentoBuildError("the bentoml command was not found; install wildcheck with its dependencies")
    cmd = [bentoml_cli, "build", "-f", str(BENTOFILE), "--arg", f"model={model_tag}", "--label",
           f"model={model_tag.replace(':', '_')}", "-o", "tag", str(build_ctx)]
    # the service imported during the build must use the stored model, and the builder's WILDCHECK_* settings
    # must not be recorded in bento.yaml: they never apply (the service reads its settings from the environment
    # where the Bento is served), so recorded they would only mislead (settings_not_frozen)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WILDCHECK_")}
    env["BENTOML_DO_NOT_TRACK"] = os.environ.get("BENTOML_DO_NOT_TRACK", "true")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    tags = re.findall(r"__tag__:(\S+)", proc.stdout)
    if proc.returncode != 0 or not tags:
        raise BentoBuildError(f"bentoml build failed (exit {proc.returncode}):\n{proc.stderr.strip() or proc.stdout.strip()}")
    return tags[-1]


def settings_not_frozen(environ=os.environ) -> list[str]:
    """The ``WILDCHECK_*`` variables set in ``environ`` at build time, none of which the Bento keeps.

    A Bento serves with the settings (workers, limits, API keys, policy) of the environment it is served in: the
    service is built from that environment when ``bentoml serve`` imports it, whatever bento.yaml records. So the
    build leaves them out of bento.yaml (it records the defaults) and ``wildcheck build`` names the ones it saw.
    """
    from serving.settings import VARIABLES

    return sorted(k for k in VARIABLES if environ.get(k))


def stored_model_ref() -> bentoml.models.BentoModel | None:
    """The model a Bento was built with (Bento argument ``model``), or None outside a Bento."""
    tag = getattr(bentoml.use_arguments(), "model", None)
    return bentoml.models.BentoModel(tag) if tag else None


def use_stored_model(ref: bentoml.models.BentoModel | None, environ=os.environ) -> None:
    """Point ``WILDCHECK_MODEL`` (and ``WILDCHECK_GALLERY``) at the Bento's files in the model store.

    A Bento serves the model it was built with; outside a Bento (``ref`` None) the environment decides.
    """
    if ref is None:
        return
    stored = ref.resolve()
    environ["WILDCHECK_MODEL"] = stored.path_of(stored.info.metadata.get("model_file", MODEL_FILE))
    gallery_file = stored.info.metadata.get("gallery_file")
    if gallery_file:
        environ["WILDCHECK_GALLERY"] = stored.path_of(gallery_file)
    embedder_file = stored.info.metadata.get("embedder_file")
    if embedder_file:
        environ["WILDCHECK_EMBEDDER"] = stored.path_of(embedder_file)
