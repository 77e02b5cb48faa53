"""Response models and request-body descriptions for the OpenAPI document (/v1/openapi.json, /v1/docs)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


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
    phash: str | None = None  # 64-bit perceptual hash (hex), when a gallery is served


class GalleryMatch(BaseModel):
    label: str
    reference: str
    similarity: float
    kind: Literal["duplicate", "similar"]
    hamming: int | None = None


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
    preprocessing: dict[str, Any]
    metrics: dict[str, Any]


ERRORS = {
    400: {"model": ErrorResponse, "description": "not an image, truncated/corrupt, too many pixels, too small, text or URL instead of a file, missing field"},
    401: {"model": ErrorResponse, "description": "missing or invalid API key (when WILDCHECK_API_KEYS is set)"},
    413: {"model": ErrorResponse, "description": "request body over WILDCHECK_MAX_BODY_BYTES or too many images"},
    415: {"model": ErrorResponse, "description": "unsupported image format or content type"},
}

_FILE = {"type": "string", "format": "binary"}
CHECK_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {"image": _FILE}}},
            "image/jpeg": {"schema": _FILE},
            "image/png": {"schema": _FILE},
            "image/webp": {"schema": _FILE},
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
