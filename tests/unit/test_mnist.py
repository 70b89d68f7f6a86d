"""stages/data/mnist.py: MNIST's layout (raw uint8 and processed float32 files) is checked,
and any file that breaks it is refused with one clear DataError naming the file; pixels
scaled to [0, 1].

The .npz reader underneath (never unpickling, caps, damaged zips) is tests/unit/test_npz.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from stages.data.mnist import (
    MNIST_KEYS,
    check_finite,
    load_mnist,
    load_processed,
    scale,
    validate_mnist,
    validate_processed,
)
from stages.normalize import normalize
from stages.runtime.failures import DataError
from stages.runtime.outputs import save_npz
from tests.digits import small_mnist
from tests.hostile import property_settings
from tests.paths import FIXTURE

SETTINGS = property_settings()


def refused(path, match) -> str:
    """load_mnist refuses the file with one DataError line that starts with its path."""
    with pytest.raises(DataError, match=match) as info:
        load_mnist(path)
    assert str(info.value).startswith(str(path))
    assert "\n" not in str(info.value)
    return str(info.value)


# --- layout --------------------------------------------------------------------------


def test_valid_file_round_trips(tmp_path):
    data = small_mnist()
    save_npz(tmp_path / "ok.npz", **data)
    got = load_mnist(tmp_path / "ok.npz")
    assert set(got) == set(MNIST_KEYS)
    assert all(np.array_equal(got[k], data[k]) for k in MNIST_KEYS)


def test_the_fixture_is_valid():
    got = load_mnist(FIXTURE)
    assert got["x_train"].shape == (1500, 28, 28) and got["x_test"].shape == (500, 28, 28)


def bad(tmp_path, match, **changes):
    data = small_mnist()
    data.update(changes)
    save_npz(tmp_path / "bad.npz", **data)
    return refused(tmp_path / "bad.npz", match)


@pytest.mark.parametrize("changes, match", [
    ({"x_train": np.zeros((12, 28, 27), np.uint8)},
     r"x_train must be N×28×28, got shape \(12, 28, 27\)"),
    ({"x_train": np.zeros((12, 784), np.uint8)},
     r"x_train must be N×28×28, got shape \(12, 784\)"),
    ({"x_test": np.zeros((5, 1, 28, 28), np.uint8)}, "x_test must be N×28×28"),
    ({"y_train": np.zeros((12, 1), np.uint8)}, r"y_train must be 1-D uint8, got uint8 shape "
                                               r"\(12, 1\)"),
    ({"y_test": np.uint8(3)}, "y_test must be 1-D"),
])
def test_wrong_shapes(tmp_path, changes, match):
    bad(tmp_path, match, **changes)


@pytest.mark.parametrize("changes, match", [
    ({"x_train": np.zeros((12, 28, 28), np.float32)},
     "x_train/y_train must be uint8, got float32/uint8"),
    ({"y_test": np.zeros(5, np.int64)}, "x_test/y_test must be uint8, got uint8/int64"),
    ({"x_test": np.zeros((5, 28, 28), np.int8)}, "must be uint8, got int8"),
])
def test_wrong_dtypes(tmp_path, changes, match):
    bad(tmp_path, match, **changes)


@pytest.mark.parametrize("label", [10, 255])
def test_labels_outside_0_to_9(tmp_path, label):
    y = np.zeros(12, np.uint8)
    y[7] = label
    bad(tmp_path, f"y_train has label {label}; allowed 0..9", y_train=y)


def test_count_mismatch(tmp_path):
    bad(tmp_path, "12 x_train images but 11 y_train labels", y_train=np.zeros(11, np.uint8))
    bad(tmp_path, "5 x_test images but 6 y_test labels", y_test=np.zeros(6, np.uint8))


def test_empty_arrays(tmp_path):
    bad(tmp_path, "x_train is empty", x_train=np.zeros((0, 28, 28), np.uint8),
        y_train=np.zeros(0, np.uint8))
    bad(tmp_path, "x_test is empty", x_test=np.zeros((0, 28, 28), np.uint8),
        y_test=np.zeros(0, np.uint8))


def test_validate_mnist_directly():
    data = small_mnist()
    validate_mnist(data, "src")  # the valid data passes ...
    data["y_test"] = data["y_test"].astype(np.uint16)  # ... one wrong dtype does not
    with pytest.raises(DataError, match="^src: x_test/y_test must be uint8"):
        validate_mnist(data, "src")



# --- processed data ------------------------------------------------------------------


def test_scale_is_float32_in_unit_range_and_exact_at_the_ends():
    images = np.array([[0, 255], [51, 102]], dtype=np.uint8)
    scaled = scale(images)
    assert scaled.dtype == np.float32
    assert scaled[0, 0] == 0.0 and scaled[0, 1] == 1.0
    assert np.allclose(scaled[1], [0.2, 0.4])


def test_check_finite():
    check_finite(np.zeros(3, np.float32), "x")  # finite values pass ...
    for value in (np.nan, np.inf, -np.inf):  # ... any non-finite one does not
        a = np.zeros((2, 28, 28), np.float32)
        a[1, 3, 4] = value
        with pytest.raises(DataError, match="^x_test: holds NaN or infinite values$"):
            check_finite(a, "x_test")


def processed(**changes):
    out, _ = normalize(small_mnist())
    out.update(changes)
    return out


def test_normalize_output_passes_validate_processed_and_loads_back(tmp_path):
    data = processed()
    validate_processed(data, "processed")
    save_npz(tmp_path / "p.npz", **data)
    got = load_processed(tmp_path / "p.npz")
    assert set(got) == set(MNIST_KEYS)
    assert all(np.array_equal(got[k], data[k]) for k in MNIST_KEYS)
    assert set(load_processed(tmp_path / "p.npz", only=("x_test", "y_test"))) == {
        "x_test", "y_test"}


@pytest.mark.parametrize("changes, match", [
    ({"x_train": np.full((12, 28, 28), np.nan, np.float32)}, "x_train: holds NaN"),
    ({"x_test": np.full((5, 28, 28), np.inf, np.float32)}, "x_test: holds NaN or infinite"),
    ({"x_test": np.full((5, 28, 28), 255, np.float32)}, r"x_test has pixels outside \[0, 1\]"),
    ({"x_train": np.full((12, 28, 28), -0.5, np.float32)},
     r"x_train has pixels outside \[0, 1\]"),
    ({"x_train": np.zeros((12, 28, 28), np.float64)}, "x_train must be float32, got float64"),
    ({"x_train": np.zeros((12, 784), np.float32)}, "x_train must be N×28×28"),
    ({"y_test": np.full(5, 11, np.uint8)}, "y_test has label 11"),
    ({"y_train": np.zeros(12, np.int32)}, "y_train must be 1-D uint8"),
    ({"y_test": np.zeros(4, np.uint8)}, "5 x_test images but 4 y_test labels"),
    ({"x_test": np.zeros((0, 28, 28), np.float32), "y_test": np.zeros(0, np.uint8)},
     "x_test is empty"),
])
def test_validate_processed_refuses(changes, match):
    with pytest.raises(DataError, match=f"^p.npz: {match}"):
        validate_processed(processed(**changes), "p.npz")


def test_validate_processed_checks_the_subset_it_is_given():
    data = processed()
    validate_processed({"x_test": data["x_test"], "y_test": data["y_test"]}, "p")
    with pytest.raises(DataError, match="y_test has label 12"):
        validate_processed({"y_test": np.array([12], np.uint8)}, "p")


def test_load_processed_refuses_raw_uint8_data(tmp_path):
    """normalize's input in place of its output: a DataError naming the file, not a crash."""
    save_npz(tmp_path / "raw.npz", **small_mnist())
    with pytest.raises(DataError, match=r"raw\.npz: x_train must be float32, got uint8"):
        load_processed(tmp_path / "raw.npz")


# --- properties ------------------------------------------------------------------------


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
def test_validate_mnist_accepts_label_9_and_refuses_10(data):
    data["y_test"] = data["y_test"].copy()
    data["y_test"][0] = 9
    validate_mnist(data, "s")
    data["y_test"][0] = 10
    with pytest.raises(DataError, match="y_test has label 10"):
        validate_mnist(data, "s")
