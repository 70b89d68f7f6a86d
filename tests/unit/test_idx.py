"""stages/data/idx.py: the idx format of the original MNIST files, read and (for tests) written."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from stages.data import idx
from stages.data.mnist import load_mnist
from stages.runtime.failures import DataError
from tests.digits import gz_idx
from tests.hostile import (
    BOMB_BYTES,
    FINAL_BLOCK,
    FULL_IMAGES,
    FULL_TRAIN,
    MIB,
    crc_of,
    deflate,
    deflate_zeros,
    probe,
    refused_in_bounds,
)
from tests.paths import FIXTURE

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def with_header(array: np.ndarray, magic: int | None = None, dims=None) -> bytes:
    """gz_idx(array) with its magic number and/or its dimensions replaced."""
    payload = idx.encode(array)
    body = payload[4 + 4 * array.ndim:]
    dims = array.shape if dims is None else dims
    magic = struct.unpack(">I", payload[:4])[0] if magic is None else magic
    return gzip.compress(struct.pack(f">I{len(dims)}I", magic, *dims) + body)


# --- encode ----------------------------------------------------------------------------


def test_encode_writes_lecuns_header_then_the_values():
    assert idx.encode(np.array([7, 3], np.uint8)) == bytes.fromhex("00000801 00000002 0703")
    images = np.arange(12, dtype=np.uint8).reshape(2, 3, 2)
    assert idx.encode(images) == bytes.fromhex("00000803 00000002 00000003 00000002") + \
        bytes(range(12))


def test_encode_float32_is_type_0x0d_big_endian():
    raw = idx.encode(np.array([1.0, -2.5], np.float32))
    assert raw[:8] == bytes.fromhex("00000d01 00000002")
    assert raw[8:] == struct.pack(">2f", 1.0, -2.5)


@pytest.mark.parametrize("dtype", [np.int64, np.float64, np.int8])
def test_encode_refuses_other_types(dtype):
    with pytest.raises(ValueError, match="uint8 or float32"):
        idx.encode(np.zeros(3, dtype))


# --- parse -----------------------------------------------------------------------------


def test_parse_gz_images_and_labels():
    images = np.arange(2 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(2, 28, 28)
    assert np.array_equal(idx.parse_gz(gz_idx(images), "x", 3), images)
    labels = np.array([5, 0, 4], np.uint8)
    parsed = idx.parse_gz(gz_idx(labels), "y", 1)
    assert parsed.dtype == np.uint8 and parsed.tolist() == [5, 0, 4]
    assert parsed.flags.writeable  # a copy, not a view of the gzip buffer


def test_parse_the_real_header_bytes():
    raw = bytes.fromhex("00000801 00000002") + bytes([7, 3])
    assert idx.parse(raw, "labels", 1).tolist() == [7, 3]
    assert idx.parse_gz(gzip.compress(raw), "labels", 1).tolist() == [7, 3]


@pytest.mark.parametrize("raw, match", [
    (with_header(np.zeros(3, np.uint8), magic=0x0803), "bad idx magic number 0x00000803"),
    (gz_idx(np.zeros(3, np.float32)), "bad idx magic number 0x00000d01"),  # float type
    (with_header(np.zeros(3, np.uint8), dims=(4,)), "header says 4 = 4 bytes, file holds 3"),
    (with_header(np.zeros(5, np.uint8), dims=(4,)), "header says 4 = 4 bytes, file holds 5"),
    (gzip.compress(b"\x00\x00\x08"), "too short for an idx header"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x01\x07", "not a valid gzip file"),
    (gz_idx(np.zeros(300, np.uint8))[:-12], "not a valid gzip file"),  # truncated
], ids=["images-magic", "float-type", "body-short", "body-long", "short-header", "not-gzip",
        "truncated-gzip"])
def test_parse_gz_refuses_bad_files(raw, match):
    with pytest.raises(DataError, match=f"^f.gz: {match}"):
        idx.parse_gz(raw, "f.gz", 1)


def test_images_file_read_as_labels_is_refused():
    images = np.zeros((2, 28, 28), np.uint8)
    with pytest.raises(DataError, match="bad idx magic number 0x00000803, expected 0x00000801"):
        idx.parse_gz(gz_idx(images), "f.gz", 1)


def test_parse_gz_corrupt_deflate_stream_is_a_data_error():
    raw = bytearray(gz_idx(np.arange(200, dtype=np.uint8)))
    raw[12:20] = b"\xff" * 8  # inside the deflate stream
    with pytest.raises(DataError, match="f.gz: not a valid gzip file"):
        idx.parse_gz(bytes(raw), "f.gz", 1)


# --- properties ------------------------------------------------------------------------

idx_arrays = st.one_of(
    hnp.arrays(np.uint8, st.tuples(st.integers(0, 40)), elements=st.integers(0, 255)),
    hnp.arrays(np.uint8, st.tuples(st.integers(0, 4), st.integers(0, 6), st.integers(0, 6)),
               elements=st.integers(0, 255)),
)


@SETTINGS
@given(idx_arrays)
def test_round_trip(array):
    got = idx.parse_gz(gz_idx(array), "f", array.ndim)
    assert got.shape == array.shape and got.dtype == np.uint8
    assert np.array_equal(got, array)


@SETTINGS
@given(idx_arrays, st.integers(1, 50))
def test_body_of_the_wrong_length_is_refused(array, cut):
    raw = idx.encode(array)
    header = 4 + 4 * array.ndim
    shorter = raw[: max(header, len(raw) - cut)]
    longer = raw + bytes(cut)
    for payload in ([shorter] if len(shorter) != len(raw) else []) + [longer]:
        with pytest.raises(DataError, match="header says"):
            idx.parse_gz(gzip.compress(payload), "f", array.ndim)


@SETTINGS
@given(idx_arrays, st.integers(0, 2**32 - 1))
def test_any_other_magic_is_refused(array, magic):
    assume(magic != 0x800 + array.ndim)
    with pytest.raises(DataError, match="bad idx magic number"):
        idx.parse_gz(with_header(array, magic=magic), "f", array.ndim)


@SETTINGS
@given(st.binary(max_size=200), st.sampled_from((1, 3)))
def test_arbitrary_bytes_give_an_array_or_a_data_error(blob, ndim):
    for raw in (blob, gzip.compress(blob)):
        try:
            got = idx.parse_gz(raw, "f", ndim)
        except DataError as err:
            assert str(err).startswith("f: ") and "\n" not in str(err)
        else:  # the bytes happened to be a valid file: then they are exactly its values
            assert got.ndim == ndim and idx.encode(got) == gzip.decompress(raw)


# --- sources over the limits: headers claiming too much, gzip bombs --------------------
# Each check that could exhaust memory runs in a child interpreter (tests.hostile.probe) that
# reports its own peak RSS and time; the bomb is crafted in tmp_path, a few MB on disk.


def gzip_member(head: bytes, zeros: int = 0) -> bytes:
    """A real gzip file: head then `zeros` zero bytes, with a correct CRC-32 and length."""
    body = deflate(head) + (deflate_zeros(zeros) if zeros else b"") + FINAL_BLOCK
    trailer = struct.pack("<2L", crc_of(head, zeros), (len(head) + zeros) & 0xFFFFFFFF)
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + body + trailer


def idx_header(*dims, ndim=None) -> bytes:
    return struct.pack(f">I{len(dims)}I", 0x800 + (ndim or len(dims)), *dims)


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> Path:
    """One folder for the bomb files of this module (each a few MB on disk)."""
    return tmp_path_factory.mktemp("bombs")


# --- idx: the header is read first, the body never past what it declares ------------------


@pytest.mark.slow
@pytest.mark.parametrize("dims, size", [
    ((2**32 - 1, 28, 28), (2**32 - 1) * 784),
    ((2**32 - 1,), 2**32 - 1),
], ids=["images", "labels"])
def test_idx_header_claiming_four_billion_items_is_refused_from_the_header(tmp_path, dims,
                                                                            size):
    path = tmp_path / "claims.gz"
    path.write_bytes(gzip.compress(idx_header(*dims) + bytes(1000)))
    outcome = probe("from pathlib import Path\nfrom stages.data import idx\n"
                    "result = idx.parse_gz(Path(args[0]).read_bytes(), args[0], "
                    f"{len(dims)}, {dims[1:]!r})", path)
    shape = "×".join(map(str, dims))
    refused_in_bounds(outcome, "DataError", path,
                      rf": header says {shape} = {size} bytes, over the 128 MiB cap for one "
                      r"idx file; refused$")


def test_idx_header_with_a_shape_mnist_does_not_allow_is_refused_from_the_header():
    raw = gzip.compress(idx_header(60_000, 28, 27) + bytes(60_000 * 28 * 27))
    with pytest.raises(DataError, match=r"^f\.gz: header says 60000×28×27; expected N×28×28$"):
        idx.parse_gz(raw, "f.gz", 3, (28, 28))
    assert idx.parse_gz(raw, "f.gz", 3).shape == (60_000, 28, 27)  # no layout asked: read


@pytest.mark.slow
def test_gzip_bomb_is_inflated_no_further_than_its_header_declares_plus_the_cap(bombs):
    """A 2 MB .gz whose header declares a full training set (47 MB) but which inflates to
    2 GiB: refused once the declared bytes and the cap's worth more are counted."""
    path = bombs / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip_member(idx_header(*FULL_TRAIN), BOMB_BYTES))
    assert path.stat().st_size < 4 * MIB
    outcome = probe("from pathlib import Path\nfrom stages.data import idx\n"
                    "result = idx.parse_gz(Path(args[0]).read_bytes(), args[0], 3, (28, 28))",
                    path)
    refused_in_bounds(outcome, "DataError", path,
                      rf": header says 60000×28×28 = {FULL_IMAGES} bytes, file holds more "
                      rf"than {idx.MAX_PAYLOAD_BYTES}$")


def test_a_full_size_idx_file_still_parses(tmp_path):
    images = np.tile(load_mnist(FIXTURE)["x_train"], (40, 1, 1))
    assert images.shape == FULL_TRAIN
    raw = gzip.compress(idx.encode(images), compresslevel=1)
    got = idx.parse_gz(raw, "train-images-idx3-ubyte.gz", 3, (28, 28))
    assert got.shape == FULL_TRAIN and np.array_equal(got, images)
    # Concatenated gzip members are one stream, as gzip itself reads them.
    payload = idx.encode(images[:10])
    split = gzip.compress(payload[:1000]) + gzip.compress(payload[1000:])
    assert np.array_equal(idx.parse_gz(split, "f", 3, (28, 28)), images[:10])


def test_caps_fit_mnist_with_headroom():
    """The idx cap against MNIST's real sizes: the full training images pass, gigabytes do
    not."""
    assert 2 * FULL_IMAGES < idx.MAX_PAYLOAD_BYTES < 1 << 30
