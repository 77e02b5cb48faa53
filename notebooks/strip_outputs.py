"""Remove outputs and execution counts from notebooks before committing: python notebooks/strip_outputs.py notebooks/*.ipynb

Each notebook is rewritten through a temporary file in its folder and renamed over the original, so an interrupted
run or a full disk leaves the notebook as it was, never half of it; one that needs no change is not rewritten.
A path that is not a readable notebook is reported on one line and the others are still stripped; the exit
status is then 1.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import nbformat

# what reading a file that is no notebook raises: missing, a folder, not UTF-8, not JSON, not nbformat's schema
NOT_A_NOTEBOOK = (OSError, ValueError, nbformat.ValidationError, KeyError, AttributeError, TypeError)


def stripped(text: str) -> str:
    """The notebook in ``text`` without outputs and execution counts, as nbformat writes it."""
    nb = nbformat.reads(text, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    out = nbformat.writes(nb)
    return out if out.endswith("\n") else out + "\n"


def atomic_replace(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` (same mode), then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        shutil.copymode(path, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def strip(path: Path) -> bool:
    """Strip one notebook in place; True when it changed."""
    path = path.resolve()  # a symlink's target is rewritten, not the link replaced by a copy
    text = path.read_text(encoding="utf-8")
    new = stripped(text)
    if new == text:
        return False
    atomic_replace(path, new)
    return True


def main(paths: list[str]) -> int:
    failed = 0
    for name in paths:
        try:
            strip(Path(name))
        except NOT_A_NOTEBOOK as exc:
            failed += 1
            print(f"{name}: not stripped: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                  file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
