"""How a benchmark script ends, as the ``wildcheck`` command does: a user's mistake is one line, not a traceback.

Every script under benchmarks/ ends with::

    if __name__ == "__main__":
        from _entry import run_main  # benchmarks/ is sys.path[0] when a script runs as `python benchmarks/X.py`

        run_main(main)

- a ``WildcheckError`` (a missing run dir or model, a bad ``--set``, a config that is not found ...) prints
  ``error: MESSAGE`` on stderr and exits with its ``exit_code`` (2 for a usage mistake);
- SIGTERM (``timeout``, ``kill``, a CI job cancelled) unwinds like Ctrl-C does, so ``finally`` blocks run: the
  servers a benchmark started are stopped and temporary folders removed, where Python's default for SIGTERM ends
  the process on the spot and leaves them running;
- Ctrl-C prints ``interrupted`` and exits 130, without a traceback.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable

from serving.errors import WildcheckError


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)


def run_main(main: Callable[[], int | None]) -> None:
    """Run ``main`` and exit with its status (None = 0), mapping user mistakes and signals as the module says."""
    signal.signal(signal.SIGTERM, _terminate)
    try:
        code = main()
    except WildcheckError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code)
