"""Where a command may write: the checks on ``--out`` (and other output paths), made before any work.

Three rules, one function each, used by every command they apply to:

- ``out_folder``: an output folder is a folder (new or existing), never a file, and never inside a data folder the
  command reads: a PNG written into ``DATA/val/ivory/eval`` is an ivory image to the next evaluation, and an
  overlay written among the photos being explained would replace or join them.
- ``out_file``: an output file (a predictions CSV, a policy YAML) is a file path, never a folder.
- ``new_run_folder``: a command that writes a run of its own (``ensemble``, ``grey-head``) writes into a new or
  empty folder, or one holding only its own earlier output; never over another run, whose leftover ``last.pt``,
  ``history.csv`` and ``config.yaml`` would then sit beside the new ``best.pt`` (resume and promote act on a mix).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from serving.errors import InvalidInput


def out_folder(out: str | Path, reads: Iterable[str | Path] = (), holding: Iterable[str | Path] = (),
               option: str = "--out", what: str = "folder", holding_what: str = "images being read") -> Path:
    """Refuse ``out`` when it is a file, lies inside (or is) one of the folders in ``reads`` (data roots, negatives
    pools, image folders), or holds one of the files in ``holding``. Returns ``out`` as a Path."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        named = f"{option} {out}" if option else str(out)  # a positional argument has no option name
        raise InvalidInput(f"{named} is a file: give the {what} to write into (a new or existing folder), "
                           "or move the file away")
    where = out.resolve()
    inside = [p for p in map(Path, holding) if p.resolve().is_relative_to(where)]
    if inside:
        raise InvalidInput(f"{option} {out} holds {holding_what} ({inside[0]}); the outputs would be written over or "
                           f"among them. Pass a folder outside them, e.g. {option} {where.parent / where.name}-out")
    for root in map(Path, reads):
        base = root.resolve()
        if root.is_dir() and where.is_relative_to(base):
            raise InvalidInput(f"{option} {out} is {'the folder' if where == base else 'inside'} {root}, which this "
                               "command reads: what it writes there would be read as data next time (PNGs counted as "
                               f"images). Write outside it, e.g. {option} {base.parent / base.name}-"
                               f"{out.name if where != base else 'out'}")
    return out


def out_file(path: str | Path, option: str = "--out", example: str = "out.csv") -> Path:
    """Refuse an output file path that names a folder. Returns it as a Path."""
    path = Path(path)
    if path.is_dir():
        raise InvalidInput(f"{option} {path} is a folder; name the file to write, e.g. {option} {path / example}")
    return path


def int8_path(fp32: Path) -> Path:
    """Where ``export --int8`` writes the INT8 copy of the FP32 model ``fp32``: ``model.onnx`` -> ``model.int8.onnx``."""
    return fp32.with_name(fp32.stem + ".int8.onnx")


def new_run_folder(out: str | Path, writes: Iterable[str], marker: str | None = None,
                   reads: Iterable[str | Path] = ()) -> Path:
    """Refuse an ``out`` that is a file, inside a data folder in ``reads`` (``out_folder``'s rule), or a folder
    holding anything but this command's own earlier output:
    ``writes`` are the names the command writes (it replaces them); ``marker``, one of them, must be there too when
    a ``best.pt`` is (so another command's run is not taken for an earlier output). Leftover temporaries
    (``.NAME.*.tmp``) do not count. Returns ``out`` as a Path."""
    out = out_folder(out, reads, what="new run folder")
    if not out.is_dir():
        return out
    names = {p.name for p in out.iterdir() if not (p.name.startswith(".") and p.name.endswith(".tmp"))}
    others = sorted(names - set(writes))
    if not others and marker and "best.pt" in names and marker not in names:
        others = ["best.pt"]
    if others:
        raise InvalidInput(f"--out {out} already holds {', '.join(others[:4])}{', ...' if len(others) > 4 else ''} "
                           f"(another run, or other files): the new run would be mixed with them. Choose a new folder, "
                           f"or remove {out} first if what is in it is meant to go")
    return out
