"""stages/runtime/outputs.py: atomic writes (never a torn or partial file), byte-stable files."""

from __future__ import annotations

import csv
import errno
import json
import os
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from stages.data.npz import load_npz
from stages.runtime.failures import WriteError
from stages.runtime.outputs import (
    atomic_dir,
    atomic_path,
    disk_errors,
    remove_stale_temps,
    round_floats,
    save_image,
    save_npz,
    write_csv,
    write_json,
    write_text,
)
from tests.digits import NAMED_CLASSES


def entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- atomic_path ---------------------------------------------------------------------


def test_atomic_path_writes_beside_then_moves_into_place(tmp_path):
    target = tmp_path / "sub" / "out.bin"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent  # same file system: the rename is atomic
        assert tmp.name.startswith(f".out.bin.{os.getpid()}.") and tmp.name.endswith(".tmp")
        tmp.write_bytes(b"new")
        assert not target.exists()  # nothing visible until the block succeeds
    assert target.read_bytes() == b"new"
    assert entries(target.parent) == ["out.bin"]


def test_atomic_path_failure_keeps_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half-writ")
            raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert entries(tmp_path) == ["out.bin"]


def test_atomic_path_keyboard_interrupt_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old" and entries(tmp_path) == ["out.bin"]


def test_atomic_path_honours_the_umask_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.txt", "x")
        os.umask(0o077)
        write_text(tmp_path / "b.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o600


def test_atomic_path_converts_a_read_only_directory_into_a_write_error(tmp_path):
    if os.geteuid() == 0:
        # root ignores permission bits; a missing parent that cannot be created still fails.
        blocker = tmp_path / "file"
        blocker.write_text("x")
        with pytest.raises(WriteError, match=r"writing .*file/sub/out\.bin"):
            with atomic_path(blocker / "sub" / "out.bin"):
                pass
        return
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    with pytest.raises(WriteError, match="permission denied writing"):
        with atomic_path(ro / "out.bin"):
            pass


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS])
def test_a_full_disk_while_writing_is_one_write_error_and_the_old_file_stays(tmp_path, code):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(WriteError) as info:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"part")
            raise OSError(code, os.strerror(code))
    reason = os.strerror(code)
    assert str(info.value) == f"{reason[0].lower()}{reason[1:]} writing {target}"
    assert target.read_bytes() == b"old" and entries(tmp_path) == ["out.bin"]


def test_disk_errors_passes_other_os_errors_on_unchanged(tmp_path):
    with pytest.raises(FileNotFoundError):
        with disk_errors(tmp_path / "x"):
            raise FileNotFoundError(errno.ENOENT, "gone")
    with pytest.raises(WriteError, match=r"^no space left on device writing .*x$"):
        with disk_errors(tmp_path / "x"):
            raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.slow
def test_stale_temps_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    target = tmp_path / "out.npz"
    dead = dead_pid()
    stale_file = tmp_path / f".out.npz.{dead}.abc_1234.tmp"
    stale_file.write_bytes(b"x" * 100)
    stale_dir = tmp_path / f".out.npz.{dead}.old.tmp"
    (stale_dir / "inner").mkdir(parents=True)
    live = tmp_path / f".out.npz.{os.getppid()}.def45678.tmp"  # our parent is alive
    live.write_bytes(b"busy")
    other = tmp_path / f".other.npz.{dead}.zzzzzzzz.tmp"  # another output's: not ours to judge
    other.write_bytes(b"o")
    unrelated = tmp_path / ".out.npz.notapid.tmp"
    unrelated.write_bytes(b"u")
    # a live writer's temp of the output "out.npz.7", whose name merely starts alike
    lookalike = tmp_path / f".out.npz.7.{os.getppid()}.abcd1234.tmp"
    lookalike.write_bytes(b"l")
    assert sorted(p.name for p in remove_stale_temps(target)) == sorted(
        [stale_file.name, stale_dir.name])
    assert entries(tmp_path) == sorted([live.name, other.name, unrelated.name,
                                        lookalike.name])
    # and atomic_path sweeps them itself before writing
    stale_file.write_bytes(b"x")
    write_text(target, "new")
    assert not stale_file.exists() and live.exists()


def test_remove_stale_temps_in_a_missing_folder_removes_nothing(tmp_path):
    assert remove_stale_temps(tmp_path / "absent" / "out.npz") == []


# --- atomic_dir ----------------------------------------------------------------------


