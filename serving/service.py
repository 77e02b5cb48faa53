"""The image-check endpoint: a BentoML service with a FastAPI app mounted at ``/v1``.

We parse requests ourselves instead of using BentoML's image/file parameters (NOTES: those turn bad
uploads into 500s and download URLs given in file fields). Start it with ``wildcheck serve MODEL.onnx``
or ``WILDCHECK_MODEL=MODEL.onnx bentoml serve serving.service:WildCheck``.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor

import bentoml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from serving.checker import ImageChecker, Limits
from serving.imageio import ImageError
from serving.middleware import ApiKeyMiddleware, BodyLimitMiddleware, error_response
from serving.schemas import BATCH_BODY, CHECK_BODY, ERRORS, BatchResponse, CheckResponse, ModelInfo
from serving.settings import Settings

log = logging.getLogger("wildcheck.service")
settings = Settings.from_env()

api = FastAPI(
    title="wildcheck image check",
    version="1",
    description="Send a listing photo, get `block`, `review` or `allow` with per-class scores. "
    "Upload the image bytes (multipart field `image`, or the raw request body); URLs are never fetched.",
    docs_url="/docs",
    openapi_url="/openapi.json",
)
api.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
api.add_middleware(ApiKeyMiddleware, keys=settings.api_keys)  # added last = runs first: no key, no upload read


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return error_response(exc.status_code, code, str(exc.detail))


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return error_response(400, "invalid_request", str(exc.errors()))


async def _read_images(request: Request, field: str, many: bool) -> list[tuple[bytes, str | None]]:
    """Image bytes and declared content types from a multipart form or the raw body."""
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        try:
            form = await request.form(max_files=settings.max_batch + 1, max_fields=settings.max_batch + 8)
        except Exception as exc:  # malformed multipart, too many parts
            raise ImageError("invalid_multipart", f"cannot parse the multipart body: {exc}") from exc
        values = form.getlist(field)
        if not values:
            raise ImageError("missing_field", f"no {field!r} field in the form; upload the image as a file field {field!r}")
        items = []
        for value in values:
            if not isinstance(value, UploadFile):
                raise ImageError(
                    "not_a_file",
                    f"field {field!r} must be an uploaded file; text such as URLs is never fetched: send the image bytes",
                )
            items.append((await value.read(), value.content_type))
        return items
    if content_type.startswith(("application/x-www-form-urlencoded", "text/", "application/json")):
        raise ImageError("not_a_file", "send the image bytes (multipart field 'image' or a raw image body), not text or URLs")
    if many:
        raise ImageError("missing_field", f"check_batch takes a multipart form with one or more {field!r} file fields")
    body = await request.body()
    return [(body, content_type or None)]


@bentoml.service(
    name="wildcheck",
    workers=settings.workers,
    traffic={"timeout": settings.timeout_s, "max_concurrency": settings.max_concurrency},
)
@bentoml.asgi_app(api, path="/v1")
class WildCheck:
    """Loads the ONNX model named by ``WILDCHECK_MODEL`` once per worker and warms it up before ready."""

    def __init__(self) -> None:
        if not settings.model:
            raise RuntimeError("set WILDCHECK_MODEL to the ONNX file to serve (or use `wildcheck serve MODEL.onnx`)")
        self.ready = False
        self.checker = ImageChecker(
            settings.model, threads=settings.threads,
            limits=Limits(max_pixels=settings.max_pixels, min_side=settings.min_side),
            max_concurrent=settings.cpu_threads, memory_arena=False, gallery=settings.gallery or None,
        )
        if settings.policy:
            self.checker.apply_policy(settings.policy)
        self.checker.warm_up()
        # CPU work (decode, preprocess, inference) runs on a small dedicated pool, not the 40-thread default:
        # more threads only contend for 2 cores and the GIL, and each adds memory (RSS crept up under load);
        # 4 per worker keep both cores busy while requests are parsed (benchmarks/serve_bench.py).
        self.executor = ThreadPoolExecutor(max_workers=settings.cpu_threads, thread_name_prefix="wildcheck-cpu")
        self.ready = True
        log.info("serving %s %s", self.checker.contract.model_name, self.checker.contract.model_version)

    def __is_ready__(self) -> bool:
        return self.ready

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    @api.post("/check", response_model=CheckResponse, responses=ERRORS, openapi_extra=CHECK_BODY)
    async def check(self, request: Request):
        """Check one image: multipart field `image`, or the raw image bytes as the body."""
        try:
            (data, content_type), = await _read_images(request, "image", many=False)
            return await self._run(self.checker.check, data, content_type)
        except ImageError as exc:
            return error_response(exc.status, exc.code, exc.message)

    @api.post("/check_batch", response_model=BatchResponse, responses=ERRORS, openapi_extra=BATCH_BODY)
    async def check_batch(self, request: Request):
        """Check up to WILDCHECK_MAX_BATCH images (repeated multipart field `image`); results in request order."""
        try:
            items = await _read_images(request, "image", many=True)
        except ImageError as exc:
            return error_response(exc.status, exc.code, exc.message)
        if len(items) > settings.max_batch:
            return error_response(413, "batch_too_large", f"{len(items)} images; at most {settings.max_batch} per request")
        results = await self._run(self.checker.check_many, items)
        return {"results": results, "count": len(results)}

    @api.get("/model", response_model=ModelInfo, responses=ERRORS)
    def model(self):
        """Labels, thresholds, preprocessing, version and validation metrics of the served model."""
        return self.checker.describe()


# Registered after the class so it comes after the class routes: unknown paths under /v1 get JSON, not text.
_KNOWN = {"/check": "POST", "/check_batch": "POST", "/model": "GET"}


@api.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"], include_in_schema=False)
async def _fallback(path: str, request: Request) -> JSONResponse:
    route = "/" + path
    if route in _KNOWN:
        return error_response(405, "method_not_allowed", f"use {_KNOWN[route]} {route}")
    return error_response(404, "not_found", f"no endpoint /v1{route}; see /v1/docs")
