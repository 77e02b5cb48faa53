"""One writer per file: ``TARGET.lock`` held with ``flock`` while a command reads, changes and writes TARGET."""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from serving.errors import InvalidInput


@contextmanager
def exclusive(target: str | Path, writer: str, advice: str):
    """Hold ``TARGET.lock`` (the OS releases it even if we are killed); when another ``writer`` holds it, refuse
    with ``advice`` instead of both writing: the second save would silently drop the first one's work. A lock this
    call created is removed again when the work fails and TARGET does not exist: no stray ``.lock`` beside a file
    that was never written."""
    target = Path(target)
    lock_path = target.with_name(target.name + ".lock")
    busy = InvalidInput(f"another {writer} is writing {target} (lock {lock_path}); {advice}")
    created = not lock_path.exists()
    with lock_path.open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise busy from None
        try:  # a failed writer may have removed the file we opened: its lock no longer excludes anyone
            if os.stat(lock_path).st_ino != os.fstat(lock.fileno()).st_ino:
                raise busy
        except FileNotFoundError:
            raise busy from None
        try:
            yield
        except BaseException:
            if created and not target.exists():
                lock_path.unlink(missing_ok=True)
            raise
