"""Helpers shared by every stage: params, atomic writes, safe data loading, drawing, tiling.

Nothing here imports TensorFlow, so params are validated and bad data is refused in
well under a second, before any heavy work starts.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import gzip
import io
import json
import math
import os
import re
import shutil
import struct
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import yaml

PARAMS_FILE = "params.yaml"
IMAGE_SIDE = 28
MNIST_KEYS = ("x_train", "y_train", "x_test", "y_test")
PROCESSED_KEYS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
# The original script's console palette: space is background, '@' the brightest stroke.
PALETTE = " .:-=+*#%@"


class PipelineError(Exception):
    """An error the user can fix; reported as one line, never as a traceback."""


class ParamError(PipelineError):
    pass


class DataError(PipelineError):
    pass


class WriteError(PipelineError):
    """An output could not be written: disk full, quota, read-only file system, ..."""


def run(main) -> None:
    """Run a stage's main(); turn expected failures into one line and a non-zero exit."""
    try:
        main()
    except PipelineError as err:
        # One line, always: some causes (urllib's redirect errors, YAML) span several.
        message = "; ".join(line.strip() for line in str(err).splitlines() if line.strip())
        print(f"error: {message}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted; no output was replaced", file=sys.stderr)
        sys.exit(130)


# --- params --------------------------------------------------------------------------


def load_params(section: str, path: str | os.PathLike = PARAMS_FILE) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            params = yaml.safe_load(f)
    except FileNotFoundError:
        raise ParamError(f"{path} not found: run from the project root") from None
    except yaml.YAMLError as err:
        raise ParamError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(params, dict) or not isinstance(params.get(section), dict):
        raise ParamError(f"{path} has no '{section}:' section")
    return params[section]


def check_keys(params: dict, section: str, allowed: set[str]) -> None:
    """Refuse missing keys and unknown ones (most often typos: suggest the likely key)."""
    for key in sorted(set(params) - allowed):
        close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ParamError(
            f"{section}.{key}: unknown key{hint}; allowed keys: {', '.join(sorted(allowed))}"
        )
    for key in sorted(allowed - set(params)):
        raise ParamError(f"{section}.{key}: missing from {PARAMS_FILE}")


def _bad(section: str, key: str, value, allowed: str) -> ParamError:
    return ParamError(f"{section}.{key}: got {value!r}; allowed: {allowed}")


def param_int(params: dict, section: str, key: str, lo: int, hi: int | None = None) -> int:
    value = params[key]
    allowed = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(section, key, value, allowed)
    if value < lo or (hi is not None and value > hi):
        raise _bad(section, key, value, allowed)
    return value


def param_float(
    params: dict, section: str, key: str, lo: float, hi: float, hi_open: bool = False
) -> float:
    value = params[key]
    allowed = f"a number in [{lo}, {hi}{')' if hi_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(section, key, value, allowed)
    if not (lo <= value <= hi) or (hi_open and value == hi) or math.isnan(value):
        raise _bad(section, key, value, allowed)
    return float(value)


def param_choice(params: dict, section: str, key: str, choices) -> str:
    value = params[key]
    if value not in choices:
        raise _bad(section, key, value, "one of " + ", ".join(choices))
    return value


def param_bool(params: dict, section: str, key: str) -> bool:
    value = params[key]
    if not isinstance(value, bool):
        raise _bad(section, key, value, "true or false")
    return value


# --- atomic writes -------------------------------------------------------------------


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


# --- safe loading and validation -----------------------------------------------------


ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first entry, or an empty zip


