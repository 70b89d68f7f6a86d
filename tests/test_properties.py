"""Property-based tests (hypothesis) of the pure logic: loading, validating, idx, tiling."""

from __future__ import annotations

import gzip
import io
import math
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from stages.common import (
    MNIST_KEYS,
    PALETTE,
    DataError,
    draw,
    load_mnist,
    load_npz,
    parse_idx,
    save_npz,
    tile,
    validate_mnist,
)

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def images(max_n: int = 12, min_n: int = 0):
    return st.integers(min_n, max_n).flatmap(
        lambda n: hnp.arrays(np.uint8, (n, 28, 28), elements=st.integers(0, 255)))


def labels(n: int):
    return hnp.arrays(np.uint8, (n,), elements=st.integers(0, 9))


@st.composite
def mnist(draw_):
    data = {}
    for split in ("train", "test"):
        x = draw_(images(min_n=1, max_n=6))
        data[f"x_{split}"], data[f"y_{split}"] = x, draw_(labels(len(x)))
    return data


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One folder for every example's files (hypothesis runs each test many times)."""
    return tmp_path_factory.mktemp("prop")


def write(folder: Path, data: dict) -> Path:
    save_npz(folder / "m.npz", **data)
    return folder / "m.npz"


# --- load_npz / validate_mnist -------------------------------------------------------


@SETTINGS
@given(mnist())
def test_valid_mnist_round_trips(scratch, data):
    got = load_mnist(write(scratch, data))
    assert set(got) == set(MNIST_KEYS)
    for key in MNIST_KEYS:
        assert got[key].dtype == np.uint8 and np.array_equal(got[key], data[key])


MUTATIONS = ("dtype", "label", "shape", "count", "drop", "extra", "empty", "ndim")


@SETTINGS
@given(mnist(), st.sampled_from(MUTATIONS), st.sampled_from(("train", "test")),
       st.integers(10, 255))
def test_any_single_defect_is_a_data_error(scratch, data, mutation, split, big):
    x, y = f"x_{split}", f"y_{split}"
    if mutation == "dtype":
        data[x] = data[x].astype(np.int16)
    elif mutation == "label":
        data[y] = data[y].copy()
        data[y][-1] = big  # 10..255: outside 0..9
    elif mutation == "shape":
        data[x] = np.zeros((len(data[y]), 28, 27), np.uint8)
    elif mutation == "count":
        data[y] = np.concatenate([data[y], data[y][:1]])
    elif mutation == "drop":
        del data[y]
    elif mutation == "extra":
        data["x_val"] = data[x]
    elif mutation == "empty":
        data[x], data[y] = data[x][:0], data[y][:0]
    elif mutation == "ndim":
        data[y] = data[y].reshape(-1, 1)
    with pytest.raises(DataError):
        load_mnist(write(scratch, data))


@SETTINGS
@given(mnist())
def test_validate_mnist_accepts_exactly_labels_0_to_9(data):
    validate_mnist(data, "s")
    data["y_test"] = data["y_test"].copy()
    data["y_test"][0] = 9
    validate_mnist(data, "s")


@pytest.fixture(scope="module", params=["deflated", "stored"])
def small_npz(request) -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    save = np.savez_compressed if request.param == "deflated" else np.savez
    save(buf, x_train=rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
         y_train=np.array([1, 2, 3], np.uint8),
         x_test=rng.integers(0, 256, (2, 28, 28), dtype=np.uint8),
         y_test=np.array([4, 5], np.uint8))
    return buf.getvalue()


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_damaged_npz_is_a_data_error_or_still_valid(scratch, small_npz, data):
    """Flip, cut or overwrite bytes anywhere: never a crash other than DataError."""
    raw = bytearray(small_npz)
    how = data.draw(st.sampled_from(("flip", "cut", "zero")))
    at = data.draw(st.integers(0, len(raw) - 1))
    if how == "flip":
        raw[at] ^= data.draw(st.integers(1, 255))
    elif how == "cut":
        raw = raw[:at]
    else:
        raw[at:at + 16] = bytes(len(raw[at:at + 16]))
    path = scratch / "d.npz"
    path.write_bytes(bytes(raw))
    try:
        got = load_mnist(path)
    except DataError as err:
        assert str(err).startswith(str(path)) and "\n" not in str(err)
    else:  # a flip in a spot nothing checks (e.g. a pixel, a zip comment): still sound
        validate_mnist(got, "again")


@SETTINGS
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_a_data_error(scratch, blob):
    path = scratch / "b.npz"
    path.write_bytes(blob)
    with pytest.raises(DataError):
        load_npz(path, MNIST_KEYS)


# --- parse_idx -----------------------------------------------------------------------


