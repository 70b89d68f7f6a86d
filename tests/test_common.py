"""Unit tests of stages/common.py's pure helpers: atomic writes, npz, drawing, tiling, idx."""

from __future__ import annotations

import gzip
import json
import os
import stat
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from stages import common
from stages.common import (
    PALETTE,
    DataError,
    ParamError,
    PipelineError,
    WriteError,
    atomic_dir,
    atomic_path,
    draw,
    parse_idx,
    remove_stale_temps,
    save_npz,
    tile,
)


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
        common.write_text(tmp_path / "a.txt", "x")
        os.umask(0o077)
        common.write_text(tmp_path / "b.txt", "x")
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
    common.write_text(target, "new")
    assert not stale_file.exists() and live.exists()


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


def test_atomic_dir_puts_the_previous_output_back_if_the_swap_fails(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "f").write_text("previous")
    with pytest.raises(WriteError, match="writing"):
        with atomic_dir(target) as tmp:
            tmp.rmdir()  # the swap's second rename now fails
    assert (target / "f").read_text() == "previous"


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


def test_json_and_csv_writers_are_stable(tmp_path):
    common.write_json(tmp_path / "m.json", {"b": 1.23456789, "a": [1, 2]})
    assert (tmp_path / "m.json").read_text() == (
        '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 1.23456789\n}\n')
    assert common.round_floats({"x": [1.00000049, (2.0000006,)], "n": 3}) == {
        "x": [1.0, [2.000001]], "n": 3}
    common.write_csv(tmp_path / "t.csv", ["i", "v"], [(0, "a"), (1, "b")])
    assert common.read_csv_rows(tmp_path / "t.csv") == [{"i": "0", "v": "a"},
                                                         {"i": "1", "v": "b"}]
    json.loads((tmp_path / "m.json").read_text())


# --- draw ----------------------------------------------------------------------------


