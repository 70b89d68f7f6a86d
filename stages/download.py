"""Stage 1: fetch MNIST and verify it -> data/raw/mnist.npz.

Sources are tried in order: `download.url`, then each of `download.mirrors`. A source is
an http(s) URL, a file:// URL or a plain local path, and carries its own format (npz, or a
folder of the four original idx files) and sha256. Nothing reaches the output path
until its hash and its content have been checked, so data/raw never holds a partial,
truncated or tampered file.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import stat
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from stages.data import idx
from stages.data.mnist import IMAGE_SIDE, MNIST_KEYS, load_mnist, validate_mnist
from stages.runtime import params
from stages.runtime.failures import DataError, PipelineError, run
from stages.runtime.outputs import atomic_path, disk_errors, save_npz

CHUNK = 1 << 16
# The most one fetched file may hold: a source that sends more (a server that streams
# forever, /dev/zero, a wrong multi-GB file) is refused once it passes the cap, and at once
# if its Content-Length or file size already does. Both caps bound the disk a download
# fills and what parsing it then reads, with room for a larger MNIST-format set.
MAX_NPZ_BYTES = 256 << 20  # Keras' mnist.npz: 11 MB; 55 MB even stored uncompressed (4.9×)
MAX_IDX_BYTES = 64 << 20  # per .gz file; the largest, train-images-idx3-ubyte.gz: 9.9 MB
# The longest one attempt at one file may take. `download.timeout` bounds silence only: a
# server trickling a byte every few seconds would otherwise keep the stage for days.
# 30 minutes moves 11 MB at 6 kB/s; a retry (at most download.retries) starts a new clock.
MAX_FETCH_SECONDS = 1800.0
# Where each array of the Keras layout comes from in the original idx files.
IDX_FILES = dict(zip(MNIST_KEYS, params.IDX_NAMES))


class DownloadError(PipelineError):
    pass


class PermanentError(DownloadError):
    """Retrying the same source cannot help (404, wrong hash, not MNIST)."""


def sha256_file(path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


# --- fetching one file ---------------------------------------------------------------


def _progress(name: str, total: int | None):
    """A live bar on a terminal; a few plain lines in logs (e.g. under `dvc repro`)."""
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=name, file=sys.stderr,
                disable=None if sys.stderr.isatty() else True, leave=False)


def _local_path(source: str) -> Path | None:
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme == "file":
        return Path(urllib.request.url2pathname(parsed.path))
    if parsed.scheme in ("", ) or (len(parsed.scheme) == 1 and source[1:3] in (":\\", ":/")):
        return Path(source)
    return None


def _network(source: str, call, timeout: float):
    """Run one network step; map its failures to DownloadError (retryable) or PermanentError.

    Only network steps go through here: a local write that fails (disk full) is not a
    download fault, must not be retried, and reaches the user as a WriteError.
    """
    try:
        return call()
    except urllib.error.HTTPError as err:
        if 300 <= err.code < 400:
            # urllib gives up after 10 redirects or 4 visits to one URL (a loop).
            raise PermanentError(
                f"{source}: redirect loop or too many redirects (last: HTTP {err.code})"
            ) from None
        cause = f"{source}: HTTP {err.code} {err.reason}"
        if err.code >= 500 or err.code in (408, 429):
            raise DownloadError(cause) from None
        raise PermanentError(cause) from None
    except urllib.error.URLError as err:
        reason = err.reason
        if isinstance(reason, TimeoutError):
            raise DownloadError(f"{source}: timed out: no data for {timeout:g}s "
                                "(download.timeout)") from None
        if isinstance(reason, OSError) and reason.strerror:
            reason = reason.strerror
        raise DownloadError(f"{source}: {reason}") from None
    except TimeoutError:
        raise DownloadError(f"{source}: timed out: no data for {timeout:g}s "
                            "(download.timeout)") from None
    except http.client.IncompleteRead as err:
        raise DownloadError(
            f"{source}: connection dropped after {len(err.partial)} bytes of the last block"
        ) from None
    except (OSError, http.client.HTTPException) as err:
        # Resets and disconnects mid-body land here.
        raise DownloadError(f"{source}: {type(err).__name__}: {str(err) or 'no details'}") from None


def _too_large(source: str, limit: int, what: str) -> PermanentError:
    cap = f"{limit >> 20} MiB" if limit % (1 << 20) == 0 else f"{limit} bytes"
    return PermanentError(f"{source}: {what}, over the cap of {cap} for one downloaded "
                          "file; refused (not the dataset, or a source that never ends)")


def _copy_bounded(source: str, read, out, limit: int, bar=None,
                  deadline: float = MAX_FETCH_SECONDS) -> int:
    """Copy read() blocks into out until the end; refuse once more than limit arrive, and
    give up (retryable) when the whole copy takes longer than `deadline` seconds."""
    received = 0
    end = time.monotonic() + deadline
    while block := read():
        received += len(block)
        if received > limit:
            raise _too_large(source, limit, f"more than {limit} bytes received")
        if time.monotonic() > end:
            raise DownloadError(f"{source}: too slow: {received} bytes in {deadline:g}s, "
                                "the most one attempt may take")
        out.write(block)
        if bar is not None:
            bar.update(len(block))
    return received


def _copy_local(source: str, local: Path, dest: Path, limit: int) -> None:
    """Copy a local file, bounded: a regular file by its size up front, anything else
    (a device such as /dev/zero, a pipe) by counting what it yields."""
    try:
        info = local.stat()
    except FileNotFoundError:
        raise PermanentError(f"{source}: no such file") from None
    except OSError as err:
        raise PermanentError(f"{source}: cannot read: {err.strerror or err}") from None
    if stat.S_ISDIR(info.st_mode):
        raise PermanentError(f"{source}: is a folder, not a file")
    if stat.S_ISREG(info.st_mode) and info.st_size > limit:
        raise _too_large(source, limit, f"{info.st_size} bytes")
    try:
        src = open(local, "rb")
    except OSError as err:
        raise PermanentError(f"{source}: cannot read: {err.strerror or err}") from None
    with src, open(dest, "wb") as out:
        _copy_bounded(source, lambda: src.read(CHUNK), out, limit)


def fetch_once(source: str, dest: Path, timeout: float, limit: int = MAX_NPZ_BYTES,
               deadline: float = MAX_FETCH_SECONDS) -> None:
    """Copy one source to dest, at most `limit` bytes of it. Raises DownloadError
    (retryable) or PermanentError."""
    local = _local_path(source)
    if local is not None:
        _copy_local(source, local, dest, limit)
        return
    if urllib.parse.urlparse(source).scheme not in ("http", "https"):
        raise PermanentError(f"{source}: unsupported scheme; use http(s)://, file:// or a path")
    request = urllib.request.Request(source, headers={"User-Agent": "mnist-pipeline"})
    with _network(source, lambda: urllib.request.urlopen(request, timeout=timeout),
                  timeout) as response:
        total = response.headers.get("Content-Length")
        total = int(total) if total and total.isdigit() else None
        if total is not None and total > limit:
            raise _too_large(source, limit, f"Content-Length declares {total} bytes")
        with open(dest, "wb") as out, _progress(Path(source).name, total) as bar:
            # read1: what has arrived (one recv at most), so a trickle meets the deadline
            # check between blocks instead of filling a whole CHUNK first.
            received = _copy_bounded(
                source, lambda: _network(source, lambda: response.read1(CHUNK), timeout),
                out, limit, bar, deadline)
        if total is not None and received != total:
            raise DownloadError(
                f"{source}: connection dropped after {received} of {total} bytes")


def _looks_like_html(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(512).lstrip().lower()
    except OSError:
        return False
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml"))


_HTML_HINT = " (the server sent a web page, not the data: an error or login page?)"


def verify_hash(path: Path, expected: str | None, source: str) -> None:
    if expected is None:
        return
    actual = sha256_file(path)
    if actual != expected:
        hint = _HTML_HINT if _looks_like_html(path) else ""
        raise PermanentError(
            f"{source}: sha256 {actual} does not match expected {expected}{hint}")


def fetch_verified(source: str, expected: str | None, dest: Path, cfg: dict,
                   limit: int = MAX_NPZ_BYTES) -> None:
    """Fetch with retries and exponential backoff; only transient faults are retried."""
    for attempt in range(cfg["retries"] + 1):
        try:
            fetch_once(source, dest, cfg["timeout"], limit)
            verify_hash(dest, expected, source)
            return
        except PermanentError:
            raise
        except DownloadError as err:
            if attempt == cfg["retries"]:
                raise
            wait = cfg["backoff"] * 2**attempt
            print(f"warning: {err}; retrying in {wait:g}s ({attempt + 1}/{cfg['retries']})",
                  file=sys.stderr)
            time.sleep(wait)


# --- one source, whole dataset -------------------------------------------------------


def fetch_npz(source: str, expected, cfg: dict, output: Path) -> None:
    with atomic_path(output) as tmp:
        fetch_verified(source, expected, tmp, cfg)
        try:
            load_mnist(tmp)
        except DataError as err:
            hint = _HTML_HINT if _looks_like_html(tmp) else ""
            raise PermanentError(
                f"{source}: not MNIST: {str(err).split(': ', 1)[-1]}{hint}") from None


def fetch_idx(base: str, expected, cfg: dict, output: Path) -> None:
    # Hidden, pid-tagged and beside the output, like atomic_path's temporaries.
    with disk_errors(output), tempfile.TemporaryDirectory(
        prefix=f".{output.name}.{os.getpid()}.", suffix=".tmp", dir=output.parent
    ) as tmp:
        arrays = {}
        for key, name in IDX_FILES.items():
            url = base.rstrip("/") + "/" + name
            fetch_verified(url, None if expected is None else expected[name], Path(tmp) / name,
                           cfg, MAX_IDX_BYTES)
            images = key.startswith("x")
            try:
                arrays[key] = idx.parse_gz((Path(tmp) / name).read_bytes(), url,
                                           3 if images else 1,
                                           (IMAGE_SIDE, IMAGE_SIDE) if images else ())
            except DataError as err:
                raise PermanentError(str(err)) from None
        try:
            validate_mnist(arrays, base)
        except DataError as err:
            raise PermanentError(str(err)) from None
        save_npz(output, **arrays)


def existing_is_valid(output: Path, source: dict) -> bool:
    """Reuse a file already at the output path only if it matches an npz source's hash."""
    if source["format"] != "npz" or source["sha256"] is None or not output.is_file():
        return False
    try:
        if sha256_file(output) != source["sha256"]:
            return False
        load_mnist(output)
        return True
    except DataError:
        return False


def download(cfg: dict, output: Path) -> str:
    """Try each source in order; return the URL of the one that worked."""
    output.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    sources = cfg["sources"]
    for source in sources:
        url, expected = source["url"], source["sha256"]
        if existing_is_valid(output, source):
            print(f"{output} already holds verified data from a source with sha256 {expected}")
            return url
        if expected is None:
            print(f"warning: sha256 is null: {url} is NOT verified against a known hash; "
                  "only its content is checked", file=sys.stderr)
        fetch = fetch_npz if source["format"] == "npz" else fetch_idx
        try:
            fetch(url, expected, cfg, output)
            return url
        except DownloadError as err:
            failures.append(err)
            if len(sources) > 1:
                print(f"warning: {err}; trying the next source", file=sys.stderr)
    if len(failures) == 1:
        raise failures[0]  # keeps its kind: PermanentError (404, hash) or DownloadError
    raise DownloadError(f"all {len(failures)} sources failed: " + " | ".join(map(str, failures)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="the verified .npz")
    args = parser.parse_args(argv)
    cfg = params.load()["download"]
    started = time.perf_counter()
    source = download(cfg, args.out)
    print(f"download: {args.out} from {source} in {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    run(main)
