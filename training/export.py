"""``wildcheck export``: one self-contained ONNX file carrying the model's contract, with parity and INT8 gates.

The file holds the weights (EMA when the run used EMA: ``best.pt`` stores the evaluated weights), a fixed
H x W input with a dynamic batch, and ``wildcheck.*`` metadata (``serving.contract.ModelContract``).
Before the file is written, onnxruntime must agree with PyTorch on real validation images.
"""

from __future__ import annotations

import hashlib
import logging
import random
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import onnx
import torch

import training
from serving.contract import CamOutput, ModelContract
from serving.decision import default_thresholds
from serving.errors import WildcheckError
from serving.runtime import OnnxModel
from training.cam import CAM_OUTPUT, WithCam, cam_unsupported
from training.data.sources import Sample
from training.embedding import EMBEDDING_OUTPUT, l2_normalize, pooled_features, embedding_spec
from training.evaluate import TorchPredictor, _decode, predict_samples, resolve_checkpoint, run_samples
from training.fileio import atomic_path

log = logging.getLogger(__name__)

OPSET = 18
PARITY_MAX_ABS = 1e-4
CAM_PARITY_MAX_ABS = 1e-3  # logit units per location (values of order 1-10); measured ~1e-5


class ExportError(WildcheckError, RuntimeError):
    """The export was refused (parity or accuracy gate); nothing was written."""

    exit_code = 1


