"""Bad input on any of our command lines: one line `error: <setting or path>: <problem>; <fix>`,
exit 2 (README "When input is wrong"). Tracebacks are for bugs."""

from __future__ import annotations

import sys
import threading


def bad_input(e: BaseException) -> int:
    """Prints `e` as the one error line and returns the exit code, 2. A failed Orbax read leaves
    its other reads' coroutines and threads to fail at shutdown; their reports would bury the one
    line under tracebacks of the same failure, so they are silenced."""
    print("error: " + " ".join(str(e).split()), file=sys.stderr, flush=True)
    sys.unraisablehook = lambda unraisable: None
    threading.excepthook = lambda args: None
    return 2
