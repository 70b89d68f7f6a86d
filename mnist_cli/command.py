"""How the commands end: one `error:` line and exit 1 for what the user can fix (as the
stages do), and quietly when the reader of their output goes away (`| head`)."""

from __future__ import annotations

import os
import sys

from stages.runtime.failures import run


def command(main) -> None:
    """Run a command's main(); its return value is the exit status."""
    try:
        run(lambda: sys.exit(main()))
    except BrokenPipeError:
        # Python's own advice (docs: signal, "Note on SIGPIPE"): no traceback, and no second
        # error when the interpreter flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
