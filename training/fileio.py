"""Atomic writes (``serving.atomic.atomic_path``) of text, arrays, checkpoints and ONNX models: a crash mid-write
leaves the previous file intact, never half a checkpoint. Also the checkpoint loader, which refuses what it cannot
load safely.

torch is imported only by the functions that need it: importing it costs ~0.7 GB of RSS, which a
command that only writes JSON next to an ONNX model (robustness, data check) should not pay.
"""

from __future__ import annotations

from pathlib import Path

from serving.atomic import atomic_path
from serving.errors import InvalidInput, MissingInput


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete temp files a killed process left behind (``.NAME.*.tmp`` from ``atomic_path``)."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink()
    return stale


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_savez(path: str | Path, **arrays) -> None:
    """``np.savez`` through ``atomic_path``: ``np.savez`` straight to the file closes its zip in a ``finally``, so a
    Ctrl-C half-way left a valid-looking file holding only the arrays written so far, taken as cached later."""
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def atomic_torch_save(obj, path: str | Path) -> None:
    import torch  # here, not at the top: torch-free commands (calibrate --traffic, serve --registry) use this module

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_onnx_save(model, path: str | Path) -> None:
    """Check an ``onnx.ModelProto`` fully, then write it as one file (no external data)."""
    import onnx

    onnx.checker.check_model(model, full_check=True)
    with atomic_path(path) as tmp:
        onnx.save_model(model, str(tmp), save_as_external_data=False)


READ_ADVICE = "pass a run dir or the best.pt that `wildcheck train` wrote"


def load_checkpoint(path: str | Path, advice: str = READ_ADVICE, what: str = "wildcheck checkpoint") -> dict:
    """Load a wildcheck checkpoint safely (tensors and plain containers only); a file torch cannot read that
    way (truncated, an ONNX model, not a checkpoint, or holding code) is a client error, not a traceback, and
    the message never suggests loading it unsafely (torch's own advice, ``weights_only=False``). ``advice``: what
    the user can do instead, which depends on why the file was read (``--resume`` cannot use a run's best.pt);
    ``what``: the kind of file expected (``state dict`` for ``model.pretrained``)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"checkpoint {path} not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # whatever torch raises on a file that is not a safe checkpoint (KeyError on text)
        if path.suffix.lower() == ".onnx":
            why = f"an exported ONNX model, not a {what}"
        elif isinstance(exc, (RuntimeError, EOFError)) and str(exc).strip():  # truncated: torch says so
            why = f"not a readable {what} ({str(exc).strip().splitlines()[0]})"
        else:  # pickle.UnpicklingError: not a torch file, or one holding objects that could run code when loaded
            why = (f"not a readable {what} (empty, not a torch file, or holding more than tensors and "
                   "plain containers, which are never loaded)")
        raise InvalidInput(f"{path} is {why}; {advice}") from exc
