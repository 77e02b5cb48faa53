"""The worker's CPU queue: a small thread pool, a bound on requests waiting for it, and abandoned work stopped.

``run_in_executor`` work cannot be cancelled, so a request that timed out or whose client went away would
keep decoding and inferring (issue 19: four such batches starved every legitimate request for ~45 s). Here
each image is a separate job, the request's deadline and connection are checked before every job and
between them, and a job whose request is gone is skipped. Jobs of different requests interleave in the
pool, so a batch of expensive images delays a single-image request by about one image, not one batch.
Jobs also declare the memory their decode needs; at most ``memory_bytes`` of it run at once per worker (a
16-bit 36 MP PNG needs ~250 MB: four at once took a worker over 1 GB). Waiting for memory happens here, on
the event loop, not in a pool thread, so cheap images keep flowing past expensive ones.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Awaitable, Callable


class Overloaded(Exception):
    """The queue is full: answer 503 with ``Retry-After: retry_after``."""

    def __init__(self, retry_after: int):
        super().__init__(f"retry after {retry_after} s")
        self.retry_after = retry_after


class Expired(Exception):
    """The request's deadline passed: answer 504."""


class Gone(Exception):
    """The client disconnected: stop, nobody reads the answer."""


class CpuQueue:
    """Per worker: ``threads`` CPU threads and at most ``max_queue`` admitted requests (running or waiting)."""

    POLL_S = 0.25  # how often a waiting request looks at its deadline and connection

    def __init__(self, threads: int, max_queue: int, memory_bytes: int = 2**62):
        self.threads = max(1, threads)
        self.capacity = max(1, max_queue)
        self.memory = max(1, memory_bytes)
        self.memory_used = 0  # only touched from the event loop
        self._freed: asyncio.Event | None = None
        self.executor = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="wildcheck-cpu")
        self.admitted = 0  # only touched from the event loop
        self.job_s = 0.1  # moving average of one job's seconds, for Retry-After

    def saturated(self) -> bool:
        return self.admitted >= self.capacity

    def retry_after(self) -> int:
        return max(1, math.ceil(self.admitted * self.job_s / self.threads))

    @contextmanager
    def admit(self):
        """Hold a place in the queue for one request, or raise Overloaded when there is none."""
        if self.saturated():
            raise Overloaded(self.retry_after())
        self.admitted += 1
        try:
            yield
        finally:
            self.admitted -= 1

    def _timed(self, stop: threading.Event, fn, args):
        if stop.is_set():  # queued before its request was abandoned: do nothing
            raise Gone()
        started = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.job_s = 0.8 * self.job_s + 0.2 * (time.perf_counter() - started)

    def _release(self, cost: int) -> None:
        self.memory_used -= cost
        if self._freed is not None:
            self._freed.set()

    async def run(self, deadline: float, disconnected: Callable[[], Awaitable[bool]], stop: threading.Event, fn,
                  *args, cost: int = 0):
        """Run ``fn(*args)`` on the pool unless the deadline passed or the client left (then set ``stop``,
        which ``fn`` may also check, e.g. before inference). ``cost``: bytes of memory the job needs."""
        cost = max(0, min(cost, self.memory))  # one job larger than the budget runs alone
        try:
            if time.monotonic() >= deadline:
                raise Expired()
            if await disconnected():
                raise Gone()
            while self.memory_used + cost > self.memory:
                if self._freed is None:
                    self._freed = asyncio.Event()
                self._freed.clear()
                try:
                    await asyncio.wait_for(self._freed.wait(), max(0.0, min(self.POLL_S, deadline - time.monotonic())))
                except asyncio.TimeoutError:
                    pass
                if time.monotonic() >= deadline:
                    raise Expired()
                if await disconnected():
                    raise Gone()
            self.memory_used += cost
            future = asyncio.wrap_future(self.executor.submit(self._timed, stop, fn, args))
            future.add_done_callback(lambda f: self._release(cost))  # when the job ends, even if abandoned
            future.add_done_callback(lambda f: f.cancelled() or f.exception())  # an abandoned job's error is expected
            while True:
                done, _ = await asyncio.wait({future}, timeout=max(0.0, min(self.POLL_S, deadline - time.monotonic())))
                if done:
                    return future.result()
                if time.monotonic() >= deadline:
                    raise Expired()
                if await disconnected():
                    raise Gone()
        except (Expired, Gone, asyncio.CancelledError):
            stop.set()
            raise

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