def load_npz(path, expected_keys, only=None) -> dict[str, np.ndarray]:
    """Load an .npz's arrays (all, or `only` some) without ever unpickling anything.

    The file must hold exactly `expected_keys`, each a plain .npy array; object arrays
    are refused.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as err:
        raise DataError(f"{path}: unreadable ({err.strerror or err})") from None
    if head not in ZIP_MAGIC:
        # np.load would take anything else for a .npy or a pickle: refuse it here.
        raise DataError(f"{path}: not an .npz file (not a zip archive)")
    try:
        with np.load(path, allow_pickle=False) as data:
            keys = set(data.files)
            if keys != set(expected_keys):
                missing = sorted(set(expected_keys) - keys)
                extra = sorted(keys - set(expected_keys))
                raise DataError(
                    f"{path}: wrong arrays (missing: {missing or 'none'}, "
                    f"unexpected: {extra or 'none'})"
                )
            arrays = {}
            for key in only or expected_keys:
                value = data[key]
                if not isinstance(value, np.ndarray):  # NpzFile hands non-.npy entries as bytes
                    raise DataError(f"{path}: {key} is not a .npy array")
                arrays[key] = value
            return arrays
    except DataError:
        raise
    except zipfile.BadZipFile as err:
        raise DataError(f"{path}: damaged or truncated zip archive ({err})") from None
    except ValueError as err:
        if "pickle" in str(err).lower():
            raise DataError(f"{path}: holds object arrays; refused (never unpickled)") from None
        raise DataError(f"{path}: unreadable .npz ({err})") from None
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: unreadable .npz ({err})") from None


def validate_mnist(data: dict[str, np.ndarray], source: str) -> None:
    """Check the Keras MNIST layout: uint8 images N×28×28, uint8 labels 0..9, counts equal."""
    for split in ("train", "test"):
        x, y = data[f"x_{split}"], data[f"y_{split}"]
        if x.dtype != np.uint8 or y.dtype != np.uint8:
            raise DataError(
                f"{source}: x_{split}/y_{split} must be uint8, got {x.dtype}/{y.dtype}"
            )
        if x.ndim != 3 or x.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
            raise DataError(f"{source}: x_{split} must be N×28×28, got shape {x.shape}")
        if y.ndim != 1:
            raise DataError(f"{source}: y_{split} must be 1-D, got shape {y.shape}")
        if len(x) == 0:
            raise DataError(f"{source}: x_{split} is empty")
        if len(x) != len(y):
            raise DataError(
                f"{source}: {len(x)} x_{split} images but {len(y)} y_{split} labels"
            )
        if y.max() > 9:
            raise DataError(f"{source}: y_{split} has label {int(y.max())}; allowed 0..9")


def validate_processed(data: dict[str, np.ndarray], source: str) -> None:
    """Check normalize's output (any subset of its arrays): float32 pixels in [0, 1],
    finite, N×28×28; uint8 labels 0..9; as many labels as images; train and test non-empty.
    """
    for split in ("train", "val", "test"):
        x, y = data.get(f"x_{split}"), data.get(f"y_{split}")
        if x is not None:
            if x.dtype != np.float32:
                raise DataError(f"{source}: x_{split} must be float32, got {x.dtype}")
            if x.ndim != 3 or x.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
                raise DataError(f"{source}: x_{split} must be N×28×28, got shape {x.shape}")
            if split != "val" and len(x) == 0:
                raise DataError(f"{source}: x_{split} is empty")
            check_finite(x, f"{source}: x_{split}")
            if x.size and (x.min() < 0 or x.max() > 1):
                raise DataError(f"{source}: x_{split} has pixels outside [0, 1]")
        if y is not None:
            if y.dtype != np.uint8 or y.ndim != 1:
                raise DataError(
                    f"{source}: y_{split} must be 1-D uint8, got {y.dtype} shape {y.shape}")
            if y.size and y.max() > 9:
                raise DataError(f"{source}: y_{split} has label {int(y.max())}; allowed 0..9")
        if x is not None and y is not None and len(x) != len(y):
            raise DataError(f"{source}: {len(x)} x_{split} images but {len(y)} y_{split} labels")


def load_mnist(path) -> dict[str, np.ndarray]:
    data = load_npz(path, MNIST_KEYS)
    validate_mnist(data, str(path))
    return data


IDX_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}


def parse_idx(raw: bytes, name: str, ndim: int) -> np.ndarray:
    """Parse a gzip-compressed idx file (the original MNIST layout) into a uint8 array."""
    try:
        payload = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{name}: not a valid gzip file ({err})") from None
    magic = 0x800 + ndim  # 0x0803 for images, 0x0801 for labels; type 0x08 = uint8
    if len(payload) < 4 + 4 * ndim:
        raise DataError(f"{name}: too short for an idx header")
    found = struct.unpack(">I", payload[:4])[0]
    if found != magic:
        raise DataError(f"{name}: bad idx magic number {found:#010x}, expected {magic:#010x}")
    dims = struct.unpack(f">{ndim}I", payload[4 : 4 + 4 * ndim])
    body = payload[4 + 4 * ndim :]
    if len(body) != math.prod(dims):
        raise DataError(
            f"{name}: header says {'×'.join(map(str, dims))} = {math.prod(dims)} bytes, "
            f"file holds {len(body)}"
        )
    return np.frombuffer(body, dtype=np.uint8).reshape(dims).copy()


def load_idx_dir(folder) -> dict[str, np.ndarray]:
    folder = Path(folder)
    data = {}
    for key, name in IDX_FILES.items():
        try:
            raw = (folder / name).read_bytes()
        except OSError as err:
            raise DataError(f"{folder / name}: unreadable ({err.strerror or err})") from None
        data[key] = parse_idx(raw, name, 3 if key.startswith("x") else 1)
    validate_mnist(data, str(folder))
    return data


def check_finite(array: np.ndarray, name: str) -> None:
    if not np.isfinite(array).all():
        raise DataError(f"{name}: holds NaN or infinite values")


# --- drawing and tiling --------------------------------------------------------------


def draw(image: np.ndarray) -> str:
    """The original's console drawing: one text row per image row, 10 brightness levels."""
    levels = (np.asarray(image, dtype=np.float64) / 255 * 9).astype(int)
    return "\n".join("".join(PALETTE[v] for v in row) for row in levels)


def tile(images: np.ndarray, per_row: int) -> np.ndarray:
    """Lay 28×28 tiles left-to-right, top-to-bottom on a white canvas, as the original did.

    The canvas is per_row tiles wide and ceil(n / per_row) tiles high. With no images the
    original would have made a zero-height canvas, which no viewer opens; we return one
    white row of tiles instead.
    """
    if per_row < 1:
        raise ValueError(f"per_row must be >= 1, got {per_row}")
    images = np.asarray(images, dtype=np.uint8)
    n = len(images)
    rows = max(1, math.ceil(n / per_row))
    side = IMAGE_SIDE
    canvas = np.full((rows * per_row, side, side), 255, dtype=np.uint8)
    canvas[:n] = images
    # (rows, per_row, 28, 28) -> (rows, 28, per_row, 28): rows of tiles, pixel rows inside.
    return canvas.reshape(rows, per_row, side, side).transpose(0, 2, 1, 3).reshape(
        rows * side, per_row * side
    )


def sha256_file(path, chunk: int = 1 << 20) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def read_csv_rows(path) -> list[dict[str, str]]:
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_csv(path, header: list[str], rows) -> None:
    buf = io.StringIO()
    buf.write(",".join(header) + "\n")
    for row in rows:
        buf.write(",".join(str(v) for v in row) + "\n")
    write_text(path, buf.getvalue())
