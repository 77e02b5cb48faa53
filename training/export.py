"""``wildcheck export``: one self-contained ONNX file carrying the model's contract, with parity and INT8 gates.

The file holds the weights (EMA when the run used EMA: ``best.pt`` stores the evaluated weights), a fixed
H x W input with a dynamic batch, and ``wildcheck.*`` metadata (``serving.contract.ModelContract``).
Before the file is written, onnxruntime must agree with PyTorch on real validation images.
"""

from __future__ import annotations

import logging
import random
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

from serving.contract import CamOutput, ModelContract
from serving.errors import InvalidInput, WildcheckError
from serving.runtime import OnnxModel, Predictor
from training.cam import CAM_OUTPUT, WithCam, cam_unsupported
from training.data.sources import Sample
from training.embedding import EMBEDDING_OUTPUT, embedding_features, embedding_spec, l2_normalize
from training.fileio import atomic_onnx_save, atomic_path
from training.names import release_names
from training.outputs import int8_path, out_file
from training.predict import TorchPredictor, decode_sample, predict_samples, resolve_checkpoint, run_samples

log = logging.getLogger(__name__)

OPSET = 18
PARITY_MAX_ABS = 1e-4
CAM_PARITY_MAX_ABS = 1e-3  # logit units per location (values of order 1-10); measured ~1e-5


class ExportError(WildcheckError, RuntimeError):
    """The export was refused: by the parity gate (nothing written) or the INT8 gate (the FP32 model is kept)."""

    exit_code = 1


class ExportGraph(torch.nn.Module):
    """What the ONNX file computes: ``logits`` first, then ``cam`` (``training.cam``, when the architecture has
    one linear head on average-pooled features) and ``embedding`` (``training.embedding``), all from one pass
    through the backbone. ``model`` has timm's classifier interface (a timm model or a ``models.SideBySide``)."""

    def __init__(self, model: torch.nn.Module, with_cam: bool):
        super().__init__()
        self.model, self.with_cam = model, with_cam

    def forward(self, x: torch.Tensor):
        features = self.model.forward_features(x)
        pooled = self.model.forward_head(features, pre_logits=True)
        head = self.model.get_classifier()
        logits, embedding = head(pooled), l2_normalize(embedding_features(self.model, pooled))
        if not self.with_cam:
            return logits, embedding
        cam = torch.einsum("ck,nkhw->nchw", head.weight, features) + head.bias[None, :, None, None]
        return logits, cam, embedding


def torch_to_onnx(model: torch.nn.Module, input_size: int, path: Path) -> CamOutput | None:
    """Dynamo export: fixed H x W (dynamic H/W took ~10 minutes to export for tf_efficientnet_lite0 and ran
    slower), dynamic batch traced with batch 2 (a size-1 dimension is specialised), one file without external data.

    Outputs (``ExportGraph``): ``logits`` first, ``cam`` when the architecture allows it, ``embedding``;
    returns the cam output's description for the contract, or None.
    """
    model = model.cpu().eval()
    dummy = torch.randn(2, 3, input_size, input_size)
    batch = torch.export.Dim("batch", min=1, max=1024)
    reason = cam_unsupported(model)
    if reason:
        log.warning("exporting without class activation maps (explain unavailable): %s", reason)
    graph = ExportGraph(model, with_cam=reason is None).eval()
    names = ["logits"] + ([] if reason else [CAM_OUTPUT]) + [EMBEDDING_OUTPUT]
    cam = None
    if reason is None:
        with torch.inference_mode():
            cam = CamOutput(output=CAM_OUTPUT, shape=list(graph(dummy[:1])[1].shape[1:]))
    torch.onnx.export(
        graph, (dummy,), str(path), input_names=["image"], output_names=names, opset_version=OPSET,
        dynamo=True, external_data=False, dynamic_shapes=({0: batch},),
    )
    return cam


def cam_parity(torch_model: torch.nn.Module, onnx_path: Path, arrays: list[np.ndarray]) -> float:
    """Max |Δ cam| between PyTorch and onnxruntime on a few real images (logit units)."""
    ort_model = OnnxModel(onnx_path, threads=2)
    batch = np.stack(arrays)
    with torch.inference_mode():
        expected = WithCam(torch_model).eval()(torch.from_numpy(batch))[1].numpy()
    return float(np.abs(expected - ort_model.predict_with_cam(batch)[1]).max())


def write_contract(src: Path, dst: Path, contract: ModelContract) -> None:
    """``src`` with ``contract`` in its metadata, checked and written atomically to ``dst``."""
    atomic_onnx_save(contract.write_to(onnx.load(str(src))), dst)


