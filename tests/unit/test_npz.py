"""stages/data/npz.py: the .npz reader never unpickles, checks every size a file declares before
reading any data, and turns every malformed file into one clear DataError."""

from __future__ import annotations

import gzip
import io
import pickle
import re
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from stages.data.npz import MAX_NPZ_BYTES, PLAIN_KINDS, load_npz
from stages.runtime.failures import DataError
from tests.digits import small_mnist
from tests.hostile import (
    BOMB_BYTES,
    FINAL_BLOCK,
    FULL_IMAGES,
    FULL_TRAIN,
    MEMORY_BOUND_MIB,
    MIB,
    TIME_BOUND_S,
    MakesMarker,
    crc_of,
    deflate,
    deflate_zeros,
    probe,
    property_settings,
    refused_in_bounds,
)
from tests.paths import FIXTURE

# The arrays the reader is asked for in most tests: Keras' MNIST layout, as small_mnist
# writes it (the reader itself knows no layout; MNIST's checks are tests/unit/test_mnist.py).
KEYS = tuple(small_mnist())


def refused(path, match, keys=KEYS) -> str:
    """load_npz refuses the file with one DataError line that starts with its path."""
    with pytest.raises(DataError, match=match) as info:
        load_npz(path, keys)
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
    got = load_npz(tmp_path / "evil.npz", KEYS, only=("x_train", "y_train"))
    assert set(got) == {"x_train", "y_train"} and not marker.exists()
    refused(tmp_path / "evil.npz", "object arrays")
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["pickle", "npy-object"])
def test_pickle_and_npy_files_are_not_taken_for_npz(tmp_path, kind):
    marker = tmp_path / "unpickled.marker"
    path = tmp_path / "data.npz"
    payload = {key: MakesMarker(str(marker)) for key in KEYS}
    if kind == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        with open(path, "wb") as f:
            np.save(f, np.array([MakesMarker(str(marker))], dtype=object))
    refused(path, r"not an \.npz file \(not a zip archive\)")
    assert not marker.exists()


# --- the arrays asked for --------------------------------------------------------------


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


# --- not an npz at all ---------------------------------------------------------------


@pytest.mark.parametrize("content, match", [
    (b"", r"not an \.npz file"),
    (b"hello, I am a text file\n", r"not an \.npz file \(not a zip archive\)"),
    (gzip.compress(b"x" * 100, mtime=0), r"not an \.npz file"),
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


# --- properties ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One folder for every example's files (hypothesis runs each test many times)."""
    return tmp_path_factory.mktemp("prop")


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


@property_settings(max_examples=100)
@given(data=st.data())
def test_damaged_npz_is_a_data_error_or_still_sound(scratch, small_npz, data):
    """Flip, cut or overwrite bytes anywhere: never a crash other than DataError, and what
    does load is what the headers declare: the arrays asked for, plain numbers, each of the
    size its header and zip entry agree on."""
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
        got = load_npz(path, KEYS)
    except DataError as err:
        assert str(err).startswith(str(path)) and "\n" not in str(err)
    else:  # a flip in a spot nothing checks (e.g. a pixel, a zip comment): still sound
        with np.load(io.BytesIO(small_npz)) as original:
            assert set(got) == set(KEYS)
            for key in KEYS:
                assert got[key].dtype.kind in PLAIN_KINDS
                assert got[key].shape == original[key].shape
                assert got[key].nbytes == original[key].nbytes


@property_settings()
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_a_data_error(scratch, blob):
    path = scratch / "b.npz"
    path.write_bytes(blob)
    with pytest.raises(DataError):
        load_npz(path, KEYS)


# --- sources over the limits: npz files declaring too much are refused in bounds --------
# Each check that could exhaust memory runs in a child interpreter (tests.hostile.probe) that
# reports its own peak RSS and time; bombs are crafted in tmp_path, a few MB on disk each.


def npy_header(shape, dtype=np.uint8) -> bytes:
    """The .npy header (magic, version 1.0, dict) numpy writes for such an array."""
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {
        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
        "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_zip(path: Path, members: list[dict]) -> Path:
    """A zip written field by field, so its directory can declare anything.

    Each member: name, data (the bytes stored, compressed or not), method (0 stored,
    8 deflated), crc, file_size, and optionally compress_size (default: len(data)).
    """
    local, central = bytearray(), bytearray()
    for m in members:
        name = m["name"].encode()
        csize = m.get("compress_size", len(m["data"]))
        offset = len(local)
        local += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, m["method"], 0, 0x21,
                             m["crc"], csize, m["file_size"], len(name), 0)
        local += name + m["data"]
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, m["method"], 0, 0x21,
                               m["crc"], csize, m["file_size"], len(name), 0, 0, 0, 0, 0,
                               offset)
        central += name
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(members), len(members),
                      len(central), len(local), 0)
    path.write_bytes(bytes(local + central + end))
    return path


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> Path:
    """One folder for the bomb files of this module (each a few MB on disk)."""
    return tmp_path_factory.mktemp("bombs")