def weights_hash(state_dict: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(state_dict):
        h.update(key.encode())
        h.update(state_dict[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def build_contract(state: dict, name: str | None, version: str | None, run_dir: Path,
                   model: torch.nn.Module | None = None) -> ModelContract:
    labels = list(state["labels"])
    negative = (state.get("config") or {}).get("data", {}).get("negative_label", "other")
    # calibrated thresholds when `wildcheck calibrate` ran (train does it), else the documented defaults
    thresholds = state.get("thresholds") or {k: v.model_dump() for k, v in default_thresholds(labels, negative).items()}
    digest = weights_hash(state["model"])[:12]
    human = version or f"{run_dir.name}-e{state['epoch']}"
    return ModelContract(
        labels=labels,
        negative_label=negative,
        preprocessing=state["preprocessing"],
        thresholds=thresholds,
        never_block=list(state.get("never_block", [])),
        temperature=float(state.get("temperature", 1.0)),
        model_name=name or "wildcheck-" + state["architecture"],
        model_version=f"{human}+{digest}",
        architecture=state["architecture"],
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        training_data=state.get("training_data", {}),
        metrics={"val": _slim(state.get("val_metrics", {})), "calibration": state.get("calibration", {})},
        val_curves=state.get("val_curves", {}),
        embedding=embedding_spec(model, state["architecture"]) if model is not None else None,
        decision=state.get("decision_rules"),
        threshold_rules=state.get("threshold_rules", {}),
        negative_scores=state.get("negative_scores"),
        tiling=state.get("tiling"),
        wildcheck_version=training.__version__,
    )


def _slim(metrics: dict) -> dict:
    keep = ("n", "accuracy", "balanced_accuracy", "macro_f1", "nll", "per_class", "confusion_matrix", "labels")
    return {k: metrics[k] for k in keep if k in metrics}


class ExportGraph(torch.nn.Module):
    """What the ONNX file computes: ``logits`` first, then ``cam`` (``training.cam``, when the architecture has
    one linear head on average-pooled features) and ``embedding`` (``training.embedding``), all from one pass
    through the backbone. A wrapped model (a test's tampered ``Sequential``) keeps its own logits, no cam."""

    def __init__(self, model: torch.nn.Module, with_cam: bool):
        super().__init__()
        self.model, self.with_cam = model, with_cam
        self.direct = hasattr(model, "forward_head")
        if not self.direct:
            self.base = next(m for m in model.modules() if hasattr(m, "forward_head"))

    def forward(self, x: torch.Tensor):
        if not self.direct:
            return self.model(x), l2_normalize(pooled_features(self.base, x))
        features = self.model.forward_features(x)
        pooled = self.model.forward_head(features, pre_logits=True)
        head = self.model.get_classifier()
        logits, embedding = head(pooled), l2_normalize(pooled)
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


def write_metadata(src: Path, dst: Path, contract: ModelContract) -> None:
    model = onnx.load(str(src))
    del model.metadata_props[:]
    for key, value in contract.to_metadata().items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    model.producer_name = "wildcheck"
    model.doc_string = f"{contract.model_name} {contract.model_version}: labels {contract.labels}"
    onnx.checker.check_model(model, full_check=True)
    with atomic_path(dst) as tmp:
        onnx.save_model(model, str(tmp), save_as_external_data=False)


def parity_check(torch_pred: TorchPredictor, onnx_path: Path, samples: list[Sample]) -> dict:
    """Max |Δ probability| and top-1 disagreements between PyTorch and onnxruntime on real images."""
    ort_model = OnnxModel(onnx_path, threads=2)
    p_torch, kept, _ = predict_samples(torch_pred, samples, desc="parity (torch)")
    p_ort, kept2, _ = predict_samples(ort_model, kept, desc="parity (onnxruntime)")
    if not kept:
        raise ExportError("no readable validation images for the parity check")
    diff = float(np.abs(p_torch - p_ort).max())
    mismatched = [str(s.path) for s, a, b in zip(kept, p_torch.argmax(1), p_ort.argmax(1)) if a != b]
    return {"images": len(kept), "max_abs_diff": diff, "top1_mismatches": mismatched}


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
    _tamper=None,
) -> dict:
    """Export ``run`` (run dir or checkpoint) to ``out``; with ``int8`` also ``out`` with ``.int8.onnx``.

    Returns a report dict. Raises ``ExportError`` (nothing written) when a gate fails.
    """
    ckpt = resolve_checkpoint(run)
    torch_pred = TorchPredictor(ckpt)
    state = torch_pred.state
    run_dir = ckpt.parent
    contract = build_contract(state, name, version, run_dir, torch_pred.model)
    val, train = run_samples(state, data)
    rng = random.Random(0)
    parity_set = rng.sample(val, min(parity_images, len(val))) if val else []
    out = Path(out)
    report: dict = {"model_version": contract.model_version}
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        model = torch_pred.model if _tamper is None else _tamper(torch_pred.model)
        cam = torch_to_onnx(model, contract.preprocessing.input_size, raw)
        contract = contract.model_copy(update={"cam": cam})
        staged = Path(tmp) / "model.onnx"
        write_metadata(raw, staged, contract)
        parity = parity_check(torch_pred, staged, parity_set)
        report["parity"] = parity
        if parity["max_abs_diff"] > PARITY_MAX_ABS or parity["top1_mismatches"]:
            raise ExportError(
                f"parity gate failed on {parity['images']} validation images: max |Δp| = {parity['max_abs_diff']:.2e} "
                f"(limit {PARITY_MAX_ABS:.0e}), {len(parity['top1_mismatches'])} top-1 mismatches; nothing written"
            )
        if cam is not None:
            pre = contract.preprocessing
            arrays = [pre(img) for img in (_decode(s, pre) for s in parity_set[:8]) if not isinstance(img, str)]
            if arrays:
                parity["cam_max_abs_diff"] = cam_parity(model, staged, arrays)
                if parity["cam_max_abs_diff"] > CAM_PARITY_MAX_ABS:
                    raise ExportError(f"parity gate failed for the cam output: max |Δcam| = "
                                      f"{parity['cam_max_abs_diff']:.2e} (limit {CAM_PARITY_MAX_ABS:.0e}); nothing written")
        with atomic_path(out) as final:
            final.write_bytes(staged.read_bytes())
        report["fp32"] = {"path": str(out), "bytes": out.stat().st_size}
        if int8:
            from training.quantize import quantize_int8

            report["int8"] = quantize_int8(out, train, val, contract, calib_images, int8_max_drop)
    return report