def reference_scores(reference: Predictor, samples: list[Sample]) -> tuple[np.ndarray, list[Sample]]:
    """The reference's (PyTorch's) probabilities on the readable ``samples``, checked before the ~20 s export.
    A model whose outputs are not finite (a diverged training) is refused here: NaN passes every ``>`` test, and
    a NaN score is below every threshold, so served it would allow every photo."""
    p_torch, kept, _ = predict_samples(reference, samples, desc="parity (torch)")
    if not kept:
        raise ExportError("no readable validation images for the parity check")
    bad = int((~np.isfinite(p_torch).all(1)).sum())
    if bad:
        raise ExportError(f"the model's scores are not finite (NaN or inf) on {bad} of {len(kept)} validation images: "
                          "its weights are broken (a diverged training? see the run's history.csv); retrain it, e.g. "
                          "with a lower --set train.lr; nothing written")
    return p_torch, kept


def parity_check(p_torch: np.ndarray, kept: list[Sample], onnx_path: Path) -> dict:
    """Max |Δ probability| and top-1 disagreements between the reference's ``p_torch`` (``reference_scores``) and
    onnxruntime on the same images."""
    ort_model = OnnxModel(onnx_path, threads=2)
    p_ort, _, _ = predict_samples(ort_model, kept, desc="parity (onnxruntime)")
    diff = float(np.abs(p_torch - p_ort).max())
    mismatched = [str(s.path) for s, a, b in zip(kept, p_torch.argmax(1), p_ort.argmax(1)) if a != b]
    return {"images": len(kept), "max_abs_diff": diff, "top1_mismatches": mismatched}


def onnx_out(out: str | Path, example: str, reads: list[str | Path] = ()) -> Path:
    """``--out`` of the export commands, before any work: an ``.onnx`` file path (``out_file``'s rules), so a
    run's ``best.pt``, an image or a dataset file is never written over, nor a model put among the data ``reads``."""
    out = out_file(out, example=example, reads=reads)  # a folder, a path below a file, inside the data
    if out.suffix.lower() != ".onnx":
        raise InvalidInput(f"--out {out}: an exported model is an .onnx file; e.g. --out {out.with_suffix('.onnx')}")
    return out


def _embedder_out(out: str | Path) -> Path:
    """``export-embedder --out``: ``onnx_out``, and an existing file is replaced only when it is an embedder too
    (a trained classifier's ONNX was silently replaced by one that can only embed)."""
    out = onnx_out(out, "embedder.onnx")
    if out.exists():
        from serving.contract import read_contract

        try:
            contract = read_contract(out)
        except Exception as exc:  # not a wildcheck model at all: not ours to replace either
            raise InvalidInput(f"--out {out} exists and is not a wildcheck model ({exc}); name a new file") from exc
        if not contract.is_embedder:
            raise InvalidInput(f"--out {out} is the model {contract.model_name} {contract.model_version}, not an "
                               f"embedder; it would be replaced. Name a new file, e.g. --out "
                               f"{out.with_name(out.stem + '-embedder.onnx')}")
    return out


def export(
    run: str | Path,
    out: str | Path,
    data: list[str] | None = None,
    name: str | None = None,
    version: str | None = None,
    parity_images: int = 128,
    int8: bool = False,
    calib_images: int = 300,
    int8_max_drop: float = 1.0,
) -> dict:
    """Export ``run`` (run dir or checkpoint) to ``out``; with ``int8`` also ``out`` with ``.int8.onnx``.

    Returns a report dict. Raises ``ExportError`` when a gate fails: the parity gate writes nothing; the INT8
    gate keeps the FP32 model. Writing ``out`` removes an INT8 copy an earlier export left beside it (it would be
    another model's). ``out`` must end in ``.onnx``: the run's ``best.pt`` is never written over.
    """
    out = onnx_out(out, "model.onnx")
    release_names(name, version)
    beside = int8_path(out)
    if beside.exists() and not beside.is_file():  # it is replaced after the export: IsADirectoryError at the very end
        raise InvalidInput(f"{beside} is not a file (a folder?): export replaces MODEL.int8.onnx beside --out; move it "
                           "or give another --out")
    ckpt = resolve_checkpoint(run)
    predictor = TorchPredictor(ckpt)
    checkpoint = predictor.checkpoint
    # the data the parity check reads, known now: the model is never written among it (run_samples' roots)
    onnx_out(out, "model.onnx", reads=data or [*checkpoint.data_roots, *checkpoint.config.data.negatives])
    contract = checkpoint.release(name, version, ckpt.parent.name,
                                  embedding=embedding_spec(predictor.model, checkpoint.spec.architecture))
    val, train = run_samples(checkpoint, data)
    parity_set = random.Random(0).sample(val, min(parity_images, len(val))) if val else []
    report, contract = export_module(predictor.model, contract, out, predictor, parity_set)
    stale = int8_path(out)
    if stale.exists():
        stale.unlink()
        report["removed_stale_int8"] = str(stale)
    if int8:
        from training.quantize import quantize_int8

        q = quantize_int8(out, train, val, contract, calib_images, int8_max_drop)
        if not q.accepted:
            raise ExportError(q.reason)
        report["int8"] = q.model_dump(exclude={"accepted", "reason"})
    return report


