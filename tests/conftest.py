"""Shared fixtures: synthetic datasets, a dataset of problem files, and one small trained run."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("WILDCHECK_SHARED", REPO.parent / "shared")) / "datasets"

os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
# `make test` runs two pytest-xdist workers on two cores. PyTorch's OpenMP threads spin while they wait for work
# (libgomp's default), so each worker's idle threads burned the cores the other one needed: two workers took as
# long as one (9:08 against 9:12). Threads that sleep instead gave 6:19. Set before anything imports torch;
# servers, notebooks and CLI runs started by the tests inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def shared_dataset(name: str) -> Path:
    path = SHARED / name
    if not path.is_dir():
        pytest.skip(f"{path} not available")
    return path


def photo(seed: int = 0, size=(160, 120)) -> Image.Image:
    """A small RGB picture with structure (gradients + shapes), unlike flat noise."""
    from training.data.synth import make_image

    return make_image("other", seed, max(size)).resize(size)


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def exif_rotated_jpeg(img: Image.Image) -> bytes:
    """Pixels stored rotated, with orientation 6 (rotate 90 CW to display)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = img.transpose(Image.Transpose.ROTATE_90)  # what a phone writes for orientation 6
    return jpeg_bytes(stored, exif=exif.tobytes())


def record_pass_rows(model) -> list[int]:
    """Make an ``OnnxModel`` record the rows of each onnxruntime pass in the returned list (its real session
    stays reachable as ``model.unrecorded``)."""
    session, rows = model.session, []

    class Recording:
        def run(self, outputs, feed, options=None):
            rows.append(len(next(iter(feed.values()))))
            return session.run(outputs, feed, options)

    model.unrecorded, model.session = session, Recording()
    return rows


def write_problem_files(folder: Path, seed: int = 100) -> dict[str, Path]:
    """One file of each kind of trouble, in ``folder``; returns name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    base = photo(seed)
    files = {}
    good = jpeg_bytes(base)
    files["corrupt"] = folder / "corrupt.jpg"
    files["corrupt"].write_bytes(good[: len(good) // 2])
    files["zero"] = folder / "zero.jpg"
    files["zero"].write_bytes(b"")
    files["text"] = folder / "notes.jpg"
    files["text"].write_text("this is not an image, just a text file with a .jpg name\n")
    files["cmyk"] = folder / "cmyk.jpg"
    photo(seed + 1).convert("CMYK").save(files["cmyk"], "JPEG")
    files["png16"] = folder / "gray16.png"
    arr16 = (np.linspace(0, 65535, 120 * 160).reshape(120, 160)).astype(np.uint16)
    Image.fromarray(arr16).save(files["png16"])
    files["alpha"] = folder / "alpha.png"
    rgba = photo(seed + 2).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(files["alpha"])
    files["exif"] = folder / "rotated.jpg"
    files["exif"].write_bytes(exif_rotated_jpeg(photo(seed + 3)))
    return files


def graph_digest(model, input_size: int) -> str:
    """What ``training.export.torch_to_onnx`` turns into a graph: every module's class and plain attributes (in
    eval mode, which the exporter sets), every parameter and buffer, bit for bit, and the input size."""
    import torch

    h = hashlib.sha256(f"input {input_size}".encode())
    for name, module in model.named_modules():
        attrs = sorted((k, repr(v)) for k, v in vars(module).items() if not k.startswith("_") and k != "training")
        h.update(f"{name}|{type(module).__module__}.{type(module).__qualname__}|{attrs}".encode())
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="session", autouse=True)
def export_graph_once():
    """The dynamo export of one graph takes ~20 s here and gives the same file for the same module, weights and
    input size; many tests export the session's one trained run (with another version, INT8, an old checkpoint
    layout, ...). The suite exports each distinct graph once and writes the same bytes for a repeat: the rest of
    the export (contract, parity and INT8 gates, atomic write) runs each time. Exports in a subprocess
    (``wildcheck export``) are not cached."""
    import training.export as export_module

    real, graphs = export_module.torch_to_onnx, {}

    def torch_to_onnx(model, input_size, path):
        key = graph_digest(model, input_size)
        if key not in graphs:
            cam = real(model, input_size, path)
            graphs[key] = (Path(path).read_bytes(), cam)
        data, cam = graphs[key]
        Path(path).write_bytes(data)
        return cam

    export_module.torch_to_onnx = torch_to_onnx
    yield graphs
    export_module.torch_to_onnx = real


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    from training.data.synth import synthesize

    root = tmp_path_factory.mktemp("synth")
    synthesize(root, per_class=16, size=128, seed=1)
    return root


@pytest.fixture(scope="session")
def problem_root(tmp_path_factory, synth_root) -> tuple[Path, dict[str, Path]]:
    """A copy of the synthetic dataset with problem files in train/other and one train image copied into val."""
    root = tmp_path_factory.mktemp("problems") / "data"
    shutil.copytree(synth_root, root)
    files = write_problem_files(root / "train" / "other")
    leaked = sorted((root / "train" / "ivory").glob("*.jpg"))[0]
    files["leak_train"] = leaked
    files["leak_val"] = root / "val" / "ivory" / "leaked_copy.jpg"
    shutil.copy(leaked, files["leak_val"])
    return root, files


def tiny_config(img_size: int = 64, **train):
    from training.config import load_config

    values = {"epochs": 2, "batch_size": 16, "threads": 2, "lr": 2e-3}
    values.update(train)
    return load_config(None, {"train": values, "data": {"img_size": img_size, "num_workers": 0, "cache_workers": 2}})


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, synth_root) -> Path:
    """Three quick epochs on the synthetic data at 64 px, calibrated like `wildcheck train` does (shared by
    evaluation and export tests)."""
    from training.calibrate import calibrate
    from training.train import train

    out = tmp_path_factory.mktemp("run")
    train([str(synth_root)], out, tiny_config(epochs=3))
    calibrate(out)
    return out


@pytest.fixture(scope="session")
def onnx_model(trained_run, tmp_path_factory) -> Path:
    """The trained run exported once (version 9.9.9), for the service tests."""
    from training.export import export

    out = tmp_path_factory.mktemp("onnx_model") / "model.onnx"
    export(trained_run, out, version="9.9.9")
    return out


@pytest.fixture(scope="session")
def service_app(onnx_model, tmp_path_factory):
    """The service in-process (starlette TestClient) with API keys k1/k2, a 2 MB body limit, a CPU queue of 2
    and batches of 4; server errors come back as responses. One per session: BentoML registers its
    Prometheus metrics globally, so a second app in the same process fails with DuplicateTimeseries."""
    from starlette.testclient import TestClient

    from serving.service import build_api
    from serving.settings import Settings

    settings = Settings(model=str(onnx_model), api_keys=frozenset({"k1", "k2"}), max_body_bytes=2_000_000, max_queue=2,
                        max_batch=4, cpu_threads=2)
    old = os.environ.get("BENTOML_HOME")
    os.environ["BENTOML_HOME"] = str(tmp_path_factory.mktemp("bentoml"))
    service = build_api(settings)
    with TestClient(service.to_asgi(), raise_server_exceptions=False) as c:
        c.headers["X-API-Key"] = "k1"
        yield c, service
    if old is None:
        os.environ.pop("BENTOML_HOME", None)
    else:
        os.environ["BENTOML_HOME"] = old
