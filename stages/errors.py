"""How a stage fails: the errors a user can fix, and the runner that reports them.

A stage's `main()` raises one of these; `run(main)` turns it into one line on stderr that
starts with `error:` and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import sys


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


def run(main, *args) -> None:
    """Run a stage's main(); turn expected failures into one line and a non-zero exit."""
    try:
        main(*args)
    except PipelineError as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted; no output was replaced", file=sys.stderr)
        sys.exit(130)
