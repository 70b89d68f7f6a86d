"""How a stage fails: the errors a user can fix, and the runner that reports them.

A stage's `main()` raises one of these; `run(main)` turns it into one line on stderr that
starts with `error:` and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading

INTERRUPTED = "error: interrupted; no output was replaced"


class PipelineError(Exception):
    """An error the user can fix; reported as one line, never as a traceback."""


class ParamError(PipelineError):
    """params.yaml is unreadable, or a key is missing, unknown, mistyped or out of range."""


class DataError(PipelineError):
    """An input file is missing, malformed, or not what the stage expects."""


class WriteError(PipelineError):
    """An output could not be written: disk full, quota, read-only file system, ..."""


def one_line(err: BaseException) -> str:
    # Some causes (urllib's redirect errors, YAML) span several lines.
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip())


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM, raised where the stage chose to stop (deferred_interrupts)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# Signals received while deferred_interrupts is active, oldest first.
_pending: list[int] = []


def _note(signum: int, frame) -> None:
    """Signal handler: take note of the first signal; a second one ends the process now.

    Python runs it between two bytecodes of the main thread, possibly in the middle of
    library code or of a write to stdout: so it only appends to a list, or, the second time,
    writes the line with one system call and exits without unwinding.
    """
    if _pending:
        os.write(2, f"{INTERRUPTED}\n".encode())
        os._exit(128 + signum)
    _pending.append(signum)


@contextlib.contextmanager
def deferred_interrupts(signals=(signal.SIGINT, signal.SIGTERM)):
    """Within the block, Ctrl-C and SIGTERM only take note; stop_if_interrupted() stops.

    Python's default Ctrl-C raises KeyboardInterrupt between any two bytecodes, e.g. inside
    TensorFlow's Python code while it traces or converts a tensor, which then fails with an
    unrelated error (a TypeError) and a traceback. Deferred, the interrupt is raised only
    where the stage calls stop_if_interrupted(), in its own code, between two steps.

    A second signal means "now": the process writes the one line and exits at once
    (128 + signal number), leaving its hidden temporaries as a kill does; the next write of
    each output sweeps them away. Outside the main thread (no signals there) or inside another
    such block it does nothing; the previous handlers are back when the block ends.
    """
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signals[0]) is _note):  # no signals here, or already deferred
        yield
        return
    previous = {signum: signal.signal(signum, _note) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _pending.clear()


def stop_if_interrupted() -> None:
    """Raise Interrupted if a deferred signal has arrived: a stage's chosen stopping point."""
    if _pending:
        raise Interrupted(_pending[0])


def run(main, *args) -> None:
    """Run a stage's main(); turn expected failures into one line and a non-zero exit.

    Ctrl-C exits 130; SIGTERM, when the stage defers it (deferred_interrupts), 143.
    """
    try:
        main(*args)
    except PipelineError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt as err:
        print(INTERRUPTED, file=sys.stderr)
        sys.exit(128 + getattr(err, "signum", signal.SIGINT))
