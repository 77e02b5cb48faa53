"""Service settings from environment variables (documented in the README, set by ``wildcheck serve``)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from serving.errors import InvalidInput
from serving.imageio import DEFAULT_MAX_DECODE_BYTES, DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE


def _number(name: str, default, parse, kind: str):
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        number = parse(value)
    except ValueError as exc:
        raise InvalidInput(f"{name} must be {kind}, got {value!r}") from exc
    # every limit is a count, a size or a time: 0, a negative or nan would refuse every request while the
    # server reports ready, each refusal blaming the client
    if not (math.isfinite(number) and number > 0):
        raise InvalidInput(f"{name} must be {kind} above 0, got {value!r}; unset it for the default {default}")
    return number


def _int(name: str, default: int) -> int:
    return _number(name, default, int, "an integer")


def _float(name: str, default: float) -> float:
    return _number(name, default, float, "a number")


@dataclass(frozen=True)
class Settings:
    model: str = ""
    workers: int = 2  # 2 workers x 1 onnxruntime thread is fastest on 2 cores (benchmarks/serve_bench.py)
    threads: int = 1
    cpu_threads: int = 4  # threads per worker that decode and run the model (serve_bench: 4 beat 1, 2 and 40)
    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    min_side: int = DEFAULT_MIN_SIDE
    max_batch: int = 32
    # forward passes (views) per /v1/check_batch request: a collage is one view per panel plus the whole, so 32
    # 3x3 collages were 320 views (~25 s of inference on one core: past the deadline). 128 is ~10 s: 32 photos,
    # 25 2x2 collages or 12 3x3 ones
    max_batch_views: int = 128
    timeout_s: int = 30
    max_concurrency: int = 64
    max_decode_bytes: int = DEFAULT_MAX_DECODE_BYTES
    max_queue: int = 8  # requests per worker waiting for or using the CPU threads; more get 503 + Retry-After
    decode_memory_bytes: int = 512 * 2**20  # decode memory of the images being decoded at once, per worker
    body_timeout_s: float = 10.0  # the whole body must arrive within this: a slow sender cannot hold a slot
    api_keys: frozenset[str] = field(default_factory=frozenset)
    policy: str = ""
    gallery: str = ""
    embedder: str = ""  # a separate model whose embedding the gallery was built with (wildcheck export-embedder)

    @classmethod
    def from_env(cls) -> "Settings":
        keys = os.environ.get("WILDCHECK_API_KEYS", "")
        api_keys = frozenset(k.strip() for k in keys.split(",") if k.strip())
        if keys and not api_keys:  # "," or " ": the operator meant to turn auth on; never fail open
            raise InvalidInput(f"WILDCHECK_API_KEYS={keys!r} contains no key; give comma-separated keys or unset it")
        odd = sorted(k for k in api_keys if not (k.isascii() and k.isprintable()))
        if odd:  # HTTP clients (httpx, wildcheck scan) send header values in ASCII only: such a key locks them out
            raise InvalidInput(f"WILDCHECK_API_KEYS has {len(odd)} key(s) with characters outside printable ASCII; "
                               "use letters, digits and punctuation (e.g. `openssl rand -hex 32`)")
        return cls(
            model=os.environ.get("WILDCHECK_MODEL", ""),
            workers=_int("WILDCHECK_WORKERS", cls.workers),
            threads=_int("WILDCHECK_THREADS", cls.threads),
            cpu_threads=_int("WILDCHECK_CPU_THREADS", cls.cpu_threads),
            max_body_bytes=_int("WILDCHECK_MAX_BODY_BYTES", cls.max_body_bytes),
            max_pixels=_int("WILDCHECK_MAX_PIXELS", cls.max_pixels),
            min_side=_int("WILDCHECK_MIN_SIDE", cls.min_side),
            max_batch=_int("WILDCHECK_MAX_BATCH", cls.max_batch),
            max_batch_views=_int("WILDCHECK_MAX_BATCH_VIEWS", cls.max_batch_views),
            timeout_s=_int("WILDCHECK_TIMEOUT_S", cls.timeout_s),
            max_concurrency=_int("WILDCHECK_MAX_CONCURRENCY", cls.max_concurrency),
            policy=os.environ.get("WILDCHECK_POLICY", ""),
            gallery=os.environ.get("WILDCHECK_GALLERY", ""),
            embedder=os.environ.get("WILDCHECK_EMBEDDER", ""),
            max_decode_bytes=_int("WILDCHECK_MAX_DECODE_BYTES", cls.max_decode_bytes),
            max_queue=_int("WILDCHECK_MAX_QUEUE", cls.max_queue),
            decode_memory_bytes=_int("WILDCHECK_DECODE_MEMORY_BYTES", cls.decode_memory_bytes),
            body_timeout_s=_float("WILDCHECK_BODY_TIMEOUT_S", cls.body_timeout_s),
            api_keys=api_keys,
        )
