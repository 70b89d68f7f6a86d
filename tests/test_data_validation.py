"""Bad data files are refused with a clear DataError, and nothing is ever unpickled."""

from __future__ import annotations

import gzip
import io
import pickle
import shutil
import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURE, ROOT, sh
from stages import normalize
from stages.common import (
    IDX_FILES,
    MNIST_KEYS,
    PROCESSED_KEYS,
    DataError,
    check_finite,
    load_idx_dir,
    load_mnist,
    load_npz,
    save_npz,
    validate_mnist,
    validate_processed,
)


class MakesMarker:
    """Unpickling this creates a file: proof that something was unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def small_mnist(n_train=12, n_test=5, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def refused(path, match, keys=MNIST_KEYS) -> str:
    with pytest.raises(DataError, match=match) as info:
        load_mnist(path) if keys is MNIST_KEYS else load_npz(path, keys)
    assert str(info.value).startswith(str(path))
    assert "\n" not in str(info.value)
    return str(info.value)


# --- nothing is ever unpickled -------------------------------------------------------


def test_object_array_is_refused_without_unpickling(tmp_path):
    marker = tmp_path / "unpickled.marker"
    data = small_mnist()
    data["y_train"] = np.array([MakesMarker(str(marker))] * 12, dtype=object)
    path = tmp_path / "evil.npz"
    np.savez(path, **data)

    refused(path, "holds object arrays; refused")
    assert not marker.exists()

    # The trap is real: loading it the unsafe way would have run the payload.
    with np.load(path, allow_pickle=True) as unsafe:
        unsafe["y_train"]
    assert marker.exists()


def test_object_array_in_a_key_not_asked_for_is_never_read(tmp_path):
    marker = tmp_path / "unpickled.marker"
    data = small_mnist()
    data["x_test"] = np.array([MakesMarker(str(marker))], dtype=object)
    np.savez(tmp_path / "evil.npz", **data)
    got = load_npz(tmp_path / "evil.npz", MNIST_KEYS, only=("x_train", "y_train"))
    assert set(got) == {"x_train", "y_train"} and not marker.exists()
    refused(tmp_path / "evil.npz", "object arrays")
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["pickle", "npy-object"])
def test_pickle_and_npy_files_are_not_taken_for_npz(tmp_path, kind):
    marker = tmp_path / "unpickled.marker"
    path = tmp_path / "data.npz"
    payload = {key: MakesMarker(str(marker)) for key in MNIST_KEYS}
    if kind == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        with open(path, "wb") as f:
            np.save(f, np.array([MakesMarker(str(marker))], dtype=object))
    refused(path, r"not an \.npz file \(not a zip archive\)")
    assert not marker.exists()


# --- layout --------------------------------------------------------------------------


def test_valid_file_round_trips(tmp_path):
    data = small_mnist()
    save_npz(tmp_path / "ok.npz", **data)
    got = load_mnist(tmp_path / "ok.npz")
    assert all(np.array_equal(got[k], data[k]) for k in MNIST_KEYS)


def test_the_fixture_is_valid():
    got = load_mnist(FIXTURE)
    assert got["x_train"].shape == (1500, 28, 28)


def test_missing_key(tmp_path):
    data = small_mnist()
    del data["y_test"]
    np.savez(tmp_path / "m.npz", **data)
    refused(tmp_path / "m.npz", r"wrong arrays \(missing: \['y_test'\], unexpected: none\)")


def test_extra_key(tmp_path):
    np.savez(tmp_path / "m.npz", **small_mnist(), x_val=np.zeros((1, 28, 28), np.uint8))
    refused(tmp_path / "m.npz", r"missing: none, unexpected: \['x_val'\]")


def test_renamed_keys(tmp_path):
    data = small_mnist()
    np.savez(tmp_path / "m.npz", images=data["x_train"], labels=data["y_train"])
    refused(tmp_path / "m.npz", r"missing: \['x_test', 'x_train', 'y_test', 'y_train'\], "
                                r"unexpected: \['images', 'labels'\]")


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
    ({"y_train": np.zeros((12, 1), np.uint8)}, r"y_train must be 1-D, got shape \(12, 1\)"),
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
    validate_mnist(data, "src")
    data["y_test"] = data["y_test"].astype(np.uint16)
    with pytest.raises(DataError, match="^src: x_test/y_test must be uint8"):
        validate_mnist(data, "src")


# --- not an npz at all ---------------------------------------------------------------


@pytest.mark.parametrize("content, match", [
    (b"", r"not an \.npz file"),
    (b"hello, I am a text file\n", r"not an \.npz file \(not a zip archive\)"),
    (gzip.compress(b"x" * 100), r"not an \.npz file"),
    (b"PK\x03\x04" + b"\x00" * 40, "damaged or truncated zip archive"),
])
def test_not_a_zip(tmp_path, content, match):
    (tmp_path / "f.npz").write_bytes(content)
    refused(tmp_path / "f.npz", match)


def test_truncated_zip(tmp_path):
    (tmp_path / "f.npz").write_bytes(FIXTURE.read_bytes()[:100_000])
    refused(tmp_path / "f.npz", "damaged or truncated zip archive")


def test_corrupted_member_is_a_data_error(tmp_path):
    """A compressed member with flipped bytes: zlib or CRC errors become DataError."""
    raw = bytearray(FIXTURE.read_bytes())
    with zipfile.ZipFile(FIXTURE) as zf:
        info = zf.getinfo("x_train.npy")
    start = info.header_offset + 30 + len(info.filename) + len(info.extra) + 2000
    raw[start:start + 64] = bytes(64)
    (tmp_path / "f.npz").write_bytes(bytes(raw))
    refused(tmp_path / "f.npz", "unreadable .npz|damaged")


def test_member_that_is_not_npy(tmp_path):
    """NpzFile hands back raw bytes for a member without the .npy magic."""
    buf = io.BytesIO()
    np.savez(buf, **small_mnist())
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    with zipfile.ZipFile(tmp_path / "f.npz", "w") as dst:
        for name in src.namelist():
            dst.writestr(name, b"raw bytes, not npy" if name == "y_train.npy" else
                         src.read(name))
    refused(tmp_path / "f.npz", "y_train is not a .npy array|unreadable .npz")


def test_directory_and_missing_file(tmp_path):
    refused(tmp_path / "nope.npz", "file not found")
    refused(tmp_path, "unreadable")


# --- processed data ------------------------------------------------------------------


def test_check_finite():
    check_finite(np.zeros(3, np.float32), "x")
    for value in (np.nan, np.inf, -np.inf):
        a = np.zeros((2, 28, 28), np.float32)
        a[1, 3, 4] = value
        with pytest.raises(DataError, match="^x_val: holds NaN or infinite values$"):
            check_finite(a, "x_val")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_normalize_refuses_non_finite_pixels(value):
    data = small_mnist()
    data["x_test"] = data["x_test"].astype(np.float32)
    data["x_test"][2, 0, 0] = value
    cfg = normalize.validate({"val_fraction": 0.25, "seed": 1, "sample_index": 0})
    with pytest.raises(DataError, match="x_test: holds NaN or infinite values"):
        normalize.normalize(data, cfg)


def test_normalize_output_passes_validate_processed():
    cfg = normalize.validate({"val_fraction": 0.25, "seed": 1, "sample_index": 0})
    out, report = normalize.normalize(small_mnist(), cfg)
    assert tuple(out) == PROCESSED_KEYS
    validate_processed(out, "processed")
    assert report["val"]["count"] == 3


def processed(**changes):
    cfg = normalize.validate({"val_fraction": 0.25, "seed": 1, "sample_index": 0})
    out, _ = normalize.normalize(small_mnist(), cfg)
    out.update(changes)
    return out


@pytest.mark.parametrize("changes, match", [
    ({"x_train": np.full((9, 28, 28), np.nan, np.float32)}, "x_train: holds NaN"),
    ({"x_test": np.full((5, 28, 28), np.inf, np.float32)}, "x_test: holds NaN or infinite"),
    ({"x_val": np.full((3, 28, 28), 255, np.float32)}, r"x_val has pixels outside \[0, 1\]"),
    ({"x_train": np.zeros((9, 28, 28), np.float64)}, "x_train must be float32, got float64"),
    ({"x_train": np.zeros((9, 784), np.float32)}, "x_train must be N×28×28"),
    ({"y_val": np.full(3, 11, np.uint8)}, "y_val has label 11"),
    ({"y_train": np.zeros(9, np.int32)}, "y_train must be 1-D uint8"),
    ({"y_test": np.zeros(4, np.uint8)}, "5 x_test images but 4 y_test labels"),
    ({"x_test": np.zeros((0, 28, 28), np.float32), "y_test": np.zeros(0, np.uint8)},
     "x_test is empty"),
])
def test_validate_processed_refuses(changes, match):
    with pytest.raises(DataError, match=match):
        validate_processed(processed(**changes), "p.npz")


def test_validate_processed_allows_an_empty_validation_split_and_subsets():
    data = processed(x_val=np.zeros((0, 28, 28), np.float32), y_val=np.zeros(0, np.uint8))
    validate_processed(data, "p")
    validate_processed({"x_test": data["x_test"], "y_test": data["y_test"]}, "p")


# --- idx folders ---------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, magic=None, dims=None) -> None:
    dims = array.shape if dims is None else dims
    magic = 0x800 + len(dims) if magic is None else magic
    path.write_bytes(gzip.compress(struct.pack(f">I{len(dims)}I", magic, *dims)
                                   + array.tobytes()))


def idx_folder(tmp_path: Path, data: dict) -> Path:
    for key, name in IDX_FILES.items():
        write_idx(tmp_path / name, data[key])
    return tmp_path


def test_idx_folder_round_trip(tmp_path):
    data = small_mnist()
    got = load_idx_dir(idx_folder(tmp_path, data))
    assert all(np.array_equal(got[k], data[k]) for k in MNIST_KEYS)


def test_idx_wrong_magic(tmp_path):
    data = small_mnist()
    idx_folder(tmp_path, data)
    write_idx(tmp_path / IDX_FILES["x_test"], data["x_test"], magic=0x0801,
              dims=(data["x_test"].size,))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz: bad idx magic number "
                                        "0x00000801, expected 0x00000803"):
        load_idx_dir(tmp_path)


def test_idx_length_disagrees_with_header(tmp_path):
    data = small_mnist()
    idx_folder(tmp_path, data)
    write_idx(tmp_path / IDX_FILES["y_train"], data["y_train"], dims=(13,))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz: header says 13 = 13 "
                                        "bytes, file holds 12"):
        load_idx_dir(tmp_path)


def test_idx_labels_out_of_range_and_count_mismatch(tmp_path):
    data = small_mnist()
    data["y_test"] = data["y_test"][:4]
    with pytest.raises(DataError, match="5 x_test images but 4 y_test labels"):
        load_idx_dir(idx_folder(tmp_path, data))


def test_idx_missing_file(tmp_path):
    idx_folder(tmp_path, small_mnist())
    (tmp_path / IDX_FILES["y_test"]).unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: unreadable"):
        load_idx_dir(tmp_path)


# --- through a stage's command line --------------------------------------------------


@pytest.mark.slow
def test_normalize_cli_refuses_a_booby_trapped_raw_file(tmp_path):
    repo = tmp_path / "p"
    shutil.copytree(ROOT / "stages", repo / "stages",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "params.yaml", repo / "params.yaml")
    marker = tmp_path / "unpickled.marker"
    data = small_mnist()
    data["x_train"] = np.array([MakesMarker(str(marker))], dtype=object)
    (repo / "data/raw").mkdir(parents=True)
    np.savez(repo / "data/raw/mnist.npz", **data)
    proc = sh(repo, sys.executable, "-m", "stages.normalize", check=False, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == ("error: data/raw/mnist.npz: holds object arrays; refused "
                           "(never unpickled)\n")
    assert not marker.exists()
    assert not (repo / "data/processed").exists() and not (repo / "reports").exists()
