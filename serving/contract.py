"""The model contract: everything serving needs, read from the ONNX file's ``metadata_props``.

Written and read here (``ModelContract.write_to`` / ``from_metadata``) so the two cannot drift. Values are
JSON strings under ``wildcheck.*`` keys so that any ONNX tool can show them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

from serving.decision import ClassThresholds
from serving.errors import WildcheckError
from serving.preprocess import Preprocessing
from serving.thresholds import TrafficScores
from serving.tiling import Tiling

METADATA_PREFIX = "wildcheck."
CONTRACT_VERSION = 1
# calibration keeps T in [0.25, 20]; at 1e300 (or inf) every score is 1/classes and no photo is ever flagged
MAX_TEMPERATURE = 100.0
# the one bound for training (training.config's img_size and crop_pct) and serving. A file asking for more made every
# request resize a photo to input_size / crop_pct px a side (crop_pct 0.001 at 64 px: 64,000 px, ~16 GB)
MAX_INPUT_SIZE = 1024
MIN_CROP_PCT = 0.5
REQUIRED_KEYS = (
    "labels",
    "preprocessing",
    "thresholds",
    "model_name",
    "model_version",
    "architecture",
    "created_at",
    "training_data",
    "metrics",
    "wildcheck_version",
)


class ContractError(WildcheckError, ValueError):
    """The file is not a wildcheck model, or its contract is incomplete."""


EXPORT_AGAIN = "export the run again (`wildcheck export RUN_DIR --out MODEL.onnx`)"


def one_line(exc: ValidationError, most: int = 3) -> str:
    """A validation error as one line: ``field.path: message`` for the first ``most`` problems (pydantic's own
    text spans several lines per problem, with the offending input and a link)."""
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) + ": " if err["loc"] else ""
        value = err.get("input")
        got = f" (got {value!r})" if isinstance(value, (int, float)) or (isinstance(value, str) and len(value) <= 40) else ""
        problems.append(where + err["msg"].removeprefix("Value error, ") + (got if err["type"] != "value_error" else ""))
    more = f" (and {len(problems) - most} more)" if len(problems) > most else ""
    return "; ".join(problems[:most]) + more


class CamOutput(BaseModel):
    """The graph output holding class activation maps (``training.cam``); absent in older files."""

    output: str = "cam"
    shape: list[int] = Field(description="per image: [classes (in label order), rows, cols] over the centre crop")


class EmbeddingSpec(BaseModel):
    """The graph's embedding output: L2-normalised vectors that reference galleries compare (cosine = dot)."""

    model_config = ConfigDict(extra="allow")

    output: str = "embedding"
    size: int = Field(gt=0)
    normalized: bool = True
    producer: str = Field(description="what computed it, e.g. the fine-tuned backbone's pooled features")


TestTimeView = Literal["hflip", "vflip", "rot90", "rot180", "rot270"]
"""A copy of the input a model also scores (``ModelSpec.test_time_views``): mirrored left-right or top-bottom,
or turned by 90/180/270 degrees (counter-clockwise)."""


class GreyRoute(BaseModel):
    """Photos without colour are scored by a head of their own (``ModelSpec.grey_route``): the backbone is one, its
    pooled features are read by a second linear head fitted on the training photos shown in grey
    (``wildcheck grey-head``). Computed inside the exported graph: nothing to do for serving, no extra cost."""

    tolerance: float = Field(1.0, gt=0.0, le=255.0, description="an input whose colour spread -- the mean over its "
                             "pixels of (largest - smallest channel), in 8-bit levels, after preprocessing -- is below "
                             "this takes the grey head")
    fitted: dict[str, Any] = Field(default_factory=dict, description="how the grey head was fitted (photos, pull to "
                                   "the trained head)")


