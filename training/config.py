"""Training configuration: YAML validated into typed objects with defaults (pydantic)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from serving.errors import InvalidInput, MissingInput
from serving.tiling import Tiling


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class ModelConfig(_Strict):
    name: str = "tf_efficientnet_lite0"
    pretrained: str = Field("offline", description="none | offline | hub | path to a state dict")
    drop_rate: float = Field(0.2, ge=0.0, lt=1.0)
    drop_path_rate: float = Field(0.05, ge=0.0, lt=1.0)
    freeze: list[str] = Field(
        default_factory=list,
        description="submodules kept at their pretrained weights and BatchNorm statistics (e.g. conv_stem, bn1, "
        "blocks.0): no backward pass through them, the largest saving on CPU, where early high-resolution "
        "layers dominate a training step",
    )


class DataConfig(_Strict):
    img_size: int = Field(224, ge=32)
    crop_pct: float = Field(0.875, gt=0.0, le=1.0)
    interpolation: str | None = Field(None, description="None: what the pretrained weights expect")
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    negative_label: str = "other"
    min_side: int = Field(32, ge=1, description="images with a shorter side below this are skipped")
    num_workers: int | None = Field(
        None, ge=0, description="DataLoader workers; None: 0 on CPU (augmenting cached pixels is cheap), 8 on GPU"
    )
    cache_workers: int = Field(2, ge=1, description="threads that decode and resize images into the cache")
    balance: Literal["sampler", "loss", "none"] = "sampler"
    negatives: list[str] = Field(
        default_factory=list, description="roots whose images are all the negative label, sampled afresh each epoch"
    )
    negatives_per_epoch: float = Field(
        0.25, ge=0.0, description="negatives drawn per epoch: a count (>= 1) or a ratio of the main training set (< 1)"
    )
    val_negatives: int = Field(400, ge=0, description="fixed sample of validation negatives, the same every epoch")
    hard_negative_max_weight: float = Field(
        4.0, ge=1.0, description="negatives the model scores as products are drawn up to this many times as often; 1 = off"
    )


class AugmentStep(_Strict):
    name: str
    p: float | None = None
    params: dict[str, Any] = {}


def _default_augment() -> list[AugmentStep]:
    return [
        AugmentStep(name="RandomResizedCrop", params={"scale": [0.35, 1.0], "ratio": [0.75, 1.333]}),
        # listing scenes with photos from the negatives pool (training/realism.py): collages, small in a
        # screenshot frame, objects cut out onto clutter / photos onto plain backdrops; after the crop so
        # the image stays whole; a no-op without a negatives pool
        AugmentStep(name="ListingScene", p=0.35),
        AugmentStep(name="HorizontalFlip", p=0.5),
        AugmentStep(name="RandomRotate90", p=0.2),
        AugmentStep(name="Affine", p=0.3, params={"rotate": [-12, 12], "fill": 255}),
        AugmentStep(name="ColorJitter", p=0.7, params={"brightness": 0.3, "contrast": 0.3, "saturation": 0.3, "hue": 0.04}),
        AugmentStep(name="ToGray", p=0.2),
        # listing-photo realism (training/realism.py), for every class alike so none becomes a shortcut
        AugmentStep(name="TextOverlay", p=0.15),
        AugmentStep(name="Watermark", p=0.1),
        AugmentStep(name="Border", p=0.1),
        AugmentStep(name="Collage", p=0.05),
        AugmentStep(name="ScreenshotFrame", p=0.05),
        AugmentStep(name="SmallBlurry", p=0.05),
        # then what cameras and re-uploads do to every picture
        AugmentStep(name="GaussianBlur", p=0.1, params={"blur_limit": [3, 5]}),
        AugmentStep(name="ImageCompression", p=0.3, params={"quality_range": [30, 90]}),
    ]


class AugmentConfig(_Strict):
    train: list[AugmentStep] = Field(default_factory=_default_augment)


class MixupConfig(_Strict):
    """timm's Mixup/CutMix on a share of the training batches (regularisation for small datasets)."""

    prob: float = Field(0.5, ge=0.0, le=1.0, description="share of batches mixed; 0 turns mixing off")
    mixup_alpha: float = Field(0.2, ge=0.0, description="Beta(alpha, alpha) for mixup; 0 disables mixup")
    cutmix_alpha: float = Field(1.0, ge=0.0, description="Beta(alpha, alpha) for CutMix; 0 disables CutMix")
    switch_prob: float = Field(0.5, ge=0.0, le=1.0, description="with both on: share of mixed batches using CutMix")

    @model_validator(mode="after")
    def _one_kind_on(self):
        if self.prob > 0 and self.mixup_alpha == 0 and self.cutmix_alpha == 0:
            raise ValueError("mixup.prob > 0 needs mixup_alpha or cutmix_alpha > 0")
        return self


