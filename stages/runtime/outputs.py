"""Writing outputs: atomically (never a torn or partial file) and byte-stably.

Every output is written beside its final place and moved in only when complete, so readers
and DVC see the old file or the whole new one. Nothing written depends on the clock: equal
content gives equal bytes, so an unchanged result keeps its DVC hash.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from stages.runtime.failures import WriteError

# errno values meaning "the destination cannot take the data", whatever was being written.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def _write_error(err: OSError, path) -> WriteError:
    reason = err.strerror or str(err) or type(err).__name__
    return WriteError(f"{reason[0].lower()}{reason[1:]} writing {path}")


@contextlib.contextmanager
def disk_errors(path):
    """Report a full disk (quota, read-only file system) while writing `path` in one line."""
    try:
        yield
    except OSError as err:
        if err.errno in DISK_ERRNOS:
            raise _write_error(err, path) from None
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _tmp_prefix(path: Path) -> str:
    # The pid lets a later write tell a dead writer's leftovers from a live writer's.
    return f".{path.name}.{os.getpid()}."


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete temporaries beside `path` left by writers that were killed (SIGKILL, power).

    They are hidden files or folders `.<name>.<pid>.*.tmp` beside the output, never inside
    it, so DVC never tracks them; still, each can be as big as the output itself.
    """
    path = Path(path)
    prefix = f".{path.name}."
    removed = []
    try:
        candidates = [c for c in path.parent.iterdir() if c.name.startswith(prefix)]
    except OSError:
        return removed
    for candidate in candidates:
        # <pid>.<mkstemp's 8 random characters>.tmp or <pid>.old.tmp: nothing else.
        match = _TMP_TAIL.fullmatch(candidate.name[len(prefix):])
        if not match or _pid_alive(int(match[1])):
            continue
        if candidate.is_dir() and not candidate.is_symlink():
            shutil.rmtree(candidate, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                candidate.unlink()
        removed.append(candidate)
    return removed


_TMP_TAIL = re.compile(r"(\d+)\.(?:[a-z0-9_]{8}|old)\.tmp")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable; best effort (not every file system allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside `path`; move it into place only if the block succeeds.

    Readers (and DVC) see either the old file or the complete new one, never a torn write.
    A full disk raises WriteError (one line, no traceback) and leaves the old file as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would hide outputs from others
        finally:
            os.close(fd)
    except OSError as err:
        raise _write_error(err, path) from None
    try:
        with disk_errors(path):
            yield Path(tmp)
        try:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            raise _write_error(err, path) from None
        _fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Like atomic_path, for a directory output: build it aside, then swap it in.

    The temporary folder lives beside the output, never inside it, so a killed run cannot
    leave stray files in a directory DVC tracks.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide outputs from others
    except OSError as err:
        raise _write_error(err, path) from None
    old = path.parent / f"{_tmp_prefix(path)}old.tmp"
    try:
        with disk_errors(path):
            yield tmp
        try:
            if path.exists():
                os.replace(path, old)
            try:
                os.replace(tmp, path)
            except OSError:
                if old.exists():
                    os.replace(old, path)  # put the previous output back
                raise
        except OSError as err:
            raise _write_error(err, path) from None
        _fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path, data) -> None:
    # Sorted keys and a trailing newline keep diffs between runs small and stable.
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def round_floats(data, digits: int = 6):
    """Fixed precision for metrics files, so diffs show real changes only."""
    if isinstance(data, float):
        return round(data, digits)
    if isinstance(data, dict):
        return {k: round_floats(v, digits) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [round_floats(v, digits) for v in data]
    return data


def save_npz(path, **arrays: np.ndarray) -> None:
    """Write an uncompressed .npz atomically and byte-stably.

    np.savez stamps each zip entry with the current time, which would make DVC see a
    changed output on every run; a fixed timestamp keeps equal arrays byte-identical.
    """
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name in sorted(arrays):
                info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
                # C order keeps the bytes independent of the memory layout; a 0-d array
                # stays 0-d (np.ascontiguousarray would make it 1-d).
                array = np.asarray(arrays[name])
                if array.ndim:
                    array = np.ascontiguousarray(array)
                with zf.open(info, "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, array, allow_pickle=False)


def save_image(path, pixels: np.ndarray) -> None:
    """Save an 8-bit grayscale image (BMP or PNG by suffix) atomically."""
    from PIL import Image

    path = Path(path)
    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(pixels, dtype=np.uint8), mode="L").save(
            tmp, format=path.suffix.lstrip(".").upper().replace("JPG", "JPEG")
        )


def write_csv(path, header: list[str], rows) -> None:
    """CSV with a header row; fields holding a comma or a quote are quoted."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, buf.getvalue())
