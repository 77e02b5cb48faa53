"""``best.pt`` as a type: the model's spec beside its weights, so no reader re-derives fields from a loose dict.

Saved as plain containers (the spec's JSON dump, tensors) so ``torch.load(weights_only=True)`` reads it.
``Checkpoint.from_dict`` also reads the loose layout of earlier runs: ``_upgrade`` is the one place that knows it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydantic import ValidationError

import training
from serving.contract import EmbeddingSpec, ModelContract, ModelSpec, one_line
from serving.decision import default_thresholds
from serving.errors import InvalidInput
from serving.preprocess import Preprocessing
from training.config import Config
from training.fileio import atomic_torch_save, load_checkpoint

FORMAT = 2
PUBLISHED_METRICS = ("n", "accuracy", "balanced_accuracy", "macro_f1", "nll", "per_class", "confusion_matrix", "labels")


class CheckpointError(InvalidInput):
    """The file is not a wildcheck checkpoint (or one this version cannot read)."""


def weights_hash(state_dict: dict[str, Any]) -> str:
    """sha256 over the tensors in key order: the version suffix that tells two trainings apart."""
    h = hashlib.sha256()
    for key in sorted(state_dict):
        h.update(key.encode())
        h.update(state_dict[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def published_metrics(val_metrics: dict, calibration: dict | None = None) -> dict:
    """What the spec (and so the ONNX metadata) carries of the metrics: the validation summary without
    the bulky parts, and the calibration summary."""
    return {"val": {k: val_metrics[k] for k in PUBLISHED_METRICS if k in val_metrics}, "calibration": calibration or {}}


def initial_spec(config: Config, labels: list[str], preprocessing: Preprocessing, training_data: dict) -> ModelSpec:
    """A run's spec before calibration: the documented default thresholds, temperature 1."""
    negative = config.data.negative_label
    return ModelSpec(labels=labels, negative_label=negative, preprocessing=preprocessing,
                     thresholds=default_thresholds(labels, negative), architecture=config.model.name,
                     training_data=training_data, tiling=config.decision.tiling,
                     test_time_views=config.decision.test_time_views, size_route=config.decision.size_route)


@dataclass
class Head:
    """A linear head's weights (classes x features, classes): a checkpoint's grey head (``ModelSpec.grey_route``)."""

    weight: Any  # torch.Tensor
    bias: Any

    def to_dict(self) -> dict:
        return {"weight": self.weight, "bias": self.bias}

    @classmethod
    def from_dict(cls, raw: dict | None) -> "Head | None":
        return None if raw is None else cls(weight=raw["weight"], bias=raw["bias"])


@dataclass
class Checkpoint:
    """Inference weights (EMA when the run used EMA) with their spec and the run they came from."""

    spec: ModelSpec
    weights: dict[str, Any]  # a state_dict
    epoch: int
    val_metrics: dict[str, Any]
    config: Config
    data_roots: list[str]
    init_from: str | None = None
    ema: bool = False
    wildcheck_version: str = training.__version__
    grey_head: Head | None = None  # read by inputs without colour when the spec has a grey route

    def __post_init__(self):
        if (self.spec.grey_route is None) != (self.grey_head is None):
            raise CheckpointError("a grey route needs a grey head and a grey head a route: the spec has "
                                  f"{'a' if self.spec.grey_route else 'no'} route, the checkpoint "
                                  f"{'a' if self.grey_head is not None else 'no'} grey head")

    def to_dict(self) -> dict:
        return {"format": FORMAT, "spec": self.spec.model_dump(mode="json"), "model": self.weights, "epoch": self.epoch,
                "val_metrics": self.val_metrics, "config": self.config.model_dump(mode="json"),
                "data_roots": list(self.data_roots), "init_from": self.init_from, "ema": self.ema,
                "wildcheck_version": self.wildcheck_version,
                "grey_head": self.grey_head.to_dict() if self.grey_head is not None else None}

    def weights_hash(self) -> str:
        """The version suffix: the weights', and the grey head's when there is one."""
        extra = {f"grey_head.{k}": v for k, v in self.grey_head.to_dict().items()} if self.grey_head is not None else {}
        return weights_hash({**self.weights, **extra})

    def save(self, path: str | Path) -> None:
        atomic_torch_save(self.to_dict(), path)

    @classmethod
    def load(cls, path: str | Path) -> "Checkpoint":
        return cls.from_dict(load_checkpoint(path), source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "checkpoint") -> "Checkpoint":
        try:
            if not isinstance(raw, dict):  # a tensor or list saved as best.pt: raw.get was an AttributeError
                raise TypeError(f"it holds a {type(raw).__name__}, not a checkpoint's dict")
            if raw.get("format") != FORMAT:
                raw = _upgrade(raw)
            return cls(spec=ModelSpec.model_validate(raw["spec"]), weights=raw["model"], epoch=int(raw["epoch"]),
                       val_metrics=raw["val_metrics"], config=Config.model_validate(raw["config"]),
                       data_roots=list(raw["data_roots"]), init_from=raw["init_from"], ema=bool(raw["ema"]),
                       wildcheck_version=raw["wildcheck_version"], grey_head=Head.from_dict(raw.get("grey_head")))
        except (KeyError, TypeError, ValidationError) as exc:
            detail = one_line(exc) if isinstance(exc, ValidationError) else f"{type(exc).__name__}: {exc}"
            raise CheckpointError(f"{source} is not a readable wildcheck checkpoint ({detail}); "
                                  "pass a run dir or the best.pt that `wildcheck train` wrote") from exc

    def release(self, name: str | None, version: str | None, run_name: str,
                embedding: EmbeddingSpec | dict | None = None) -> ModelContract:
        """The contract an export of these weights carries (outputs other than logits are added by the export)."""
        human = version or f"{run_name}-e{self.epoch}"
        return ModelContract(
            **dict(self.spec), model_name=name or "wildcheck-" + self.spec.architecture,
            model_version=f"{human}+{self.weights_hash()[:12]}",
            created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            wildcheck_version=training.__version__, embedding=embedding,
        )


def _upgrade(raw: dict) -> dict:
    """The loose layout of earlier runs (no ``format`` key; also ``last.pt``): the spec's fields at the top
    level, ``decision_rules`` for ``decision``, the calibration summary beside the validation metrics, and
    thresholds absent until calibration (then the documented defaults apply)."""
    config = Config.model_validate(raw["config"] if "config" in raw else {})
    labels, negative = list(raw["labels"]), config.data.negative_label
    val_metrics = raw.get("val_metrics") or {}
    spec = {
        "labels": labels, "negative_label": negative, "preprocessing": raw["preprocessing"],
        "thresholds": raw.get("thresholds") or default_thresholds(labels, negative),
        "never_block": raw.get("never_block") or [], "temperature": raw.get("temperature", 1.0),
        "architecture": raw["architecture"], "training_data": raw.get("training_data") or {},
        "metrics": published_metrics(val_metrics, raw.get("calibration")),
        "tiling": raw.get("tiling"), "val_curves": raw.get("val_curves") or {}, "decision": raw.get("decision_rules"),
        "threshold_rules": raw.get("threshold_rules") or {}, "negative_scores": raw.get("negative_scores"),
    }
    return {"format": FORMAT, "spec": spec, "model": raw["model"], "epoch": raw.get("epoch", 0),
            "val_metrics": val_metrics, "config": config.model_dump(mode="json"), "data_roots": raw.get("data_roots") or [],
            "init_from": raw.get("init_from"), "ema": raw.get("ema") is True,
            "wildcheck_version": raw.get("wildcheck_version", "unknown")}
