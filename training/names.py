"""The rule for a model's name and version: each is one folder of a registry (``wildcheck promote``, ``serve
--registry``), and export applies the same rule before any work, so that no model is exported under a name that
promote would refuse, or that is a path or holds a space, newline or control character (it went into the server's
log lines and the model card as it was)."""

from __future__ import annotations

from serving.errors import InvalidInput

RESERVED_NAMES = {"current", "promotions.jsonl"}
# a version is <--version or run name>+<12 hex>: under 255 bytes, the folder-name limit of common file systems
MAX_FOLDER_NAME = 128
WEIGHTS_SUFFIX = len("+") + 12  # what export adds to a --version (serving.contract.weights_id)
FOLDER_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.+:")


def folder_name(value: str, option: str) -> str:
    """A model name or version is one folder of the registry: a path (``../x``, ``/abs``) would write outside
    it, and a reserved or hidden name would collide with the ``current`` link or its temporaries. Letters, digits
    and ``-_.+:`` only (an ensemble's default name has a ``:``): a space, newline or control character makes a
    folder that shell commands and the model card mangle."""
    if (not value or value in {".", ".."} or value in RESERVED_NAMES or value.startswith(".")
            or not set(value) <= FOLDER_CHARS):
        raise InvalidInput(f"{option} {value!r} cannot name a folder of the registry: use letters, digits and "
                           "-_.+: (not starting with a dot), e.g. 1.7.0; not a path")
    if len(value) > MAX_FOLDER_NAME:
        raise InvalidInput(f"{option} is {len(value)} characters long; a registry folder name takes at most "
                           f"{MAX_FOLDER_NAME} (a version gets +<12-character weights hash> added)")
    return value


def release_names(name: str | None, version: str | None) -> None:
    """``--name`` and ``--version`` as given to export or promote, before any work. A version gets the weights
    hash appended, so it may be that much shorter than a folder name (a 120-character one exported, and promote
    refused it after the export)."""
    if name is not None:
        folder_name(name, "--name")
    if version is not None:
        folder_name(version, "--version")
        if len(version) + WEIGHTS_SUFFIX > MAX_FOLDER_NAME:
            raise InvalidInput(f"--version is {len(version)} characters long; with the +<12-character weights hash> "
                               f"export adds, a registry folder name takes at most {MAX_FOLDER_NAME - WEIGHTS_SUFFIX}")