# --- what the zip directory and the .npy headers declare --------------------------------


@pytest.mark.slow
def test_npy_header_claiming_ten_million_images_is_refused_from_its_header(tmp_path):
    path = tmp_path / "claims.npz"
    with zipfile.ZipFile(path, "w") as zf:  # a tiny, self-consistent zip entry
        zf.writestr("x_train.npy", npy_header((10_000_000, 28, 28)) + bytes(100))
        for key in ("y_train", "x_test", "y_test"):
            zf.writestr(f"{key}.npy", npy(np.zeros(1, np.uint8)))
    outcome = probe("from stages.data.npz import load_npz\nresult = load_npz(args[0], args[1:])",
                    path, *KEYS)
    refused_in_bounds(outcome, "DataError", path,
                      r": x_train\.npy claims 10000000×28×28 uint8 = 7\.3 GiB, over the "
                      r"512\.0 MiB cap$")


def test_member_whose_zip_entry_disagrees_with_its_header_is_refused(tmp_path):
    path = tmp_path / "padded.npz"
    data = {key: np.zeros((3, 28, 28) if key[0] == "x" else 3, np.uint8) for key in KEYS}
    with zipfile.ZipFile(path, "w") as zf:
        for key, array in data.items():
            extra = bytes(100) if key == "y_test" else b""  # 100 bytes the header never names
            zf.writestr(f"{key}.npy", npy(array) + extra)
    with pytest.raises(DataError) as info:
        load_npz(path, KEYS)
    header = len(npy_header((3,)))
    assert str(info.value) == (
        f"{path}: y_test.npy claims 3 uint8 = {header + 3} bytes with its header, but the "
        f"zip entry declares {header + 3 + 100}")
    # Without the padding the same arrays load: it is the disagreement that is refused.
    with zipfile.ZipFile(path, "w") as zf:
        for key, array in data.items():
            zf.writestr(f"{key}.npy", npy(array))
    assert load_npz(path, KEYS)["x_train"].shape == (3, 28, 28)


@pytest.mark.slow
def test_members_declaring_more_than_the_cap_in_total_are_refused_from_the_directory(
        tmp_path):
    # Each entry alone (300 MiB) is under the cap; together they are not. The directory
    # declares them, the file holds nothing of them: nothing is read to refuse it.
    members = [dict(name=f"{key}.npy", data=b"", method=0, crc=0, file_size=300 * MIB,
                    compress_size=300 * MIB) for key in ("x_train", "x_test")]
    path = write_zip(tmp_path / "total.npz", members)
    outcome = probe("from stages.data.npz import load_npz\n"
                    "result = load_npz(args[0], ('x_train', 'x_test'))", path)
    refused_in_bounds(outcome, "DataError", path,
                      r": members declare 600\.0 MiB uncompressed in total, over the 512\.0 "
                      r"MiB cap$")


@pytest.mark.slow
def test_zip_bomb_understating_its_size_is_refused_before_inflating(bombs):
    """Declares 1,000 images (784 KB); its 2 MB of deflate data inflate to 2 GiB."""
    head = npy_header((1000, 28, 28))
    data = deflate(head) + deflate_zeros(BOMB_BYTES) + FINAL_BLOCK
    path = write_zip(bombs / "understated.npz", [dict(
        name="x_train.npy", data=data, method=8, crc=zlib.crc32(head + bytes(784_000)),
        file_size=len(head) + 784_000)])
    outcome = probe("from stages.data.npz import load_npz\n"
                    "result = load_npz(args[0], ('x_train',))", path)
    refused_in_bounds(outcome, "DataError", path,
                      rf": member x_train\.npy holds {len(data)} compressed bytes but declares "
                      rf"{len(head) + 784_000} uncompressed; refused \(a zip bomb\?\)$")


