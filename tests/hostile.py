"""Inputs built to break a reader, and the bounds its refusal must keep.

Sources that declare more than MNIST's layout allows, or never end, must be refused from
their headers or at a size cap, in bounded memory and seconds. Every check that could
exhaust memory runs in a child interpreter (probe) that reports its own peak RSS (VmHWM)
and time; zip and gzip bombs are built from one compressed megabyte of zeros repeated, so
the tests stay light. Also here: a PNG bomb, a pickle that leaves a mark when unpickled, and
the settings of the property tests that feed readers damaged files.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from testbed.processes import run_env
from tests.paths import ROOT

# A child that imports numpy and stages.download peaks at ~40 MiB; the largest array any of
# these refusals may legitimately hold is 47 MB (60,000 images, uint8). Every bomb inflates
# to 2 GiB and every claim is gigabytes, so a loader that trusted them would pass this
# bound by far.
MEMORY_BOUND_MIB = 200
TIME_BOUND_S = 20  # a bound, not a benchmark: each refusal takes well under a few seconds
BOMB_BYTES = 2 << 30  # what each bomb inflates to
MIB = 1 << 20
FULL_TRAIN = (60_000, 28, 28)
FULL_IMAGES = 60_000 * 28 * 28

PROBE = """
import json, resource, sys, time
started = time.perf_counter()
args = sys.argv[1:]
from stages.runtime.failures import PipelineError
try:
{code}
    outcome = {{"result": repr(result)}}
except PipelineError as err:
    outcome = {{"error": type(err).__name__, "message": str(err)}}
outcome["seconds"] = round(time.perf_counter() - started, 3)
try:  # this process's own high-water mark: ru_maxrss would carry the parent's over exec
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
outcome["peak_mib"] = round(peak / 1024, 1)
print("PROBE " + json.dumps(outcome))
"""


def probe(code: str, *args) -> dict:
    """Run `code` (which sets `result`) in a fresh interpreter; its outcome, peak RSS and
    time. A child measures only itself: this test process's memory does not count."""
    import json
    import textwrap
    import time

    env = run_env()
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                "ALL_PROXY"):
        env.pop(var, None)
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(code=textwrap.indent(code, "    ")), *map(str, args)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    outcome = json.loads(lines[-1][len("PROBE "):])
    outcome["wall"] = round(time.perf_counter() - started, 3)
    print(f"\nprobe: {outcome}")  # shown with -s: the measured peak and time
    return outcome


def refused_in_bounds(outcome: dict, kind: str, source, pattern: str) -> str:
    """The child was refused with `kind`, in one line naming the source, in bounds."""
    import re

    assert outcome.get("error") == kind, outcome
    message = outcome["message"]
    assert message.startswith(str(source)) and "\n" not in message, message
    assert re.search(pattern, message), message
    assert outcome["peak_mib"] < MEMORY_BOUND_MIB, outcome
    assert outcome["wall"] < TIME_BOUND_S, outcome
    return message


def deflate_zeros(size: int) -> bytes:
    """Raw deflate blocks inflating to `size` zero bytes (a multiple of 1 MiB): one fully
    flushed, self-contained compressed MiB repeated, ~1 KB per MiB."""
    import zlib

    assert size % MIB == 0
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(MIB)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return block * (size // MIB)


def deflate(data: bytes) -> bytes:
    """Raw deflate blocks of data, not final: more blocks may follow."""
    import zlib

    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush(zlib.Z_FULL_FLUSH)


FINAL_BLOCK = b"\x03\x00"  # an empty final deflate block: the end of a stream


def crc_of(head: bytes, zeros: int) -> int:
    """CRC-32 of head followed by `zeros` zero bytes, computed a MiB at a time."""
    import zlib

    crc, block = zlib.crc32(head), bytes(MIB)
    for _ in range(zeros // MIB):
        crc = zlib.crc32(block, crc)
    return zlib.crc32(bytes(zeros % MIB), crc)


def png_bomb(path: Path, side: int = 20_000) -> Path:
    """A valid 1-bit PNG of side×side black pixels (400 Mpx at the default): ~50 MB of rows
    deflated to ~50 KB, written row by row, so making it costs no memory."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    deflate, row = zlib.compressobj(9), b"\0" * (1 + (side + 7) // 8)
    body = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body)
                     + chunk(b"IEND", b""))
    return path


class MakesMarker:
    """Unpickling this creates the file `marker`: proof that something was unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def property_settings(max_examples: int = 60):
    """Hypothesis settings for properties whose examples write files: no per-example
    deadline (disk and zip work vary with the machine's load), no too-slow health check."""
    from hypothesis import HealthCheck, settings

    return settings(max_examples=max_examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])