def test_atomic_dir_swaps_a_complete_directory_in(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path  # beside the output, never inside it
        assert tmp.name.startswith(f".model.{os.getpid()}.")
        (tmp / "new.txt").write_text("new")
        assert entries(target) == ["old.txt"]
    assert entries(target) == ["new.txt"]
    assert entries(tmp_path) == ["model"]  # no temp folder, no .old left over


def test_atomic_dir_failure_keeps_the_previous_directory(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights").write_bytes(b"complete")
    with pytest.raises(ValueError):
        with atomic_dir(target) as tmp:
            (tmp / "weights").write_bytes(b"half")
            raise ValueError
    assert entries(target) == ["weights"] and (target / "weights").read_bytes() == b"complete"
    assert entries(tmp_path) == ["model"]


def test_atomic_dir_first_write_and_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "a" / "out") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a" / "out").stat().st_mode) == 0o755
    assert (tmp_path / "a" / "out" / "f").read_text() == "x"


def test_atomic_dir_puts_the_previous_output_back_if_the_swap_fails(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "f").write_text("previous")
    with pytest.raises(WriteError, match="writing"):
        with atomic_dir(target) as tmp:
            tmp.rmdir()  # the swap's second rename now fails
    assert (target / "f").read_text() == "previous"
    assert entries(tmp_path) == ["out"]


# --- save_npz ------------------------------------------------------------------------


def test_save_npz_is_byte_stable_and_order_independent(tmp_path):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (5, 28, 28), dtype=np.uint8)
    b = rng.random(7).astype(np.float32)
    save_npz(tmp_path / "1.npz", a=a, b=b)
    save_npz(tmp_path / "2.npz", b=b, a=a)
    assert (tmp_path / "1.npz").read_bytes() == (tmp_path / "2.npz").read_bytes()
    with zipfile.ZipFile(tmp_path / "1.npz") as zf:
        infos = zf.infolist()
    assert [i.filename for i in infos] == ["a.npy", "b.npy"]
    assert {i.date_time for i in infos} == {(1980, 1, 1, 0, 0, 0)}  # no clock in the bytes
    assert {i.compress_type for i in infos} == {zipfile.ZIP_STORED}
    with np.load(tmp_path / "1.npz", allow_pickle=False) as data:
        assert np.array_equal(data["a"], a) and np.array_equal(data["b"], b)


def test_save_npz_keeps_shapes_and_layout_independent_bytes(tmp_path):
    scalar = np.uint8(3)
    fortran = np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4))
    save_npz(tmp_path / "1.npz", s=scalar, m=fortran)
    save_npz(tmp_path / "2.npz", s=np.array(3, np.uint8), m=np.ascontiguousarray(fortran))
    assert (tmp_path / "1.npz").read_bytes() == (tmp_path / "2.npz").read_bytes()
    with np.load(tmp_path / "1.npz") as data:
        assert data["s"].shape == () and data["m"].shape == (3, 4)
        assert np.array_equal(data["m"], fortran)


def test_save_npz_differs_when_the_data_differs(tmp_path):
    save_npz(tmp_path / "1.npz", a=np.zeros(3, np.uint8))
    save_npz(tmp_path / "2.npz", a=np.ones(3, np.uint8))
    assert (tmp_path / "1.npz").read_bytes() != (tmp_path / "2.npz").read_bytes()


def test_save_npz_refuses_object_arrays_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        save_npz(tmp_path / "x.npz", a=np.array([object()], dtype=object))
    assert entries(tmp_path) == []


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """One folder for every example's files (hypothesis runs each test many times)."""
    return tmp_path_factory.mktemp("prop")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.from_regex(r"[a-z_]{1,8}", fullmatch=True),
                       hnp.arrays(st.sampled_from([np.uint8, np.float32, np.int64]),
                                  hnp.array_shapes(min_dims=0, max_dims=3, max_side=5)),
                       min_size=1, max_size=4))
def test_save_npz_round_trips_byte_stably(scratch, arrays):
    save_npz(scratch / "a.npz", **arrays)
    save_npz(scratch / "b.npz", **dict(reversed(list(arrays.items()))))
    assert (scratch / "a.npz").read_bytes() == (scratch / "b.npz").read_bytes()
    got = load_npz(scratch / "a.npz", tuple(arrays))
    for key, value in arrays.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape
        assert np.array_equal(got[key], value, equal_nan=value.dtype.kind == "f")


# --- text, JSON, CSV, images -----------------------------------------------------------


def test_json_is_sorted_indented_and_ends_with_a_newline(tmp_path):
    data = {"b": 1.23456789, "a": [1, 2]}
    write_json(tmp_path / "m.json", data)
    text = (tmp_path / "m.json").read_text()
    assert text == '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1.23456789\n}\n'
    assert json.loads(text) == data


def test_round_floats_rounds_nested_floats_only():
    assert round_floats({"x": [1.00000049, (2.0000006,)], "n": 3, "s": "1.23456789"}) == {
        "x": [1.0, [2.000001]], "n": 3, "s": "1.23456789"}
    assert round_floats(0.123456789, digits=3) == 0.123


def test_csv_has_a_header_and_quotes_only_what_needs_it(tmp_path):
    rows = [(0, "a"), (1, 'say "hi"'), (2, NAMED_CLASSES[4])]
    write_csv(tmp_path / "t.csv", ["i", "v"], rows)
    text = (tmp_path / "t.csv").read_text()
    assert text.splitlines()[:2] == ["i,v", "0,a"]
    assert f'2,"{NAMED_CLASSES[4]}"' in text  # the comma inside a name is quoted
    with open(tmp_path / "t.csv", newline="") as f:
        back = list(csv.DictReader(f))
    assert back == [{"i": str(i), "v": v} for i, v in rows]


def test_write_text_replaces_the_whole_file(tmp_path):
    write_text(tmp_path / "t.txt", "a long first version\n")
    write_text(tmp_path / "t.txt", "short\n")
    assert (tmp_path / "t.txt").read_text() == "short\n"


@pytest.mark.parametrize("suffix, fmt", [(".bmp", "BMP"), (".png", "PNG")])
def test_save_image_keeps_every_pixel_in_the_format_of_its_suffix(tmp_path, suffix, fmt):
    pixels = np.arange(28 * 30, dtype=np.uint32).reshape(28, 30).astype(np.uint8)
    save_image(tmp_path / f"i{suffix}", pixels)
    with Image.open(tmp_path / f"i{suffix}") as image:
        assert image.format == fmt and image.mode == "L"
        assert np.array_equal(np.asarray(image), pixels)
    assert entries(tmp_path) == [f"i{suffix}"]
