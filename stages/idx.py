"""The idx format of the original MNIST files (yann.lecun.com's train-images-idx3-ubyte...).

A big-endian header: two zero bytes, a type code (0x08 uint8, 0x0D float32), the number of
dimensions, then one uint32 size per dimension; the values follow in C order. The files are
distributed gzip-compressed.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib

import numpy as np

from stages.errors import DataError

TYPES = {0x08: np.dtype(np.uint8), 0x0D: np.dtype(">f4")}


def encode(array: np.ndarray) -> bytes:
    """The idx bytes of a uint8 or float32 array (not compressed)."""
    array = np.asarray(array)
    code = {np.dtype(np.uint8): 0x08, np.dtype(np.float32): 0x0D}.get(array.dtype)
    if code is None:
        raise ValueError(f"idx holds uint8 or float32 here, not {array.dtype}")
    header = struct.pack(f">HBB{array.ndim}I", 0, code, array.ndim, *array.shape)
    return header + np.ascontiguousarray(array, dtype=TYPES[code]).tobytes()


def parse(payload: bytes, name: str, ndim: int) -> np.ndarray:
    """An uncompressed idx file of uint8 values with `ndim` dimensions -> a uint8 array."""
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


def parse_gz(raw: bytes, name: str, ndim: int) -> np.ndarray:
    """A gzip-compressed idx file (as MNIST is distributed) -> a uint8 array."""
    try:
        payload = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{name}: not a valid gzip file ({err})") from None
    return parse(payload, name, ndim)
