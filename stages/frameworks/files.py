"""A model folder's files read as untrusted input: regular files, sizes checked before reading.

A model folder may come from anyone (`mnist-predict --model-dir`, another revision, a
registry, a committee member): every reader of one goes through here first, so that a
folder that is small on disk, or a FIFO, a device or a link to one, cannot make a command
block or use unbounded memory. Each framework's model.py then checks its own format's
header against the networks of this project before it reads the weights.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from stages.runtime.failures import DataError

RUN_INFO_CAP = 64 << 10  # bytes: run_info.json is a few hundred


def size_of(path: Path, cap: int, what: str = "model file") -> int:
    """The size of the regular file at `path` (a link is followed), at most `cap` bytes;
    else one line naming the file and the reason."""
    try:
        info = os.stat(path)
    except OSError as err:
        raise DataError(f"{path}: cannot read the {what} ({err.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise DataError(f"{path}: not a regular file; a {what} is one")
    if info.st_size > cap:
        raise DataError(f"{path}: {info.st_size:,} bytes; a {what} of this project has at "
                        f"most {cap:,}")
    return info.st_size


def read_capped(path: Path, cap: int, what: str = "model file") -> bytes:
    """The bytes of the regular file at `path`, refused unread if it holds more than `cap`
    (and if it grows while read: at most cap + 1 bytes are read)."""
    size_of(path, cap, what)
    try:
        with open(path, "rb") as f:
            data = f.read(cap + 1)
    except OSError as err:
        raise DataError(f"{path}: cannot read the {what} ({err.strerror})") from None
    if len(data) > cap:
        raise DataError(f"{path}: more than {cap:,} bytes; a {what} of this project has at "
                        f"most {cap:,}")
    return data
