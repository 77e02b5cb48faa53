"""Atomic writes: a crash mid-write leaves the previous file intact, never half a model, gallery or checkpoint.

On the serving side (no torch) so galleries, written by serving's own commands, and everything training writes
(``training.fileio``) use the one implementation.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


TEMP_NAME_BYTES = 100  # of ``path``'s name kept in its temporary's: mkstemp adds ~14 characters to the prefix


def temp_prefix(name: str) -> str:
    """``.NAME.`` for the temporary of a file named ``name``, NAME cut to ``TEMP_NAME_BYTES`` bytes (not characters:
    the file system's limit, usually 255, counts bytes): a name the file system accepts may be too long with the
    temporary's additions (a 238-character name failed: File name too long)."""
    while len(os.fsencode(name)) > TEMP_NAME_BYTES:
        name = name[:-1]
    return f".{name}."


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; a server running as another user must read it
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