@pytest.fixture(scope="module")
def plausible_bomb(bombs) -> dict:
    """An entry declaring a full training set (47 MB, plausible), whose deflate data
    (2 MB: under its declared size, as real compression is) inflate to 2 GiB. Built once:
    deflating is cheap, but the CRC-32 of 2 GiB takes a second."""
    head = npy_header(FULL_TRAIN)
    return dict(name="x_train.npy", method=8, file_size=len(head) + FULL_IMAGES,
                data=deflate(head) + deflate_zeros(BOMB_BYTES) + FINAL_BLOCK,
                crc=crc_of(head, BOMB_BYTES), head=head)


@pytest.mark.slow
def test_zip_bomb_with_a_plausible_size_is_never_inflated_past_it(bombs, plausible_bomb):
    """zipfile stops inflating an entry at its declared file_size, reading in chunks; the
    CRC-32 of all 2 GiB then disagrees with the 47 MB read: a damaged archive."""
    member = {k: v for k, v in plausible_bomb.items() if k != "head"}
    path = write_zip(bombs / "plausible.npz", [member])
    outcome = probe("from stages.data.npz import load_npz\n"
                    "result = load_npz(args[0], ('x_train',))", path)
    refused_in_bounds(outcome, "DataError", path,
                      r": damaged or truncated zip archive \(Bad CRC-32 for file "
                      r"'x_train\.npy'\)$")


@pytest.mark.slow
def test_zip_bomb_whose_crc_matches_its_declared_part_yields_only_that_part(
        bombs, plausible_bomb):
    """With the CRC-32 of the declared 47 MB, zipfile cannot tell: the loader returns the
    declared array and nothing more, and the 2 GiB are never inflated."""
    member = {k: v for k, v in plausible_bomb.items() if k != "head"}
    member["crc"] = crc_of(plausible_bomb["head"], FULL_IMAGES)
    path = write_zip(bombs / "prefix.npz", [member])
    outcome = probe("from stages.data.npz import load_npz\n"
                    "x = load_npz(args[0], ('x_train',))['x_train']\n"
                    "result = (x.shape, str(x.dtype), int(x.max()))", path)
    assert outcome.get("result") == repr(((60000, 28, 28), "uint8", 0)), outcome
    assert outcome["peak_mib"] < MEMORY_BOUND_MIB and outcome["wall"] < TIME_BOUND_S, outcome


def test_zipfile_alone_truncates_at_the_declared_size_and_checks_the_crc(bombs):
    """The stdlib behaviour the loader relies on, checked: read in chunks, a deflated entry
    yields at most its declared file_size and no error of its own for the rest (it cannot
    know without inflating it all); only the CRC-32 can tell."""
    head = b"just a header"
    stream = deflate(head) + deflate_zeros(64 * MIB) + FINAL_BLOCK
    for crc, complaint in [(crc_of(head, 64 * MIB), "Bad CRC-32"), (crc_of(head, MIB), None)]:
        path = write_zip(bombs / "stdlib.zip", [dict(
            name="m", data=stream, method=8, crc=crc, file_size=len(head) + MIB)])
        got = bytearray()
        with zipfile.ZipFile(path) as zf, zf.open("m") as f:
            try:
                while block := f.read(4096):
                    got += block
            except zipfile.BadZipFile as err:
                assert complaint in str(err)
            else:
                assert complaint is None
        assert len(got) <= len(head) + MIB and bytes(got[:len(head)]) == head


@pytest.mark.parametrize("array, kind", [
    (np.array(["a", "bc"]), "<U2"),
    (np.zeros(2, np.complex64), "complex64"),
    (np.zeros(2, [("a", "u1"), ("b", "f4")]), r"\[\('a', 'u1'\), \('b', '<f4'\)\]"),
    (np.array(["2020-01-01"], "datetime64[D]"), r"datetime64\[D\]"),
], ids=["str", "complex", "structured", "datetime"])
def test_arrays_that_are_not_plain_numbers_are_refused_from_their_header(tmp_path, array,
                                                                         kind):
    path = tmp_path / "odd.npz"
    np.savez(path, predictions=array)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: predictions\.npy has dtype "
                                        rf"{kind}; only plain numeric arrays are read$"):
        load_npz(path, ("predictions",))


