"""Response models and request-body descriptions for the OpenAPI document (/v1/openapi.json, /v1/docs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from serving.explain import Explanation
from serving.gallery import GalleryMatch
from serving.imageio import IMAGE_MIME_TYPES


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


class ModelRef(BaseModel):
    name: str
    version: str


class ImageMeta(BaseModel):
    sha256: str
    width: int
    height: int
    format: str
    declared_type: str | None = None
    detected_type: str = ""
    type_mismatch: bool = False
    phash: str | None = None  # 64-bit perceptual hash (hex), when a gallery is served


class CheckResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    decision: Literal["block", "review", "allow"]
    label: str
    score: float
    triggered_by: list[str]
    scores: dict[str, float]
    thresholds: dict[str, dict[str, float | None]]
    model: ModelRef
    image: ImageMeta
    explanation: Explanation | None = Field(
        None, description="only with explain=true/png: a heat map covering the whole uploaded picture"
    )
    elapsed_ms: float
    matches: list[GalleryMatch] = []


class BatchError(BaseModel):
    code: str
    message: str
    status: int


class BatchItemError(BaseModel):
    error: BatchError


class BatchResponse(BaseModel):
    results: list[CheckResponse | BatchItemError]
    count: int


class ModelInfo(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    name: str
    version: str
    labels: list[str]
    thresholds: dict[str, Any]
    threshold_rules: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="per class, what set each threshold: review_recall (recall target), block_precision "
        "(precision target), max_flag_rate (flag budget), max_block_rate (block budget), explicit (policy value), "
        "never_block, default, model (an older model that did not record it)",
    )
    preprocessing: dict[str, Any]
    metrics: dict[str, Any]


# Every error the service answers has the body {"error": {"code", "message"}}; these are the codes.
ERROR_CODES = {
    400: "empty, not_an_image, corrupt, too_many_pixels, too_small, extreme_aspect_ratio, not_a_file, missing_field, too_many_images, "
         "invalid_multipart, invalid_request, invalid_content_type, unknown_label",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "body_timeout",
    413: "body_too_large, batch_too_large, too_many_views",
    415: "unsupported_format",
    422: "explain_unavailable",
    429: "too_many_requests",
    500: "internal_error",
    503: "overloaded (with Retry-After)",
    504: "timeout",
}
_WHEN = {
    400: "not an image, truncated/corrupt, too many pixels, too small, text or URL instead of a file, missing field",
    401: "missing or invalid API key (when WILDCHECK_API_KEYS is set)",
    408: "the request body did not arrive within WILDCHECK_BODY_TIMEOUT_S",
    413: "request body over WILDCHECK_MAX_BODY_BYTES, more than WILDCHECK_MAX_BATCH images, or more than "
         "WILDCHECK_MAX_BATCH_VIEWS views (a collage is scored panel by panel)",
    415: "image format outside the allow-list (JPEG, PNG, WebP, GIF, BMP, TIFF)",
    422: "explain asked of a model exported before heat maps (re-export it)",
    429: "more than WILDCHECK_MAX_CONCURRENCY requests in this worker",
    500: "a bug: please report it",
    503: "this worker's CPU queue (WILDCHECK_MAX_QUEUE) is full: retry after Retry-After seconds",
    504: "not answered within WILDCHECK_TIMEOUT_S",
}
ERRORS = {status: {"model": ErrorResponse, "description": f"{_WHEN[status]}. Codes: {codes}"}
          for status, codes in ERROR_CODES.items() if status in _WHEN}

_FILE = {"type": "string", "format": "binary"}
CHECK_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {"image": _FILE}}},
            **{mime: {"schema": _FILE} for mime in IMAGE_MIME_TYPES},
            "application/octet-stream": {"schema": _FILE},
        },
    }
}
BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {"type": "object", "required": ["image"],
                           "properties": {"image": {"type": "array", "items": _FILE}}}
            }
        },
    }
}