class SizeRoute(BaseModel):
    """Blurred or noisy inputs are read at a smaller input size (``ModelSpec.size_route``). A photo blown up from a
    thumbnail, or a phone photo's blur and sensor noise, has no detail at the model's own size; read smaller, it is
    sharper and less noisy for the same receptive fields (the members trained 20 epochs at 256 px before their
    320 px fine-tune). Measured on the preprocessed input's luma in 8-bit levels (``training.models.SizeRouted``):
    ``detail`` = mean absolute gradient at 1/2 scale over that at 1/4 (near 0.5 for a smooth picture, ~0.8 for a
    sharp photo) and ``noise`` = the median absolute diagonal Haar detail at full scale / 0.6745 (Donoho's
    estimate of the noise's standard deviation). Computed inside the exported graph, each input read once at the
    size its route gives: nothing to do for serving, no extra cost (a routed read costs (size/input)^2 of one)."""

    model_config = ConfigDict(extra="forbid")

    MIN_SIZE: ClassVar[int] = 32
    size: int = Field(256, ge=MIN_SIZE, description="input size (px) a routed input is resized to, antialiased bilinear")
    detail_below: float = Field(0.6, ge=0.0, le=2.0, description="route an input whose detail ratio is below this")
    noise_above: float = Field(2.0, gt=0.0, le=255.0, description="route an input whose noise estimate (levels) is above this")


class DecisionRules(BaseModel):
    """The rules the model's thresholds were solved with (a policy overrides some and re-solves)."""

    block_precision: float = Field(0.98, gt=0.0, le=1.0)
    review_recall: float = Field(0.95, gt=0.0, le=1.0)
    max_flag_rate: float | None = Field(None, ge=0.0, le=1.0)
    max_block_rate: float | None = Field(None, ge=0.0, le=1.0)
    negative_weights: dict[str, float] | None = None


