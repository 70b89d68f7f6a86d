"""The idx format of the original MNIST files (yann.lecun.com's train-images-idx3-ubyte...).

A big-endian header: two zero bytes, a type code (0x08 uint8, 0x0D float32), the number of
dimensions, then one uint32 size per dimension; the values follow in C order. The files are
distributed gzip-compressed.
"""

from __future__ import annotations

import math
import struct
import zlib

import numpy as np

from stages.runtime.failures import DataError

TYPES = {0x08: np.dtype(np.uint8), 0x0D: np.dtype(">f4")}
# The largest idx file MNIST's layout needs is train-images-idx3-ubyte: 60,000 28×28 uint8
# images, 47 MB. 128 MiB (2.8× that) leaves room for a larger MNIST-format set while
# bounding what one parse allocates, whatever a header claims (up to 2**32-1 images) or a
# gzip stream inflates to.
MAX_PAYLOAD_BYTES = 128 << 20
CHUNK = 1 << 20  # bytes fed to, and taken from, the inflater at a time
GZIP_WBITS = 16 + zlib.MAX_WBITS  # zlib reads (and checks) gzip's own header and trailer
GZIP_MAGIC = b"\x1f\x8b"


def encode(array: np.ndarray) -> bytes:
    """The idx bytes of a uint8 or float32 array (not compressed)."""
    array = np.asarray(array)
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.float32): 0x0D}.get(array.dtype)
    if code is None:
        raise ValueError(f"idx holds uint8 or float32 here, not {array.dtype}")
    header = struct.pack(f">HBB{array.ndim}I", 0, code, array.ndim, *array.shape)
    return header + np.ascontiguousarray(array, dtype=TYPES[code]).tobytes()


def _header(head: bytes, name: str, ndim: int, tail: tuple | None) -> tuple[tuple, int]:
    """(dims, body bytes) an idx header declares, refused at once if MNIST's layout (magic,
    `tail`: the dims after the first) does not allow it or it exceeds the cap."""
    magic = 0x800 + ndim  # 0x0803 for images, 0x0801 for labels; type 0x08 = uint8
    if len(head) < 4 + 4 * ndim:
        raise DataError(f"{name}: too short for an idx header")
    found = struct.unpack(">I", head[:4])[0]
    if found != magic:
        raise DataError(f"{name}: bad idx magic number {found:#010x}, expected {magic:#010x}")
    dims = struct.unpack(f">{ndim}I", head[4 : 4 + 4 * ndim])
    size = math.prod(dims)
    shape = "×".join(map(str, dims))
    if tail is not None and tuple(dims[1:]) != tuple(tail):
        raise DataError(f"{name}: header says {shape}; expected N×{'×'.join(map(str, tail))}")
    if size > MAX_PAYLOAD_BYTES:
        raise DataError(f"{name}: header says {shape} = {size} bytes, over the "
                        f"{MAX_PAYLOAD_BYTES >> 20} MiB cap for one idx file; refused")
    return dims, size


def parse(payload: bytes, name: str, ndim: int, tail: tuple | None = None) -> np.ndarray:
    """An uncompressed idx file of uint8 values with `ndim` dimensions -> a uint8 array."""
    dims, size = _header(payload[: 4 + 4 * ndim], name, ndim, tail)
    body = payload[4 + 4 * ndim :]
    if len(body) != size:
        raise DataError(f"{name}: header says {'×'.join(map(str, dims))} = {size} bytes, "
                        f"file holds {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims).copy()


class _Gunzip:
    """Inflates gzip bytes on demand, never more than asked for: memory stays bounded by
    what the caller reads, whatever the stream would inflate to (a gzip bomb).

    Concatenated gzip members are one stream, as gzip.decompress reads them; zlib checks
    each member's CRC-32 and length at its end.
    """

    def __init__(self, raw: bytes, name: str):
        self.raw, self.name, self.pos = memoryview(raw), name, 0
        self.inflater = zlib.decompressobj(GZIP_WBITS)

    def _next_input(self) -> bytes:
        data = self.raw[self.pos : self.pos + CHUNK]
        self.pos += len(data)
        return bytes(data)

    def read(self, n: int) -> bytearray:
        """Up to n inflated bytes; fewer only at the end of the stream."""
        out = bytearray(n)
        view = memoryview(out)
        filled = 0
        while filled < n:
            if self.inflater.eof:
                data = self.inflater.unused_data or self._next_input()
                if not data:
                    break  # the end of the last member: a clean end
                if len(data) < 2:
                    data += self._next_input()
                if data[:2] != GZIP_MAGIC:
                    raise DataError(f"{self.name}: not a valid gzip file (bytes follow the "
                                    "end of its compressed stream)")
                self.inflater = zlib.decompressobj(GZIP_WBITS)  # another member follows
            else:
                data = self.inflater.unconsumed_tail or self._next_input()
                if not data:
                    raise DataError(f"{self.name}: not a valid gzip file (it ends inside "
                                    "its compressed stream: truncated?)")
            # At most a chunk per call: zlib would otherwise build a second copy of the body.
            block = self.inflater.decompress(data, min(n - filled, CHUNK))
            view[filled : filled + len(block)] = block
            filled += len(block)
        view.release()
        del out[filled:]
        return out


def _measure_rest(stream: _Gunzip, done: int) -> str:
    """How many bytes the stream holds in all, counted a chunk at a time and discarded, up
    to the cap: an exact count for a slightly long file, a bound for a gzip bomb."""
    while done <= MAX_PAYLOAD_BYTES:
        block = len(stream.read(CHUNK))
        if not block:
            return str(done)
        done += block
    return f"more than {MAX_PAYLOAD_BYTES}"


def parse_gz(raw: bytes, name: str, ndim: int, tail: tuple | None = None) -> np.ndarray:
    """A gzip-compressed idx file (as MNIST is distributed) -> a uint8 array.

    Inflated incrementally: the header first, refused at once if it claims more than the
    cap or a shape MNIST's layout does not allow (`tail`: the dims after the first, e.g.
    (28, 28)); then exactly the declared body, and one byte more to prove the stream ends
    there (if not, the rest is counted up to the cap, never kept). Memory stays bounded by
    the cap whatever the compressed input inflates to.
    """
    stream = _Gunzip(raw, name)
    try:
        dims, size = _header(bytes(stream.read(4 + 4 * ndim)), name, ndim, tail)
        body = stream.read(size)
        shape = "×".join(map(str, dims))
        if len(body) != size:
            raise DataError(f"{name}: header says {shape} = {size} bytes, "
                            f"file holds {len(body)}")
        if stream.read(1):
            raise DataError(f"{name}: header says {shape} = {size} bytes, file holds "
                            f"{_measure_rest(stream, size + 1)}")
    except zlib.error as err:
        raise DataError(f"{name}: not a valid gzip file ({err})") from None
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)
