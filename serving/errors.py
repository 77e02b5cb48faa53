"""The one base class of wildcheck's user-facing errors.

A ``WildcheckError`` is a mistake the user can fix (a missing file, a bad config value, a model and gallery that
do not belong together): its message says what to do next. The CLI catches it once, in ``main()``, prints the
message and exits with status 2; anything else is a bug and keeps its traceback. It lives on the serving side
so that serving's errors (contract, gallery, policy) can share it without importing training.
"""


class WildcheckError(Exception):
    """A mistake the user can fix; the message says how."""