class TrainConfig(_Strict):
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.02, ge=0.0)
    layer_decay: float | None = Field(
        0.9, gt=0.0, le=1.0, description="layer-wise lr decay (timm): each block towards the stem trains at this "
        "factor of the next one's lr, keeping early pretrained features closer to ImageNet; None: one lr",
    )
    warmup_epochs: float = Field(0.5, ge=0.0)
    min_lr_ratio: float = Field(0.01, ge=0.0, le=1.0)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    mixup: MixupConfig = MixupConfig()
    grad_clip: float | None = Field(2.0, gt=0.0)
    ema: bool = True
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0, description="None: sized to the run's number of steps")
    early_stopping_patience: int | None = Field(4, ge=1)
    amp: bool = Field(True, description="bf16/fp16 autocast on CUDA")
    cpu_bf16: bool = Field(
        False, description="bf16 autocast on CPUs with native bf16 (AVX512-BF16/AMX): ~1.36x per step in "
        "isolation; opt-in until Met ivory runs show it costs no accuracy",
    )
    channels_last: bool = True
    threads: int | None = Field(None, ge=1, description="torch CPU threads; None: all cores")
    seed: int = 42
    device: str = "auto"
    lr_scaling: Literal["none", "linear", "sqrt"] = Field(
        "none", description="under torchrun: scale lr by the number of processes (effective batch grows with it)"
    )
    compile: bool = Field(False, description="torch.compile the model (GPU runs; slow to start)")


class DecisionConfig(_Strict):
    block_precision: float = Field(0.98, gt=0.0, le=1.0, description="block where validation precision reaches this")
    review_recall: float = Field(0.95, gt=0.0, le=1.0, description="review from where validation recall reaches this")
    max_flag_rate: float | None = Field(
        None, ge=0.0, le=1.0, description="traffic budget: at most this share of the negatives' validation images "
        "goes to review or block; raises thresholds over the targets (the budget wins, the conflict is reported); None: off",
    )
    max_block_rate: float | None = Field(
        None, ge=0.0, le=1.0, description="traffic budget: at most this share of the negatives' validation images is blocked; None: off"
    )
    negative_weights: dict[str, float] | None = Field(
        None, description="traffic mix for the budgets: weight per negatives pool, named by its root folder (e.g. "
        "generic-products; the main dataset's own negatives under its root's name); pools not named count 0; "
        "None: every validation negative counts the same",
    )
    never_block: list[str] = Field(default_factory=list, description="classes that always go to review")
    calibrate: bool = Field(True, description="fit temperature and thresholds on validation after training")
    tiling: Tiling | None = Field(
        None, description="score the whole picture and a grid x grid of tiles, keep the highest score per protected "
        "class (collages, shelves); written into the model contract, so calibration and serving do the same",
    )

    @model_validator(mode="after")
    def _weights_not_negative(self):
        if self.negative_weights and any(w < 0 for w in self.negative_weights.values()):
            raise ValueError("negative_weights must be >= 0")
        return self


class Config(_Strict):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    decision: DecisionConfig = DecisionConfig()


def load_config(path: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Read YAML (or take the defaults), apply CLI overrides such as ``{"train": {"epochs": 3}}``."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MissingInput(f"config {path} not found")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise InvalidInput(f"config {path} must be a mapping of sections (model, data, augment, train)")
    for section, values in (overrides or {}).items():
        raw.setdefault(section, {})
        raw[section].update({k: v for k, v in values.items() if v is not None})
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise InvalidInput(f"invalid config{f' {path}' if path else ''}:\n{exc}") from exc


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
