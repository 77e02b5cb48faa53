"""Start a server the way users do (``wildcheck serve``, ``bentoml serve``), wait until ``/readyz`` says 200,
and stop its whole process group: one definition for the end-to-end tests and the serving benchmarks.

The server runs in its own session (``start_new_session``); SIGTERM to its process group makes the BentoML
arbiter stop its workers. A server that does not leave within ``grace`` seconds is killed with SIGKILL, and so are
its workers: BentoML starts each worker in a process group of its own, so a SIGKILL to the server's group left
them running (orphaned, still answering on the port).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerNotReady(RuntimeError):
    """The server exited, or did not answer /readyz with 200 in time; the message ends with its log."""


class ServerProcess:
    """``argv`` started in its own process group, output to ``log_path``; ``base`` is its URL.

    Use as a context manager (``with ServerProcess(...) as server:``) or call ``wait_ready()`` and ``stop()``.
    """

    def __init__(self, argv: list[str], port: int, log_path: str | Path, env: dict | None = None,
                 cwd: str | Path | None = None, ready_timeout: float = 120.0, grace: float = 20.0, poll: float = 0.5):
        self.port, self.log_path, self.ready_timeout, self.grace = port, Path(log_path), ready_timeout, grace
        self.poll = poll
        self.base = f"http://127.0.0.1:{port}"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:]

    def wait_ready(self) -> "ServerProcess":
        """Poll /readyz until 200; raise ServerNotReady (and stop the server) if it exits or time runs out."""
        deadline = time.time() + self.ready_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                self.stop()
                raise ServerNotReady(f"server exited with status {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.base + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(self.poll)
        self.stop()
        raise ServerNotReady(f"server not ready after {self.ready_timeout:.0f} s:\n{self.log_tail()}")

    def descendants(self) -> list:
        """The server's processes below it (BentoML's workers and what they started), as ``psutil.Process``."""
        import psutil

        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []

    def stop(self) -> None:
        """SIGTERM to the process group, SIGKILL after ``grace`` seconds (to the group and to every process
        below the server, found before the kill: workers sit in process groups of their own); idempotent."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=self.grace)
            except subprocess.TimeoutExpired:
                self._kill()
            except ProcessLookupError:
                pass
        if not self._log.closed:
            self._log.close()

    def _kill(self) -> None:
        import psutil

        below = self.descendants()  # before the kill: afterwards the orphans belong to init
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in below:  # psutil checks it is still the same process (not a reused pid) before it kills
            try:
                p.kill()
            except psutil.Error:
                pass
        self.proc.wait()
        psutil.wait_procs(below, timeout=5)

    def __enter__(self) -> "ServerProcess":
        return self.wait_ready()

    def __exit__(self, *exc) -> None:
        self.stop()