def write_idx(array: np.ndarray) -> bytes:
    """The idx format as LeCun describes it: magic 0x00000800 + ndim, big-endian dims, data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim)
    header += b"".join(struct.pack(">I", d) for d in array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes(order="C"))


idx_arrays = st.one_of(
    hnp.arrays(np.uint8, st.tuples(st.integers(0, 40)), elements=st.integers(0, 255)),
    hnp.arrays(np.uint8, st.tuples(st.integers(0, 4), st.integers(0, 6), st.integers(0, 6)),
               elements=st.integers(0, 255)),
)


@SETTINGS
@given(idx_arrays)
def test_parse_idx_round_trip(array):
    got = parse_idx(write_idx(array), "f", array.ndim)
    assert got.shape == array.shape and got.dtype == np.uint8
    assert np.array_equal(got, array)


@SETTINGS
@given(idx_arrays, st.integers(1, 50))
def test_parse_idx_body_of_the_wrong_length_is_refused(array, cut):
    raw = gzip.decompress(write_idx(array))
    header = 4 + 4 * array.ndim
    shorter = raw[: max(header, len(raw) - cut)]
    longer = raw + bytes(cut)
    for payload in ([shorter] if len(shorter) != len(raw) else []) + [longer]:
        with pytest.raises(DataError, match="header says"):
            parse_idx(gzip.compress(payload), "f", array.ndim)


@SETTINGS
@given(idx_arrays, st.integers(0, 2**32 - 1))
def test_parse_idx_any_other_magic_is_refused(array, magic):
    assume(magic != 0x800 + array.ndim)
    raw = bytearray(gzip.decompress(write_idx(array)))
    raw[:4] = struct.pack(">I", magic)
    with pytest.raises(DataError, match="bad idx magic number"):
        parse_idx(gzip.compress(bytes(raw)), "f", array.ndim)


@SETTINGS
@given(st.binary(max_size=200), st.sampled_from((1, 3)))
def test_parse_idx_arbitrary_bytes_never_crash(blob, ndim):
    for raw in (blob, gzip.compress(blob)):
        try:
            parse_idx(raw, "f", ndim)
        except DataError:
            pass


# --- tile ----------------------------------------------------------------------------


def reference_tile(images: np.ndarray, per_row: int) -> np.ndarray:
    """The original layout, one paste at a time: white canvas, row-major, 28×28 tiles."""
    n = len(images)
    rows = math.ceil(n / per_row)
    canvas = Image.new("L", (per_row * 28, rows * 28), 255)
    for i, image in enumerate(images):
        canvas.paste(Image.fromarray(image, mode="L"), ((i % per_row) * 28, (i // per_row) * 28))
    return np.asarray(canvas)


@SETTINGS
@given(images(max_n=30), st.integers(1, 12))
def test_tile_matches_the_paste_one_at_a_time_reference(batch, per_row):
    got = tile(batch, per_row)
    assert got.dtype == np.uint8
    if len(batch) == 0:
        # the original would make a zero-height canvas; tile() gives one white row
        assert got.shape == (28, per_row * 28) and (got == 255).all()
    else:
        assert np.array_equal(got, reference_tile(batch, per_row))


# --- draw ----------------------------------------------------------------------------


@SETTINGS
@given(hnp.arrays(np.uint8, (28, 28), elements=st.integers(0, 255)))
def test_draw_is_a_monotone_map_onto_the_palette(image):
    lines = draw(image).split("\n")
    assert len(lines) == 28 and {len(line) for line in lines} == {28}
    levels = np.array([[PALETTE.index(c) for c in line] for line in lines])
    assert np.array_equal(levels, image.astype(int) * 9 // 255)
    order = np.argsort(image, axis=None, kind="stable")
    assert (np.diff(levels.ravel()[order]) >= 0).all()


# --- save_npz ------------------------------------------------------------------------


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.from_regex(r"[a-z_]{1,8}", fullmatch=True),
                       hnp.arrays(st.sampled_from([np.uint8, np.float32, np.int64]),
                                  hnp.array_shapes(min_dims=0, max_dims=3, max_side=5)),
                       min_size=1, max_size=4))
def test_save_npz_round_trips_byte_stably(scratch, arrays):
    folder = scratch
    save_npz(folder / "a.npz", **arrays)
    save_npz(folder / "b.npz", **dict(reversed(list(arrays.items()))))
    assert (folder / "a.npz").read_bytes() == (folder / "b.npz").read_bytes()
    got = load_npz(folder / "a.npz", tuple(arrays))
    for key, value in arrays.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape
        assert np.array_equal(got[key], value, equal_nan=value.dtype.kind == "f")
