"""Static INT8 (QDQ, per-channel, U8 activations / S8 weights) with an accuracy gate.

U8S8 is the combination that is faster than FP32 on AVX2 without VNNI (ORT's default S8S8 is not;
benchmarks/export_bench.py measures FP32 vs INT8); dynamic quantization is several times slower for CNNs;
calibrate on real training images after ``quant_pre_process``.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process
from pydantic import BaseModel

from serving.contract import ModelContract
from serving.imageio import ImageError, decode_image
from serving.runtime import OnnxModel
from training.data.sources import Sample
from training.outputs import int8_path
from training.fileio import atomic_onnx_save
from training.metrics import compute_metrics
from training.predict import predict_samples


class _Reader(CalibrationDataReader):
    def __init__(self, arrays: list[np.ndarray], input_name: str, batch: int = 8):
        self.batches = [np.stack(arrays[i : i + batch]) for i in range(0, len(arrays), batch)]
        self.input_name = input_name
        self.pos = 0

    def get_next(self):
        if self.pos >= len(self.batches):
            return None
        self.pos += 1
        return {self.input_name: self.batches[self.pos - 1]}


def _calibration_arrays(samples: list[Sample], contract: ModelContract, n: int) -> list[np.ndarray]:
    pre = contract.preprocessing
    arrays = []
    for sample in random.Random(0).sample(samples, len(samples)):
        try:
            img, _ = decode_image(sample.path, draft_size=pre.draft_size)
        except (ImageError, OSError):
            continue
        arrays.append(pre(img))
        if len(arrays) >= n:
            break
    return arrays


def _metrics(model: OnnxModel, samples: list[Sample], labels: list[str]) -> dict | None:
    """Validation metrics of ``model``; None when no image could be read."""
    probs, kept, _ = predict_samples(model, samples, desc=f"val ({model.contract.precision})")
    if not kept:
        return None
    index = {label: i for i, label in enumerate(labels)}
    return compute_metrics(np.array([index[s.label] for s in kept]), probs, labels)


class Int8Report(BaseModel):
    """The INT8 attempt: accepted (file written) or refused, with the accuracies that decided it."""

    accepted: bool
    reason: str | None = None  # why it was refused
    calibration_images: int = 0
    val_images: int = 0
    fp32_balanced_accuracy: float | None = None
    int8_balanced_accuracy: float | None = None
    drop_points: float | None = None
    path: str | None = None
    bytes: int | None = None


def quantize_int8(fp32_path: Path, train: list[Sample], val: list[Sample], contract: ModelContract,
                  calib_images: int = 300, max_drop_points: float = 1.0,
                  method: CalibrationMethod = CalibrationMethod.MinMax) -> Int8Report:
    """Write ``<fp32>.int8.onnx`` next to ``fp32_path`` unless val balanced accuracy drops too much."""
    if not train:
        return Int8Report(accepted=False, reason="no training images to calibrate INT8 on; pass --data")
    if not val:
        return Int8Report(accepted=False, reason="no validation images to check INT8 accuracy on; pass --data")
    if calib_images < 1:
        return Int8Report(accepted=False, reason=f"--calib-images {calib_images}: calibrate INT8 on 1 image or more "
                          "(a few hundred is right)")
    arrays = _calibration_arrays(train, contract, calib_images)
    if not arrays:  # quantize_static raised "No data is collected." (a traceback)
        return Int8Report(accepted=False, reason=f"none of the {len(train)} training images could be read to "
                          "calibrate INT8 on; check them with `wildcheck data check`, or pass --data")
    out = int8_path(fp32_path)
    with tempfile.TemporaryDirectory() as tmp:
        prepped = Path(tmp) / "prepped.onnx"
        quant_pre_process(str(fp32_path), str(prepped), skip_symbolic_shape=True)  # its symbolic pass fails on the embedding output's ReduceL2 shapes; ONNX shape inference suffices for a fixed-size CNN
        q = Path(tmp) / "q.onnx"
        quantize_static(
            str(prepped), str(q), _Reader(arrays, "image"), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=method,
        )
        quantized = onnx.load(str(q))
        fp32_metrics = _metrics(OnnxModel(fp32_path, threads=2), val, contract.labels)
        if fp32_metrics is None:  # compute_metrics raised "no images to evaluate" (a traceback)
            return Int8Report(accepted=False, calibration_images=len(arrays), reason=f"none of the {len(val)} "
                              "validation images could be read to check INT8 accuracy on; check them with "
                              "`wildcheck data check`, or pass --data")
        staged = Path(tmp) / "int8.onnx"
        int8_contract = contract.model_copy(update={"precision": "int8"})
        atomic_onnx_save(int8_contract.write_to(quantized), staged)
        int8_metrics = _metrics(OnnxModel(staged, threads=2), val, contract.labels)
        drop = 100.0 * (fp32_metrics["balanced_accuracy"] - int8_metrics["balanced_accuracy"])
        report = Int8Report(
            accepted=drop <= max_drop_points, calibration_images=len(arrays), val_images=fp32_metrics["n"],
            fp32_balanced_accuracy=fp32_metrics["balanced_accuracy"],
            int8_balanced_accuracy=int8_metrics["balanced_accuracy"], drop_points=drop,
        )
        if not report.accepted:
            report.reason = (
                f"INT8 refused: val balanced accuracy drops by {drop:.2f} points "
                f"({fp32_metrics['balanced_accuracy']:.4f} -> {int8_metrics['balanced_accuracy']:.4f}), "
                f"over the limit of {max_drop_points} points; keep the FP32 model"
            )
            return report
        final_contract = int8_contract.model_copy(
            update={"metrics": {**contract.metrics, "int8_val": {k: int8_metrics[k] for k in
                                                                  ("n", "accuracy", "balanced_accuracy", "macro_f1")},
                                "fp32_val_same_images": {k: fp32_metrics[k] for k in
                                                         ("n", "accuracy", "balanced_accuracy", "macro_f1")}}})
        atomic_onnx_save(final_contract.write_to(quantized), out)
    report.path, report.bytes = str(out), out.stat().st_size
    return report