class ModelSpec(BaseModel):
    """What a trained model is and how to decide with it: one type from ``best.pt`` to the ONNX metadata.

    Training writes it into the checkpoint, calibration returns an updated copy, export extends it into a
    ``ModelContract``; both predictors (checkpoint and ONNX) answer with it."""

    model_config = ConfigDict(protected_namespaces=())

    labels: list[str] = Field(min_length=1)
    negative_label: str = "other"
    preprocessing: Preprocessing
    thresholds: dict[str, ClassThresholds]
    never_block: list[str] = []
    temperature: float = Field(1.0, gt=0.0, le=MAX_TEMPERATURE, allow_inf_nan=False,
                               description="logits are divided by it before the softmax")
    architecture: str
    training_data: dict[str, Any] = Field(default_factory=dict, description="fingerprint of the training images")
    metrics: dict[str, Any] = Field(default_factory=dict, description="validation metrics and the calibration summary")
    tiling: Tiling | None = Field(None, description="score the whole picture and a grid of tiles or a collage's panels (serving.tiling)")
    val_curves: dict[str, dict[str, list[float]]] = Field(
        default_factory=dict, description="calibrated validation scores per class (pos/neg), to re-solve a policy"
    )
    decision: DecisionRules | None = Field(None, description="targets and budgets the thresholds were solved with; None: unknown (older model)")
    threshold_rules: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="per class, the rule that set each threshold (serving.thresholds.RULES)"
    )
    negative_scores: TrafficScores | None = Field(
        None, description="the validation negatives' scores per pool, to re-solve traffic budgets in a policy"
    )
    test_time_views: list[TestTimeView] = Field(
        default_factory=list, description="copies of each input the model also scores, logits averaged (test-time "
        "augmentation): computed inside the exported graph, one more forward pass per view; empty: the input alone"
    )

    grey_route: GreyRoute | None = Field(
        None, description="colour-free inputs scored by a second head fitted on grey training photos; None: one head")
    size_route: SizeRoute | None = Field(
        None, description="blurred or noisy inputs read at a smaller input size (inside the graph); None: every input at its own size")

    @model_validator(mode="after")
    def _preprocessing_gives_finite_inputs(self):
        # std 0 or a non-finite mean made every input NaN (every request a 500); a negative std turned the input
        # negative (scores for another picture, decided on as if right)
        pre = self.preprocessing
        if not all(math.isfinite(s) and s > 0 for s in pre.std):
            raise ValueError(f"preprocessing.std {list(pre.std)} must be finite and above 0")
        if not all(math.isfinite(m) for m in pre.mean):
            raise ValueError(f"preprocessing.mean {list(pre.mean)} must be finite")
        if pre.input_size > MAX_INPUT_SIZE or pre.crop_pct < MIN_CROP_PCT:
            raise ValueError(f"preprocessing input_size {pre.input_size} / crop_pct {pre.crop_pct}: give at most "
                             f"{MAX_INPUT_SIZE} px and a crop_pct of {MIN_CROP_PCT} or more (as training does)")
        return self

    @model_validator(mode="after")
    def _route_reads_smaller(self):
        if self.size_route is not None and self.size_route.size >= self.preprocessing.input_size:
            raise ValueError(f"size_route.size {self.size_route.size} must be below the input size "
                             f"{self.preprocessing.input_size}: a route reads blurred photos smaller")
        return self

    @model_validator(mode="after")
    def _views_once_each(self):
        if len(set(self.test_time_views)) != len(self.test_time_views):
            raise ValueError(f"test_time_views names a view twice: {self.test_time_views}")
        return self

    @model_validator(mode="after")
    def _thresholds_name_known_labels(self):
        blank = [label for label in self.labels if not label.strip()]
        if blank:
            raise ValueError(f"labels name a class with an empty name: {self.labels}")
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"labels name a class twice: {self.labels}")
        unknown = set(self.thresholds) - set(self.labels)
        if unknown:
            raise ValueError(f"thresholds name labels the model does not have: {sorted(unknown)}")
        if self.negative_label not in self.labels:
            raise ValueError(f"negative_label {self.negative_label!r} is not one of the labels {self.labels}: "
                             "every other class would be protected")
        unknown = set(self.never_block) - set(self.labels)
        if unknown:
            raise ValueError(f"never_block names labels the model does not have: {sorted(unknown)}")
        return self

    @model_validator(mode="after")
    def _every_protected_class_has_thresholds(self):
        # a class without thresholds is never flagged: a file that lost them would allow everything
        missing = [label for label in self.labels if label != self.negative_label and label not in self.thresholds]
        if missing:
            raise ValueError(f"protected classes without thresholds: {missing} (they would never be flagged); "
                             "calibrate the run (`wildcheck calibrate RUN`) and export it again")
        return self

    @property
    def negative_index(self) -> int | None:
        return self.labels.index(self.negative_label) if self.negative_label in self.labels else None