def test_draw_palette_levels():
    assert PALETTE == " .:-=+*#%@"
    # level = floor(v / 255 * 9): the first value of each level, and the one just below
    row = np.array([[0, 28, 29, 56, 57, 84, 85, 113, 114, 141, 142, 169, 170, 198, 199,
                     226, 227, 254, 255]], dtype=np.uint8)
    assert draw(row) == "  ..::--==++**##%%@"
    every = np.arange(256, dtype=np.uint8).reshape(1, -1)
    assert draw(every) == "".join(PALETTE[v * 9 // 255] for v in range(256))


def test_draw_whole_image_is_28_lines_of_28():
    image = np.zeros((28, 28), np.uint8)
    image[3, 4] = 255
    text = draw(image)
    lines = text.split("\n")
    assert len(lines) == 28 and all(len(line) == 28 for line in lines)
    assert lines[3][4] == "@" and text.count("@") == 1 and set(text) == {" ", "@", "\n"}


def test_draw_accepts_float_images_scaled_back():
    image = np.full((2, 2), 1.0, np.float32) * 255
    assert draw(image) == "@@\n@@"


# --- tile ----------------------------------------------------------------------------


def digits(n: int) -> np.ndarray:
    """n distinct tiles: tile i is filled with the value i (never 255)."""
    return np.stack([np.full((28, 28), i, np.uint8) for i in range(n)]) if n else \
        np.zeros((0, 28, 28), np.uint8)


def tile_at(canvas: np.ndarray, row: int, col: int) -> np.ndarray:
    return canvas[row * 28:(row + 1) * 28, col * 28:(col + 1) * 28]


def test_tile_empty_is_one_white_row():
    canvas = tile(digits(0), 5)
    assert canvas.shape == (28, 5 * 28) and canvas.dtype == np.uint8
    assert (canvas == 255).all()


def test_tile_one_image_top_left_rest_white():
    canvas = tile(digits(1), 4)
    assert canvas.shape == (28, 4 * 28)
    assert (tile_at(canvas, 0, 0) == 0).all()
    assert (canvas[:, 28:] == 255).all()


def test_tile_exact_multiple_has_no_extra_row():
    canvas = tile(digits(6), 3)
    assert canvas.shape == (2 * 28, 3 * 28)
    for i in range(6):
        assert (tile_at(canvas, i // 3, i % 3) == i).all()  # row-major


def test_tile_partial_last_row_is_padded_white():
    canvas = tile(digits(7), 3)
    assert canvas.shape == (3 * 28, 3 * 28)
    assert (tile_at(canvas, 2, 0) == 6).all()
    assert (canvas[2 * 28:, 28:] == 255).all()


def test_tile_per_row_one_is_a_column():
    canvas = tile(digits(3), 1)
    assert canvas.shape == (3 * 28, 28)
    assert [int(tile_at(canvas, r, 0)[0, 0]) for r in range(3)] == [0, 1, 2]


def test_tile_keeps_pixels_within_a_tile():
    image = np.arange(28 * 28, dtype=np.uint32).reshape(28, 28) % 251
    canvas = tile(np.stack([image, image.T]).astype(np.uint8), 2)
    assert np.array_equal(tile_at(canvas, 0, 0), image) and \
        np.array_equal(tile_at(canvas, 0, 1), image.T)


def test_tile_per_row_zero_is_refused():
    with pytest.raises(ValueError, match="per_row"):
        tile(digits(2), 0)


# --- parse_idx -----------------------------------------------------------------------


def idx_bytes(array: np.ndarray, magic: int | None = None, dims=None) -> bytes:
    dims = array.shape if dims is None else dims
    magic = 0x800 + len(dims) if magic is None else magic
    return gzip.compress(struct.pack(f">I{len(dims)}I", magic, *dims) + array.tobytes())


def test_parse_idx_images_and_labels():
    images = np.arange(2 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(2, 28, 28)
    assert np.array_equal(parse_idx(idx_bytes(images), "x", 3), images)
    labels = np.array([5, 0, 4], np.uint8)
    parsed = parse_idx(idx_bytes(labels), "y", 1)
    assert parsed.dtype == np.uint8 and parsed.tolist() == [5, 0, 4]
    assert parsed.flags.writeable  # a copy, not a view of the gzip buffer


def test_parse_idx_the_real_header_bytes():
    raw = gzip.compress(bytes.fromhex("00000801 00000002") + bytes([7, 3]))
    assert parse_idx(raw, "labels", 1).tolist() == [7, 3]


@pytest.mark.parametrize("raw, match", [
    (idx_bytes(np.zeros(3, np.uint8), magic=0x0803), "bad idx magic number 0x00000803"),
    (idx_bytes(np.zeros(3, np.uint8), magic=0x0D01), "bad idx magic"),  # float type
    (idx_bytes(np.zeros(3, np.uint8), dims=(4,)), "header says 4 = 4 bytes, file holds 3"),
    (idx_bytes(np.zeros(5, np.uint8), dims=(4,)), "file holds 5"),
    (gzip.compress(b"\x00\x00\x08"), "too short for an idx header"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x01\x07", "not a valid gzip file"),
    (idx_bytes(np.zeros(300, np.uint8))[:-12], "not a valid gzip file"),  # truncated
])
def test_parse_idx_refuses_bad_files(raw, match):
    with pytest.raises(DataError, match=match):
        parse_idx(raw, "f.gz", 1)


def test_parse_idx_corrupt_deflate_stream_is_a_data_error():
    raw = bytearray(idx_bytes(np.arange(200, dtype=np.uint8)))
    raw[12:20] = b"\xff" * 8  # inside the deflate stream
    with pytest.raises(DataError, match="f.gz: not a valid gzip file"):
        parse_idx(bytes(raw), "f.gz", 1)


# --- errors reach the user as one line -----------------------------------------------


def test_run_prints_one_line_and_exits_1(capsys):
    def main():
        raise DataError("first line\nsecond line\n\n  third")

    with pytest.raises(SystemExit) as info:
        common.run(main)
    assert info.value.code == 1
    assert capsys.readouterr().err == "error: first line; second line; third\n"


def test_run_turns_ctrl_c_into_exit_130(capsys):
    def main():
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as info:
        common.run(main)
    assert info.value.code == 130
    assert capsys.readouterr().err == "error: interrupted; no output was replaced\n"


def test_error_classes():
    assert issubclass(WriteError, PipelineError) and issubclass(ParamError, PipelineError)
    assert issubclass(DataError, PipelineError)
