"""Where a command may write: the checks on ``--out`` (and other output paths), made before any work.

Three rules, one function each, used by every command they apply to:

- ``out_folder``: an output folder is a folder (new or existing), never a file, and never inside a data folder the
  command reads: a PNG written into ``DATA/val/ivory/eval`` is an ivory image to the next evaluation, and an
  overlay written among the photos being explained would replace or join them.
- ``out_file``: an output file (a predictions CSV, a policy YAML) is a file path, never a folder, never inside a
  data folder the command reads, never the model or an input it reads, and never an existing file of another kind
  (``--predictions model.onnx`` replaced the model with a CSV).
- Both: the nearest existing folder above the path is a folder, not a file (``notes.txt/out`` failed after the work).
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
    below_a_folder(out, option)
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


def below_a_folder(path: Path, option: str = "--out") -> None:
    """Refuse a path whose nearest existing parent is a file: the write would fail only after the work."""
    above = next((p for p in path.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():
        named = f"{option} {path}" if option else str(path)
        raise InvalidInput(f"{named}: {above} is a file, not a folder; give a path in a folder")


def _same_file(a: Path, b: Path) -> bool:
    """``a`` is ``b``, or a link to it (a link's own path counts too: both would be written over)."""
    return b.exists() and (a.absolute() == b.absolute() or a.resolve() == b.resolve())


def out_file(path: str | Path, option: str = "--out", example: str = "out.csv", reads: Iterable[str | Path] = (),
             protect: Iterable[str | Path] = (), kinds: Iterable[str] | None = None) -> Path:
    """Refuse an output file path that names a folder, lies below a file, lies inside a data folder in ``reads``
    (a CSV manifest there is the data itself; a file root is protected instead), is one of the files in
    ``protect`` (the model, an input), or is an existing file whose suffix is not one of ``kinds`` (an image,
    a model). Returns it as a Path."""
    path = Path(path)
    if path.is_dir():
        raise InvalidInput(f"{option} {path} is a folder; name the file to write, e.g. {option} {path / example}")
    below_a_folder(path, option)
    here = {path.parent.resolve() / path.name, path.resolve()}  # the link itself, and what it points at
    reads = [Path(r) for r in reads]
    for root in reads:
        base = root.resolve()
        if root.is_dir() and any(p.is_relative_to(base) for p in here):
            raise InvalidInput(f"{option} {path} is inside {root}, which this command reads as data: it would be "
                               f"written over or among the images (or the manifest). Write outside it, e.g. "
                               f"{option} {base.parent / (base.name + '-' + Path(example).name)}")
    for kept in [*map(Path, protect), *(r for r in reads if r.is_file())]:
        if _same_file(path, kept):
            raise InvalidInput(f"{option} {path} is a file this command reads ({kept}); it would be written over. "
                               f"Name a new file, e.g. {option} {path.parent / example}")
    kinds = {k.lower() for k in kinds or ()}
    if kinds and path.exists() and path.suffix.lower() not in kinds:
        raise InvalidInput(f"{option} {path} exists and is not a {'/'.join(sorted(kinds))} file; it would be "
                           f"replaced. Name a new file, e.g. {option} {path.parent / example}, or move it away first")
    return path


def int8_path(fp32: Path) -> Path:
    """Where ``export --int8`` writes the INT8 copy of the FP32 model ``fp32``: ``model.onnx`` -> ``model.int8.onnx``."""
    return fp32.with_name(fp32.stem + ".int8.onnx")


def new_run_folder(out: str | Path, writes: Iterable[str], marker: str | None = None,
                   reads: Iterable[str | Path] = (), option: str = "--out", what: str = "new run folder") -> Path:
    """Refuse an ``out`` that is a file, inside a data folder in ``reads`` (``out_folder``'s rule), or a folder
    holding anything but this command's own earlier output:
    ``writes`` are the names the command writes (it replaces them); ``marker``, one of them, must be there too when
    a ``best.pt`` is (so another command's run is not taken for an earlier output). Leftover temporaries
    (``.NAME.*.tmp``) do not count. Returns ``out`` as a Path."""
    out = out_folder(out, reads, option=option, what=what)
    if not out.is_dir():
        return out
    names = {p.name for p in out.iterdir() if not (p.name.startswith(".") and p.name.endswith(".tmp"))}
    others = sorted(names - set(writes))
    if not others and marker and "best.pt" in names and marker not in names:
        others = ["best.pt"]
    if others:
        named = f"{option} {out}" if option else str(out)
        raise InvalidInput(f"{named} already holds {', '.join(others[:4])}{', ...' if len(others) > 4 else ''} "
                           f"(another run, or other files): the new run would be mixed with them. Choose a new folder, "
                           f"or remove {out} first if what is in it is meant to go")
    return out