def export_module(model: torch.nn.Module, contract: ModelContract, out: str | Path, reference: Predictor,
                  parity_set: list[Sample]) -> tuple[dict, ModelContract]:
    """Write ``model`` as ``out`` with ``contract`` (its ``cam`` filled in from the graph) if onnxruntime agrees
    with ``reference`` on ``parity_set``; raises ``ExportError`` and writes nothing otherwise. Returns the
    report and the contract written.

    ``model`` is ``reference``'s own module (or a wrapper of it: an ensemble's, a route's)."""
    out = Path(out)
    report: dict = {"model_version": contract.model_version}
    p_torch, kept = reference_scores(reference, parity_set)
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        cam = torch_to_onnx(model, contract.preprocessing.input_size, raw)
        contract = contract.model_copy(update={"cam": cam})
        staged = Path(tmp) / "model.onnx"
        write_contract(raw, staged, contract)
        parity = parity_check(p_torch, kept, staged)
        report["parity"] = parity
        if not parity["max_abs_diff"] <= PARITY_MAX_ABS or parity["top1_mismatches"]:
            raise ExportError(
                f"parity gate failed on {parity['images']} validation images: max |Δp| = {parity['max_abs_diff']:.2e} "
                f"(limit {PARITY_MAX_ABS:.0e}), {len(parity['top1_mismatches'])} top-1 mismatches; nothing written"
            )
        if cam is not None:
            arrays = [contract.preprocessing(img) for img in (decode_sample(s, contract) for s in parity_set[:8])
                      if not isinstance(img, str)]
            if arrays:
                parity["cam_max_abs_diff"] = cam_parity(model, staged, arrays)
                if not parity["cam_max_abs_diff"] <= CAM_PARITY_MAX_ABS:
                    raise ExportError(f"parity gate failed for the cam output: max |Δcam| = "
                                      f"{parity['cam_max_abs_diff']:.2e} (limit {CAM_PARITY_MAX_ABS:.0e}); nothing written")
        with atomic_path(out) as final:
            final.write_bytes(staged.read_bytes())
    report["fp32"] = {"path": str(out), "bytes": out.stat().st_size}
    return report, contract


def export_embedder(out, arch: str = "tf_efficientnet_lite0", version: str | None = None, tiling: int = 0) -> dict:
    """The ImageNet-pretrained backbone as a self-contained wildcheck ONNX: ``embedding`` from pooled features.

    Its contract has one label (the negative ``other``, never triggered), so served alone it decides by the
    gallery only; it is also what ``gallery_bench.py`` compares the fine-tuned model's embedding against.
    """
    from datetime import datetime, timezone

    import training
    from serving.preprocess import Preprocessing
    from training.checkpoint import weights_hash
    from training.models import create_model, pretrained_data_config

    out = _embedder_out(out)
    release_names(None, version)
    model = create_model(arch, num_classes=1, pretrained="offline").eval()
    cfg = pretrained_data_config(arch)
    pre = Preprocessing(input_size=224, crop_pct=cfg.get("crop_pct", 0.875), interpolation=cfg.get("interpolation", "bicubic"),
                        mean=cfg.get("mean", (0.5, 0.5, 0.5)), std=cfg.get("std", (0.5, 0.5, 0.5)))
    digest = weights_hash(model.state_dict())[:12]
    contract = ModelContract(
        labels=["other"], negative_label="other", preprocessing=pre, thresholds={}, model_name=f"wildcheck-embedder-{arch}",
        model_version=f"{version or 'imagenet'}+{digest}", architecture=arch,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        training_data={"weights": f"ImageNet-1k, offline package for {arch}", "fine_tuned": False},
        metrics={}, embedding=embedding_spec(model, arch, producer="ImageNet-pretrained"),
        wildcheck_version=training.__version__, role="embedder", tiling={"grid": tiling} if tiling else None,
    )
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        torch_to_onnx(model, pre.input_size, raw)
        write_contract(raw, out, contract)
    return {"path": str(out), "model_version": contract.model_version, "bytes": out.stat().st_size}
