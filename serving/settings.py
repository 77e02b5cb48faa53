"""Service settings from environment variables (documented in the README, set by ``wildcheck serve``), and the one
start-up check: ``Settings.open_checker`` opens the model, gallery, embedder and policy exactly as a worker does and
checks these settings against the model. ``wildcheck serve``, ``wildcheck build``, the ``bentoml serve`` process
that starts the workers (serving/service.py) and each worker run it, so what would stop a worker stops the command
first: BentoML restarts a worker that fails at start-up forever, with the port open and never ready."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from serving.errors import InvalidInput, MissingInput
from serving.imageio import DEFAULT_MAX_DECODE_BYTES, DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIDE

# Fixed ranges for the limits whose sane values do not depend on the model (those that do are checked against it in
# Settings.check_model). Every limit must be above 0; these also refuse values that are positive but absurd: the
# server would report ready and refuse every request with a 4xx that blames the client.
# - workers: each loads the model (0.3-0.7 GB with the shipped one); 64 is more cores than a replica gets.
# - threads: onnxruntime / CPU threads per worker; past a few hundred only contention and memory grow.
# - max_body_bytes: a listing photo is 50 KB-5 MB (default 20 MiB); under 256 KiB ordinary photos get 413.
# - max_decode_bytes: a 1-megapixel RGB photo needs 4 MiB to decode (4 bytes per pixel; default 256 MiB).
# - body_timeout_s: under 1 s a phone upload on a slow link gets 408 (default 10 s).
RANGES = {
    "WILDCHECK_WORKERS": (1, 64, ""),
    "WILDCHECK_THREADS": (1, 256, ""),
    "WILDCHECK_CPU_THREADS": (1, 256, ""),
    "WILDCHECK_MAX_BODY_BYTES": (256 * 2**10, None, " bytes (256 KiB)"),
    "WILDCHECK_MAX_DECODE_BYTES": (4 * 2**20, None, " bytes (4 MiB: one 1-megapixel RGB photo)"),
    "WILDCHECK_BODY_TIMEOUT_S": (1, None, " s"),
}


# every variable Settings.from_env reads
VARIABLES = ("WILDCHECK_API_KEYS", "WILDCHECK_BODY_TIMEOUT_S", "WILDCHECK_CPU_THREADS",
             "WILDCHECK_DECODE_MEMORY_BYTES", "WILDCHECK_EMBEDDER", "WILDCHECK_GALLERY", "WILDCHECK_MAX_BATCH",
             "WILDCHECK_MAX_BATCH_VIEWS", "WILDCHECK_MAX_BODY_BYTES", "WILDCHECK_MAX_CONCURRENCY",
             "WILDCHECK_MAX_DECODE_BYTES", "WILDCHECK_MAX_PIXELS", "WILDCHECK_MAX_QUEUE", "WILDCHECK_MIN_SIDE",
             "WILDCHECK_MODEL", "WILDCHECK_POLICY", "WILDCHECK_THREADS", "WILDCHECK_TIMEOUT_S", "WILDCHECK_WORKERS")


def _number(environ: Mapping[str, str], name: str, default, parse, kind: str):
    value = environ.get(name)
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
    low, high, unit = RANGES.get(name, (None, None, ""))
    if (low is not None and number < low) or (high is not None and number > high):
        span = (f"from {low} to {high}" if high is not None else f"at least {low}") + unit
        raise InvalidInput(f"{name} must be {kind} {span}, got {value!r}; unset it for the default {default}")
    return number


def _int(environ: Mapping[str, str], name: str, default: int) -> int:
    return _number(environ, name, default, int, "an integer")


def _float(environ: Mapping[str, str], name: str, default: float) -> float:
    return _number(environ, name, default, float, "a number")


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
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "Settings":
        """The settings in ``environ`` (default ``os.environ``); a value that cannot serve raises ``InvalidInput``
        naming the variable and the range it must be in."""
        env = os.environ if environ is None else environ
        keys = env.get("WILDCHECK_API_KEYS")
        api_keys = frozenset(k.strip() for k in (keys or "").split(",") if k.strip())
        # set is meant to turn auth on: "", "," or " " (a secret that templated to nothing) must not serve open
        if keys is not None and not api_keys:
            raise InvalidInput(f"WILDCHECK_API_KEYS={keys!r} is set but holds no key: give comma-separated keys, or "
                               "unset the variable to serve without keys")
        odd = sorted(k for k in api_keys if not (k.isascii() and k.isprintable()))
        if odd:  # HTTP clients (httpx, wildcheck scan) send header values in ASCII only: such a key locks them out
            raise InvalidInput(f"WILDCHECK_API_KEYS has {len(odd)} key(s) with characters outside printable ASCII; "
                               "use letters, digits and punctuation (e.g. `openssl rand -hex 32`)")
        return cls(
            model=env.get("WILDCHECK_MODEL", ""),
            workers=_int(env, "WILDCHECK_WORKERS", cls.workers),
            threads=_int(env, "WILDCHECK_THREADS", cls.threads),
            cpu_threads=_int(env, "WILDCHECK_CPU_THREADS", cls.cpu_threads),
            max_body_bytes=_int(env, "WILDCHECK_MAX_BODY_BYTES", cls.max_body_bytes),
            max_pixels=_int(env, "WILDCHECK_MAX_PIXELS", cls.max_pixels),
            min_side=_int(env, "WILDCHECK_MIN_SIDE", cls.min_side),
            max_batch=_int(env, "WILDCHECK_MAX_BATCH", cls.max_batch),
            max_batch_views=_int(env, "WILDCHECK_MAX_BATCH_VIEWS", cls.max_batch_views),
            timeout_s=_int(env, "WILDCHECK_TIMEOUT_S", cls.timeout_s),
            max_concurrency=_int(env, "WILDCHECK_MAX_CONCURRENCY", cls.max_concurrency),
            policy=env.get("WILDCHECK_POLICY", ""),
            gallery=env.get("WILDCHECK_GALLERY", ""),
            embedder=env.get("WILDCHECK_EMBEDDER", ""),
            max_decode_bytes=_int(env, "WILDCHECK_MAX_DECODE_BYTES", cls.max_decode_bytes),
            max_queue=_int(env, "WILDCHECK_MAX_QUEUE", cls.max_queue),
            decode_memory_bytes=_int(env, "WILDCHECK_DECODE_MEMORY_BYTES", cls.decode_memory_bytes),
            body_timeout_s=_float(env, "WILDCHECK_BODY_TIMEOUT_S", cls.body_timeout_s),
            api_keys=api_keys,
        )

    def check_model(self, checker) -> None:
        """The limits whose sane range depends on the model (``checker``: an ``ImageChecker``), each refused by
        its variable's name with the range: otherwise the server reports ready and refuses every request."""
        models = [checker.model] + ([checker.embedder] if checker.embedder is not None else [])
        size = max(m.contract.preprocessing.input_size for m in models)
        # the model reads size x size pixels: a smaller image is scaled up, so refusing images whose shorter side
        # is above that refuses photos the model can check (the README's example of 100000 refused every photo)
        if self.min_side > size:
            raise InvalidInput(f"WILDCHECK_MIN_SIDE={self.min_side} px is above the model's input size ({size} px): "
                               f"photos the model reads would be refused as too small; set it from 1 to {size}")
        # fewer pixels than one model input refused every photo as too_many_pixels (WILDCHECK_MAX_PIXELS=1)
        if self.max_pixels < size * size:
            raise InvalidInput(f"WILDCHECK_MAX_PIXELS={self.max_pixels} is below one model input ({size}x{size} = "
                               f"{size * size} pixels): every photo would be refused; set at least {size * size} "
                               f"(default {DEFAULT_MAX_PIXELS})")
        # one picture makes up to max_views forward passes (the whole, then its tiles or a collage's panels): a
        # smaller budget refuses a batch of one such picture, and most two-photo batches
        tiling = checker.model.contract.tiling
        views = tiling.max_views if tiling is not None else 1
        if self.max_batch_views < views:
            raise InvalidInput(f"WILDCHECK_MAX_BATCH_VIEWS={self.max_batch_views} is below the views one picture "
                               f"makes with this model ({views}: the whole picture and its tiles or panels); "
                               f"set at least {views} (default {Settings.max_batch_views})")

    def open_checker(self, threads: int | None = None, max_concurrent: int = 1,
                     release_above_rows: int | None = None):
        """The model, gallery, embedder and policy opened exactly as a worker opens them, these settings checked
        against the model: an ``ImageChecker`` (not warmed up), or the error that would stop every worker.

        One function for ``wildcheck serve`` and ``wildcheck build`` (before anything starts or is stored), the
        ``bentoml serve`` process before it starts workers, and each worker (serving/service.py)."""
        from serving.checker import ImageChecker, Limits

        if not self.model:
            raise MissingInput("set WILDCHECK_MODEL to the ONNX file to serve (or use `wildcheck serve MODEL.onnx`)")
        checker = ImageChecker(
            self.model, threads=threads or self.threads,
            limits=Limits(max_pixels=self.max_pixels, min_side=self.min_side, max_decode_bytes=self.max_decode_bytes),
            max_concurrent=max_concurrent, release_above_rows=release_above_rows, gallery=self.gallery or None,
            embedder=self.embedder or None,
        )
        self.check_model(checker)
        if self.policy:
            checker.apply_policy(self.policy)
        return checker