def test_object_arrays_are_refused_from_their_header(tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, predictions=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(DataError, match="holds object arrays; refused \\(never unpickled\\)"):
        load_npz(path, ("predictions",))


@pytest.mark.slow
def test_zip_directory_of_thousands_of_members_is_refused_before_it_is_parsed(tmp_path):
    path = tmp_path / "many.npz"
    with zipfile.ZipFile(path, "w") as zf:
        for i in range(5000):
            zf.writestr(f"a{i}.npy", b"")
    outcome = probe("from stages.data.npz import load_npz\nresult = load_npz(args[0], ('a0',))",
                    path)
    refused_in_bounds(outcome, "DataError", path,
                      r": zip directory declares 5000 members in \d+ bytes; at most 64 "
                      r"members in 65536 bytes are read$")


def test_npy_header_claiming_gigabytes_of_header_is_refused(tmp_path):
    # .npy version 2.0 stores its header's length in 4 bytes: this one claims ~4 GB.
    member = b"\x93NUMPY\x02\x00" + struct.pack("<I", 0xFFFFFFF0) + b"{'descr': '|u1'"
    path = tmp_path / "header.npz"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("x.npy", member)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: x\.npy: \.npy header of "
                                        r"4294967280 bytes; at most 10000$"):
        load_npz(path, ("x",))


# --- real files still load -------------------------------------------------------------


def test_the_fixture_still_loads_and_matches_numpy():
    got = load_npz(FIXTURE, KEYS)
    with np.load(FIXTURE) as reference:
        for key in KEYS:
            assert got[key].dtype == reference[key].dtype
            assert np.array_equal(got[key], reference[key])


# The two full-size files are read through the loaders the stages call (stages.data.mnist's
# load_mnist and load_processed: the reader plus MNIST's checks), so the memory bounds cover
# what a stage really holds when it reads all of MNIST, validation included.


@pytest.mark.slow
@pytest.mark.parametrize("save", [np.savez, np.savez_compressed], ids=["stored", "deflated"])
def test_a_full_size_raw_file_loads_in_bounded_memory(tmp_path, save):
    """60,000 + 10,000 uint8 images (55 MB), as Keras ships MNIST."""
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 256, (100, 28, 28), dtype=np.uint8)
    path = tmp_path / "full.npz"
    save(path, x_train=np.tile(tile, (600, 1, 1)), y_train=np.zeros(60_000, np.uint8),
         x_test=np.tile(tile, (100, 1, 1)), y_test=np.ones(10_000, np.uint8))
    outcome = probe("from stages.data.mnist import load_mnist\n"
                    "d = load_mnist(args[0])\n"
                    "result = [d[k].shape for k in ('x_train', 'x_test')] + "
                    "[int(d['x_train'][599].sum()), int(d['y_test'].sum())]", path)
    assert outcome.get("result") == repr(
        [(60000, 28, 28), (10000, 28, 28), int(tile[-1].sum()), 10_000]), outcome
    # The arrays (55 MB) plus the interpreter: no second copy, no inflating ahead.
    assert outcome["peak_mib"] < MEMORY_BOUND_MIB and outcome["wall"] < TIME_BOUND_S, outcome


@pytest.mark.slow
def test_a_full_size_processed_file_is_under_the_cap_and_loads(tmp_path):
    """normalize's output for all of MNIST: 70,000 float32 images, 220 MB."""
    x_train = np.zeros(FULL_TRAIN, np.float32)
    x_train[-1, -1, -1] = 0.5
    path = tmp_path / "processed.npz"
    np.savez(path, x_train=x_train, y_train=np.zeros(60_000, np.uint8),
             x_test=np.zeros((10_000, 28, 28), np.float32), y_test=np.zeros(10_000, np.uint8))
    del x_train
    size = sum(i.file_size for i in zipfile.ZipFile(path).infolist())
    assert 200 * MIB < size < MAX_NPZ_BYTES
    outcome = probe("from stages.data.mnist import load_processed\n"
                    "d = load_processed(args[0])\n"
                    "result = (d['x_train'].shape, float(d['x_train'][-1, -1, -1]))", path)
    assert outcome.get("result") == repr(((60000, 28, 28), 0.5)), outcome
    assert outcome["peak_mib"] < size / MIB + 128, outcome  # the arrays, once, + overhead
    assert outcome["wall"] < TIME_BOUND_S, outcome


def test_caps_fit_mnist_with_headroom():
    """The npz cap against all of MNIST normalized: the full data pass, gigabytes do not."""
    processed = 4 * 70_000 * 28 * 28
    assert processed * 2 < MAX_NPZ_BYTES < 1 << 30
