"""The one base class of wildcheck's user-facing errors.

A ``WildcheckError`` is a mistake the user can fix (a missing file, a bad config value, a model and gallery that
do not belong together): its message says what to do next. The CLI catches it once, in ``main()``, prints the
message and exits with status 2; anything else is a bug and keeps its traceback. It lives on the serving side
so that serving's errors (contract, gallery, policy) can share it without importing training.
"""


class WildcheckError(Exception):
    """A mistake the user can fix; the message says how.

    ``exit_code`` is the CLI's exit status: 2 for a usage mistake; a refusal by a quality gate (export parity,
    promote) or a labelling conflict sets 1, as a failed check does.
    """

    exit_code: int = 2


class InvalidInput(WildcheckError, ValueError):
    """Something the user gave (a file's contents, a setting, an option value) cannot be used."""


class MissingInput(WildcheckError, FileNotFoundError):
    """A file or folder the user named does not exist (or is not the kind expected)."""


def shown(value, most: int = 80) -> str:
    """``repr(value)`` cut to ``most`` characters: what a message echoes of a client's value, never all of it."""
    text = repr(value)
    return text if len(text) <= most else text[: most - 3] + "..."


def printable(text: str) -> str:
    """``text`` for a terminal, a report or a JSON header: a file name that is not UTF-8 (``os.fsdecode``'s
    surrogates) shows its bytes as ``\\xNN`` escapes; as it is, it failed a UTF-8 print or JSON encoding with a
    traceback after all the work. Any other text is returned as it is."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")