class ModelContract(ModelSpec):
    """The spec plus what a release adds: name, version (with the weights hash), date, graph outputs."""

    model_config = ConfigDict(extra="allow", protected_namespaces=())

    contract_version: StrictInt = Field(CONTRACT_VERSION, ge=1)
    model_name: str
    model_version: str
    created_at: str
    wildcheck_version: str
    precision: Literal["fp32", "int8"] = Field(
        "fp32", description="the weights' number format: fp32 from `wildcheck export`, int8 from its INT8 gate")
    cam: CamOutput | None = Field(None, description="class activation maps output, for explain; None in older files")
    embedding: EmbeddingSpec | None = Field(None, description="absent in models exported before galleries existed")

    @field_validator("contract_version")
    @classmethod
    def _not_from_a_newer_wildcheck(cls, version: int) -> int:
        # a newer contract may hold rules this code would ignore (and so decide more leniently than written)
        if version > CONTRACT_VERSION:
            raise ValueError(f"contract_version {version} is newer than this wildcheck reads ({CONTRACT_VERSION}); "
                             "upgrade wildcheck to serve this model")
        return version

    @property
    def spec(self) -> ModelSpec:
        return self

    @property
    def is_embedder(self) -> bool:
        """A model from ``wildcheck export-embedder`` (``role: embedder``): it embeds for a gallery, flags nothing."""
        return (self.model_extra or {}).get("role") == "embedder"

    def to_metadata(self) -> dict[str, str]:
        """JSON-encode each field under ``wildcheck.<field>``."""
        return {METADATA_PREFIX + k: json.dumps(v) for k, v in self.model_dump(mode="json").items()}

    @classmethod
    def from_metadata(cls, props: dict[str, str], source: str = "model") -> "ModelContract":
        ours = {k[len(METADATA_PREFIX) :]: v for k, v in props.items() if k.startswith(METADATA_PREFIX)}
        missing = [k for k in REQUIRED_KEYS if k not in ours]
        if missing:
            raise ContractError(
                f"{source} is not a complete wildcheck model: metadata lacks {', '.join(METADATA_PREFIX + k for k in missing)}. "
                "Export it with `wildcheck export RUN_DIR --out MODEL.onnx`."
            )
        values = {}
        for key, value in ours.items():
            try:
                values[key] = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ContractError(f"{source} has invalid wildcheck metadata: {METADATA_PREFIX}{key} is not JSON "
                                    f"({exc}); {EXPORT_AGAIN}") from exc
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            message = one_line(exc)
            hint = "" if "upgrade wildcheck" in message else f"; {EXPORT_AGAIN}"
            raise ContractError(f"{source} has invalid wildcheck metadata: {message}{hint}") from exc

    def write_to(self, model):
        """Put the contract into an ``onnx.ModelProto``'s metadata (in place; returns it). Serving has no
        ``onnx`` package, so the caller loads, checks and saves the file (``training.fileio.atomic_onnx_save``)."""
        del model.metadata_props[:]
        for key, value in self.to_metadata().items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
        model.producer_name = "wildcheck"
        model.doc_string = f"{self.model_name} {self.model_version}: labels {self.labels}"
        return model


def weights_id(model_version: str) -> str:
    """The weights hash a release's version ends with (``1.6.0+48edcbdd8e1e`` -> ``48edcbdd8e1e``): which
    weights a model is, whatever human version it was given."""
    return model_version.rpartition("+")[2]


def contract_hash(contract: ModelContract) -> str:
    """sha256 of the canonical contract JSON: a gallery records it to refuse another model's file."""
    import hashlib

    return hashlib.sha256(json.dumps(contract.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


CALIBRATION_FIELDS = ("model_name", "model_version", "labels", "negative_label", "preprocessing", "thresholds",
                      "never_block", "temperature", "val_curves", "decision", "threshold_rules", "negative_scores",
                      "test_time_views", "grey_route", "size_route", "tiling")


def calibration_hash(contract: ModelContract) -> str:
    """sha256 of what a traffic policy is solved on (weights, scores, thresholds): a policy records it to refuse
    another calibration of the model. Unlike ``contract_hash`` it ignores the export date (and outputs such as
    the heat-map and embedding specs), so exporting the same run again keeps its policies."""
    import hashlib

    values = contract.model_dump(mode="json", include=set(CALIBRATION_FIELDS))
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


def contract_from_session(session, source: str = "model") -> ModelContract:
    """The contract of a loaded onnxruntime session (its ``custom_metadata_map``): one parse, no second read."""
    return ModelContract.from_metadata(dict(session.get_modelmeta().custom_metadata_map), source=source)


def open_session(path: str | Path, options=None):
    """An onnxruntime CPU session for ``path``; a missing or unreadable file is a ``ContractError``."""
    import onnxruntime as ort

    path = Path(path)
    if path.is_dir():
        raise ContractError(f"{path} is a folder, not an ONNX file: give the .onnx file (`wildcheck export` writes one)")
    if not path.is_file():
        raise ContractError(f"{path} does not exist" if not path.exists() else f"{path} is not a regular file")
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises InvalidProtobuf, Fail, ... for files that are not models
        raise ContractError(f"{path} is not a readable ONNX file: {exc}") from exc


def read_contract(path: str | Path) -> ModelContract:
    """Read the contract from an ONNX file with onnxruntime (serving has no ``onnx`` package)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # only the metadata is wanted
    return contract_from_session(open_session(path, options), source=str(path))
