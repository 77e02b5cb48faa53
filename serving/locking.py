"""One writer per file: ``TARGET.lock`` held with ``flock`` while a command reads, changes and writes TARGET."""

from __future__ import annotations

import fcntl
from contextlib import contextmanager
from pathlib import Path

from serving.errors import InvalidInput


@contextmanager
def exclusive(target: str | Path, writer: str, advice: str):
    """Hold ``TARGET.lock`` (the OS releases it even if we are killed); when another ``writer`` holds it, refuse
    with ``advice`` instead of both writing: the second save would silently drop the first one's work."""
    target = Path(target)
    lock_path = target.with_name(target.name + ".lock")
    with lock_path.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InvalidInput(f"another {writer} is writing {target} (lock {lock_path}); {advice}") from None
        yield
