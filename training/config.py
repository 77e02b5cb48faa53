"""Training configuration: YAML validated into typed objects with defaults (pydantic)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from serving.errors import InvalidInput, MissingInput
from serving.contract import MAX_INPUT_SIZE, MIN_CROP_PCT, SizeRoute, TestTimeView, one_line
from serving.tiling import Tiling
from serving.yamlio import load_yaml


class _Strict(BaseModel):
    # no NaN or infinity in any number; integers are StrictInt below, so `epochs: true` is refused, not read as 1
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _a_number_is_not_a_switch(cls, value, info):
        # pydantic reads true/false as 1.0/0.0 for a float: `lr: true` trained at lr 1
        if isinstance(value, bool):
            annotation = cls.model_fields[info.field_name].annotation
            if annotation is not bool and bool not in get_args(annotation):
                raise ValueError("is a value, not true/false")
        return value


Positive = Annotated[float, Field(gt=0.0)]


class GreyHeadConfig(_Strict):
    """A second head for photos without colour, fitted after training (``training.grey_head``)."""

    lam: float = Field(1.0, ge=0.0, description="pull toward the trained head (lam * ||W - W0||^2)")
    tolerance: float = Field(1.0, gt=0.0, le=255.0, description="inputs whose colour spread is below this many "
                             "8-bit levels take the grey head")
    pool_sample: StrictInt = Field(2000, ge=0, description="negatives pools' training photos to fit on, drawn evenly")


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
    grey_head: GreyHeadConfig | None = Field(
        None, description="after training, fit a second head on the training photos in grey for inputs without "
        "colour (wildcheck grey-head; written into the model contract); None: one head")


# the bounds a served model's contract accepts (serving.contract); the project trains at 224-320 px, and the
# cache holds every image at img_size / crop_pct
MAX_IMG_SIZE = MAX_INPUT_SIZE


class DataConfig(_Strict):
    img_size: StrictInt = Field(224, ge=32, le=MAX_IMG_SIZE, description=(
        f"model input side in px (32 to {MAX_IMG_SIZE}): every training image is cached in memory at "
        "img_size / crop_pct, so a huge value exhausted memory during caching"))
    crop_pct: float = Field(0.875, ge=MIN_CROP_PCT, le=1.0, description=(
        f"share of the resized picture the centre crop keeps ({MIN_CROP_PCT} to 1; timm's weights use 0.875-1.0): the "
        "resize side is img_size / crop_pct"))
    interpolation: Literal["bicubic", "bilinear", "nearest", "lanczos"] | None = Field(
        None, description="None: what the pretrained weights expect (serving.preprocess knows these four)")
    mean: tuple[float, float, float] | None = None
    std: tuple[Positive, Positive, Positive] | None = None
    negative_label: str = "other"
    min_side: StrictInt = Field(32, ge=1, description="images with a shorter side below this are skipped")
    num_workers: StrictInt | None = Field(
        None, ge=0, description="DataLoader workers; None: 0 on CPU (augmenting cached pixels is cheap), 8 on GPU"
    )
    cache_workers: StrictInt = Field(2, ge=1, description="threads that decode and resize images into the cache")
    balance: Literal["sampler", "loss", "none"] = "sampler"
    negatives: list[str] = Field(
        default_factory=list, description="roots whose images are all the negative label, sampled afresh each epoch"
    )
    negatives_per_epoch: float = Field(
        0.25, ge=0.0, description="negatives drawn per epoch: a count (>= 1) or a ratio of the main training set (< 1)"
    )
    val_negatives: StrictInt = Field(400, ge=0, description="fixed sample of validation negatives, the same every epoch")
    hard_negative_max_weight: float = Field(
        4.0, ge=1.0, description="negatives the model scores as products are drawn up to this many times as often; 1 = off"
    )

    @field_validator("mean", "std", mode="before")
    @classmethod
    def _three_channels(cls, value):
        # pydantic's own word for [0.5, 0.5] was "Field required" (the third item's)
        if isinstance(value, (list, tuple)) and len(value) != 3:
            raise ValueError(f"needs 3 values, one per colour channel (R, G, B), e.g. [0.485, 0.456, 0.406]; "
                             f"got {len(value)}")
        return value

    @field_validator("negatives")
    @classmethod
    def _each_pool_once(cls, roots: list[str]) -> list[str]:
        # `p` and `./p/` are one pool, read once; kept twice here, history.csv's mined_per_pool (one count per pool
        # read) no longer lined up with the roots named
        return distinct_roots(roots)


def distinct_roots(roots: list[str]) -> list[str]:
    """``roots`` without repeats of one folder however it is spelled (the first spelling kept)."""
    seen: dict[Path, str] = {}
    for root in roots:
        seen.setdefault(Path(root).resolve(), root)
    return list(seen.values())


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


def _default_condition_views() -> list[list[AugmentStep]]:
    return [
        [AugmentStep(name="ToGray", p=1.0)],  # an archive print, a filter
        [AugmentStep(name="GaussianBlur", p=1.0, params={"blur_limit": [3, 7]}),  # a phone in poor light
         AugmentStep(name="GaussNoise", p=1.0, params={"std_range": [0.03, 0.08]})],
        [AugmentStep(name="RandomResizedCrop", p=1.0, params={"scale": [0.2, 0.35], "ratio": [0.8, 1.25]})],  # close-up
        [AugmentStep(name="Downscale", p=1.0, params={"scale_range": [0.25, 0.4]})],  # a thumbnail blown up
        [AugmentStep(name="Transpose", p=1.0)],  # a quarter turn and a mirror (mirrors are trained anyway)
        [AugmentStep(name="ImageCompression", p=1.0, params={"quality_range": [10, 30]})],
        [AugmentStep(name="Watermark", p=1.0)],
        [AugmentStep(name="TextOverlay", p=1.0)],
    ]


class ConsistencyConfig(_Strict):
    """Paired views (consistency regularisation, as AugMix's or UDA's): each picture of an unmixed batch is also
    shown under one listing condition, a view of ``views`` picked at random and applied to the augmented
    picture, and that view's prediction is pulled towards the picture's own (KL divergence to the detached
    prediction, times ``weight``). Augmentation alone teaches a label per view; this asks for the same answer
    for the photo and the photo in greyscale, blurred, cropped, shrunk... Costs a second forward and backward
    pass on the unmixed batches."""

    weight: float = Field(0.0, ge=0.0, description="0: off")
    views: list[list[AugmentStep]] = Field(
        default_factory=_default_condition_views,
        description="each view a short list of steps (every one applied); one view is drawn per picture")

    @model_validator(mode="after")
    def _views_when_on(self):
        if self.weight > 0 and not self.views:
            raise ValueError("consistency.weight > 0 needs at least one view")
        return self


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
    epochs: StrictInt = Field(8, ge=1)
    batch_size: StrictInt = Field(32, ge=1, description="images per step and process; training needs at least 2 "
                                  "(check_batch_size)")
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
    consistency: ConsistencyConfig = ConsistencyConfig()
    grad_clip: float | None = Field(2.0, gt=0.0)
    ema: bool = True
    ema_decay: float | None = Field(None, gt=0.0, lt=1.0, description="None: sized to the run's number of steps")
    early_stopping_patience: StrictInt | None = Field(4, ge=1)
    amp: bool = Field(True, description="bf16/fp16 autocast on CUDA")
    cpu_bf16: bool = Field(
        False, description="bf16 autocast on CPUs with native bf16 (AVX512-BF16/AMX): ~1.36x per step in "
        "isolation; opt-in until Met ivory runs show it costs no accuracy",
    )
    channels_last: bool = True
    threads: StrictInt | None = Field(None, ge=1, description="torch CPU threads; None: all cores")
    seed: StrictInt = Field(42, ge=0, lt=2**32, description="numpy takes seeds in [0, 2**32)")
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
    negative_weights: dict[str, Annotated[float, Field(ge=0.0)]] | None = Field(
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
    test_time_views: list[TestTimeView] = Field(
        default_factory=list, description="also score these copies of every input and average the logits (hflip, "
        "vflip, rot90, rot180, rot270): test-time augmentation inside the exported graph, one more forward pass "
        "each; written into the model contract, so calibration and serving do the same",
    )
    size_route: SizeRoute | None = Field(
        None, description="read blurred or noisy inputs at a smaller size (serving.contract.SizeRoute), inside the "
        "exported graph; written into the model contract, so calibration and serving do the same",
    )


class Config(_Strict):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    decision: DecisionConfig = DecisionConfig()


def _read_yaml(path: Path) -> dict[str, Any]:
    if path.is_dir():  # "not found" sent the user looking for a folder that is there
        raise InvalidInput(f"config {path} is a folder, not a YAML file: give the config file itself (--config "
                           f"{path / 'config.yaml'}, or a run's RUN_DIR/config.yaml)")
    if not path.is_file():
        raise MissingInput(f"config {path} not found")
    try:
        raw = load_yaml(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"config {path} is not a UTF-8 text file ({exc.reason} at byte {exc.start}): save it as "
                           "UTF-8 YAML") from exc
    except yaml.YAMLError as exc:
        raise InvalidInput(f"config {path} is not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise InvalidInput(f"config {path} must be a mapping of sections (model, data, augment, train)")
    for key in Config.model_fields:  # `train: [1, 2]` was replaced by the defaults when a flag merged into it
        _section(raw, (key,), f" {path}")
    return raw


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", bool: "true/false", int: "a number", float: "a number"}.get(
        type(value), type(value).__name__)


def _section(node: dict[str, Any], path: tuple[str, ...], where: str, why: str = "") -> dict[str, Any]:
    """``node[path[-1]]`` as a section: a mapping, or {} where it is absent or empty (``train:``); anything else is
    refused, naming it (merging into it used to replace it with {}, so the section's settings vanished silently)."""
    value = node.get(path[-1])
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidInput(f"invalid config{where}: {'.'.join(path)} should be a mapping of settings (KEY: VALUE "
                           f"lines under it), not {_kind(value)} ({value!r:.60}){why}")
    return value


def _merge(raw: dict[str, Any], overrides: dict[str, Any], where: str = "",
           prefix: tuple[str, ...] = ()) -> dict[str, Any]:
    """``overrides`` merged into a copy of ``raw``, section by section; a None override keeps the value. A section
    of ``raw`` that an override merges into must be a mapping (or empty)."""
    merged = dict(raw)
    for key, value in overrides.items():
        if isinstance(value, dict):
            merged[key] = _merge(_section(merged, prefix + (key,), where), value, where, prefix + (key,))
        elif value is not None:
            merged[key] = value
    return merged


def _validate(raw: dict[str, Any], where: str, named: dict[tuple[str, ...], str] | None = None) -> Config:
    """``raw`` as a Config. ``named``: what the user typed for a setting (``--set train.lr=0``, ``--epochs 0``), so
    an error in it names that, in one line, rather than pydantic's location in a dump."""
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        for err in exc.errors():  # name the --set or flag the user typed, not pydantic's location
            for path, item in (named or {}).items():
                if tuple(err["loc"][: len(path)]) == path:
                    raise InvalidInput(f"{item}: {err['msg']}") from exc
        raise InvalidInput(f"invalid config{where}: {config_problems(exc)}") from exc


def _keys_at(loc: tuple) -> tuple[str, list[str]] | None:
    """(the section's dotted name, its keys) for the section holding ``loc``'s last key; None past a list or a value."""
    model: type[BaseModel] = Config
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list of sections (augment.train's steps): the same model
            continue
        field_info = model.model_fields.get(part)
        inner = _sections_in(field_info.annotation) if field_info else []
        if not inner:
            return None
        model = inner[0]
    return ".".join(map(str, loc[:-1])) or "the config", list(model.model_fields)


def _sections_in(annotation: Any) -> list[type[BaseModel]]:
    """The section models an annotation holds, through Optional and lists (``list[list[AugmentStep]]``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _sections_in(arg)]


def config_problems(exc: ValidationError) -> str:
    """A config's validation errors in one line, as ``--set`` words them: a key that is no setting (a typo: ``trian:``,
    ``lrr:``) names the keys its section has; any other problem is ``section.key: message`` (pydantic's own text
    spans several lines per problem, with a link)."""
    typos, others = [], []
    for err in exc.errors():
        keys = _keys_at(tuple(err["loc"])) if err["type"] == "extra_forbidden" and err["loc"] else None
        if keys is None:
            others.append(err)
            continue
        section, valid = keys
        kind = "section" if section == "the config" else "key"
        typos.append(f"{section} has no {kind} {err['loc'][-1]!r}; {kind}s: {', '.join(valid)}")
    rest = one_line(ValidationError.from_exception_data(exc.title, others)) if others else ""
    return "; ".join(typos + ([rest] if rest else []))


def load_config(path: str | Path | None = None, overrides: dict[str, dict[str, Any]] | None = None) -> Config:
    """Read YAML (or take the defaults), apply overrides such as ``{"train": {"epochs": 3}}`` (None: keep)."""
    raw = _read_yaml(Path(path)) if path is not None else {}
    where = f" {path}" if path else ""
    return _validate(_merge(raw, overrides or {}, where), where)


def parse_set(item: str) -> tuple[tuple[str, ...], Any]:
    """``"train.mixup.prob=0"`` -> ``(("train", "mixup", "prob"), 0)``; the value is read as YAML (numbers,
    true/false, null, [lists], {maps}). The key must name a setting of :class:`Config`: a typo is refused here,
    with the keys that exist, instead of being ignored."""
    key, sep, text = item.partition("=")
    path = tuple(part.strip() for part in key.split("."))
    if not sep or len(path) < 2 or not all(path):
        raise InvalidInput(f"--set {item!r}: write SECTION.KEY=VALUE, e.g. --set train.lr=0.0005")
    model: type[BaseModel] = Config
    for depth, part in enumerate(path):
        if part not in model.model_fields:
            where = ".".join(path[:depth]) or "the config"
            raise InvalidInput(f"--set {item}: {where} has no key {part!r}; keys: {', '.join(model.model_fields)}")
        annotation = model.model_fields[part].annotation
        inner = [a for a in (get_args(annotation) or (annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if depth < len(path) - 1:
            if not inner:
                section = ".".join(path[: depth + 1])
                raise InvalidInput(f"--set {item}: {section} is a value, not a section; set it whole")
            model = inner[0]
    try:
        value = load_yaml(text)
    except yaml.YAMLError as exc:
        raise InvalidInput(f"--set {item}: the value is not valid YAML ({exc.problem})") from exc
    return path, value


def _assign(raw: dict[str, Any], path: tuple[str, ...], value: Any, where: str = "", item: str = "") -> dict[str, Any]:
    """A copy of ``raw`` with the value at ``path`` replaced (a map or None too: a --set replaces, never merges).
    The sections on the way must be mappings (or absent): one that is not is refused, not replaced."""
    raw = dict(raw)
    node = raw
    for depth, part in enumerate(path[:-1]):
        why = f"; --set {item} sets a key inside it" if item else ""
        node[part] = dict(_section(node, path[: depth + 1], where, why))
        node = node[part]
    node[path[-1]] = value
    return raw


def _leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a dumped config; lists (augmentation steps, freeze, negatives) compare whole."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        out.update(_leaves(value, f"{prefix}.{key}" if prefix else key))
    return out


class ConfigConflict(InvalidInput):
    """``--resume`` was asked for settings that differ from the saved run's."""


# what a resumed run may change: its length (the lr schedule is rebuilt for it) and where and how fast it runs.
# Everything else made the weights, optimizer, sampler and cached pixels that last.pt restores or rebuilds, so it
# must match: the batch size too (the schedule, EMA and sampler count the run's steps of that batch).
RESUMABLE = ("train.epochs", "train.device", "train.threads", "train.compile", "data.num_workers", "data.cache_workers")


@dataclass
class SavedRun:
    config: Config
    path: Path  # where it was read: RUN_DIR/last.pt, or RUN_DIR/config.yaml for a run without one

    @classmethod
    def of_checkpoint(cls, checkpoint: Any, path: Path) -> SavedRun:
        """The config stored in a loaded last.pt (``path``)."""
        raw = checkpoint.get("config") if isinstance(checkpoint, dict) else None
        if not isinstance(raw, dict):
            raise InvalidInput(f"{path} holds no config: it is not a last.pt that `wildcheck train` wrote; start a new "
                               "run without --resume")
        return cls(_validate(raw, f" saved in {path}"), path)


# what to do about a last.pt that cannot be read: resuming needs it whole
UNREADABLE_LAST = ("it cannot be resumed: start the run again without --resume, or fine-tune from the run's best.pt "
                   "in a new run (--init-from RUN_DIR --out NEW_DIR)")


def saved_run(run_dir: str | Path) -> SavedRun | None:
    """The configuration a resumed run continues: the one stored in ``RUN_DIR/last.pt``, with which the state it
    restores was made. ``config.yaml`` is a copy for people to read (edited or deleted, it used to decide what a
    resumed run trained with); it stands in only where there is no last.pt, and resuming then stops at that."""
    last, written = Path(run_dir) / "last.pt", Path(run_dir) / "config.yaml"
    if last.is_file():
        from training.fileio import load_checkpoint

        return SavedRun.of_checkpoint(load_checkpoint(last, advice=UNREADABLE_LAST), last)
    return SavedRun(load_config(written), written) if written.is_file() else None


def resume_conflicts(saved: Config, asked: Config) -> list[str]:
    """``key: saved X, asked Y`` for each setting outside ``RESUMABLE`` that differs (keys either side has)."""
    kept, wanted = _leaves(saved.model_dump(mode="json")), _leaves(asked.model_dump(mode="json"))
    keys = [k for k in dict.fromkeys([*kept, *wanted]) if k not in RESUMABLE and kept.get(k) != wanted.get(k)]
    return [f"{k}: saved {kept.get(k)!r}, asked {wanted.get(k)!r}" for k in keys]


def check_resume(saved: SavedRun, asked: Config, run_dir: str | Path) -> None:
    """Refuse a resume whose settings differ from the saved run's beyond ``RESUMABLE``, naming them."""
    conflicts = resume_conflicts(saved.config, asked)
    if conflicts:
        raise ConfigConflict(
            f"--resume continues the run saved in {saved.path}, and what was asked differs from it "
            f"({'; '.join(conflicts[:8])}); a resumed run may change only {', '.join(RESUMABLE)}. Drop those options "
            f"(and --config), and undo edits to {Path(run_dir) / 'config.yaml'} or delete it, to resume as saved; or "
            f"start a new run in another --out (--init-from {run_dir} fine-tunes from this run's weights)"
        )


BATCH_OF_ONE = ("must be at least 2 to train: BatchNorm layers cannot train on a batch of one image where a feature "
                "map is 1 x 1 (img_size 32); under torchrun it is each process's batch")


def check_batch_size(config: Config, label: str | None = None) -> None:
    """Training takes at least 2 images per step and process (a batch of one crashed in BatchNorm in the first step,
    after caching). Checked when a run is set up, not in the schema: checkpoints of earlier runs still load.
    ``label``: what set it, as typed (``--batch-size 1``)."""
    if config.train.batch_size < 2:
        raise InvalidInput(f"{label or f'train.batch_size {config.train.batch_size}'}: {BATCH_OF_ONE}")


def check_schedule(config: Config, named: dict[tuple[str, ...], str] | None = None) -> None:
    """The warmup ends before the run does: ``train.warmup_epochs`` >= ``train.epochs`` (``--epochs 2`` on a config
    written for 20 epochs with 5 of warmup) trained the whole run at an lr still rising towards ``train.lr``, the
    cosine decay never begun, without a word. Checked when a run is set up, like ``check_batch_size``."""
    tc, named = config.train, named or {}
    if tc.warmup_epochs >= tc.epochs:
        asked = " and ".join(named[k] for k in (("train", "warmup_epochs"), ("train", "epochs")) if k in named)
        raise InvalidInput(f"{asked + ': ' if asked else ''}train.warmup_epochs {tc.warmup_epochs:g} is not shorter "
                           f"than train.epochs {tc.epochs}: the whole run would be warmup, its lr never reaching "
                           f"train.lr and never decaying; set a shorter warmup (--set train.warmup_epochs="
                           f"{min(0.5, tc.epochs / 4):g}) or more epochs")


@dataclass
class ResolvedConfig:
    config: Config
    notes: list[str] = field(default_factory=list)  # what the user should know (warm start's epochs)


def resolve_config(config_file: str | Path | None = None, *, run_dir: str | Path | None = None, resume: bool = False,
                   warm_start: bool = False, epochs: int | None = None, img_size: int | None = None,
                   batch_size: int | None = None, negatives: Sequence[str | Path] = (),
                   sets: Sequence[str] = ()) -> ResolvedConfig:
    """The run's configuration from everything that can set it, in one place.

    A new run: ``config_file`` (or the defaults), then ``--epochs/--img-size/--batch-size``, then each
    ``--set SECTION.KEY=VALUE`` (later wins), validated together; ``negatives`` are appended to
    ``data.negatives`` (once each). A warm start (``--init-from``) without ``epochs`` trains half the epochs.

    ``resume``: the config saved in ``RUN_DIR/last.pt`` is the configuration (a resumed run must be the run that was
    saved; see :func:`saved_run`). What was asked besides -- ``config_file``, else ``RUN_DIR/config.yaml`` as it is
    now, then the options -- is resolved the same way and must agree with it outside ``RESUMABLE``: a differing
    value is refused, naming the key, instead of being dropped or trained with. Epochs: ``--epochs`` (or
    ``--set train.epochs``) extends the run; otherwise it keeps its saved number (a warm start's halved one
    included), whatever a config file says.
    """
    flags = {"train": {"epochs": epochs, "batch_size": batch_size}, "data": {"img_size": img_size}}
    parsed = [parse_set(item) for item in sets]
    saved = saved_run(run_dir) if resume and run_dir is not None else None
    where = f" {config_file}" if config_file else ""
    written = Path(run_dir) / "config.yaml" if run_dir is not None else None
    if saved is not None and config_file is None:
        if written.is_file():  # as the user may have edited it
            raw, where = _read_yaml(written), f" {written}"
        else:  # deleted: the run's own settings, written back by train
            raw, where = saved.config.model_dump(mode="json"), f" saved in {saved.path}"
    else:
        raw = _read_yaml(Path(config_file)) if config_file is not None else {}
    raw = _merge(raw, flags, where)
    for (path, value), item in zip(parsed, sets):
        raw = _assign(raw, path, value, where, item)
    named = {("train", "epochs"): f"--epochs {epochs}", ("train", "batch_size"): f"--batch-size {batch_size}",
             ("data", "img_size"): f"--img-size {img_size}"}
    named = {path: label for path, label in named.items() if flags[path[0]][path[1]] is not None}
    named.update({path: f"--set {item}" for (path, _), item in zip(parsed, sets)})  # a later --set wins over a flag
    config = _validate(raw, where, named)
    check_batch_size(config, named.get(("train", "batch_size"),
                                       f"train.batch_size {config.train.batch_size}{' in' + where if where else ''}"))
    config.data.negatives = distinct_roots(config.data.negatives + [str(n) for n in negatives])
    notes = []
    asked_epochs = epochs is not None or any(path == ("train", "epochs") for path, _ in parsed)
    if saved is not None:
        check_resume(saved, config, run_dir)
        if not asked_epochs and config.train.epochs != saved.config.train.epochs:
            notes.append(f"resuming for the run's {saved.config.train.epochs} epochs, not the {config.train.epochs} "
                         f"of{where}; --epochs {config.train.epochs} for those")
        config.train.epochs = config.train.epochs if asked_epochs else saved.config.train.epochs  # not a file's
    elif warm_start and not asked_epochs:
        config.train.epochs = max(2, config.train.epochs // 2)
        notes.append(f"warm start: {config.train.epochs} epochs (half the config's; --epochs to change)")
    check_schedule(config, named)
    return ResolvedConfig(config, notes)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
