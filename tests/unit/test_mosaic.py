"""stages/analysis/mosaic.py: the tiler, and which images land in which of the original's
mosaics, pixel for pixel as the original pasted them."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from stages.analysis.mosaic import mosaics, tile
from tests.digits import centroid_probabilities, fixture_data

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


def reference_tile(images: np.ndarray, per_row: int) -> np.ndarray:
    """The original layout, one paste at a time: white canvas, row-major, 28×28 tiles."""
    n = len(images)
    rows = math.ceil(n / per_row)
    canvas = Image.new("L", (per_row * 28, rows * 28), 255)
    for i, image in enumerate(images):
        canvas.paste(Image.fromarray(image, mode="L"), ((i % per_row) * 28, (i // per_row) * 28))
    return np.asarray(canvas)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 30).flatmap(
           lambda n: hnp.arrays(np.uint8, (n, 28, 28), elements=st.integers(0, 255))),
       st.integers(1, 12))
def test_tile_matches_the_paste_one_at_a_time_reference(batch, per_row):
    got = tile(batch, per_row)
    assert got.dtype == np.uint8
    if len(batch) == 0:
        # the original would make a zero-height canvas; tile() gives one white row
        assert got.shape == (28, per_row * 28) and (got == 255).all()
    else:
        assert np.array_equal(got, reference_tile(batch, per_row))


# --- the original's mosaics, as the stage lays them out --------------------------------


def test_mosaics_put_each_image_in_its_mosaic_empty_one_and_exact_multiple():
    rng = np.random.default_rng(0)
    x_test = rng.integers(0, 256, (16, 28, 28), dtype=np.uint8)
    y_test = np.array([0] * 10 + [1] + [2] * 5, dtype=np.uint8)
    x_train = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    y_train = np.array([0] * 5 + [1] * 7, dtype=np.uint8)
    predicted = y_test.copy()
    predicted[[0, 3, 10]] = 9  # two wrong 0s, the only 1 is wrong, every 2 right
    data = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    out = mosaics(data, predicted, {"per_row": 4, "errors_per_row": 2})
    assert sorted(out) == sorted(f"{kind}_{c}" for c in range(10)
                                 for kind in ("train", "test", "test_error"))

    def tiles(m):
        return m.reshape(-1, 28, m.shape[1] // 28, 28).transpose(0, 2, 1, 3).reshape(-1, 28, 28)

    assert out["train_3"].shape == (28, 4 * 28) and (out["train_3"] == 255).all()  # empty
    assert out["test_error_0"].shape == (28, 2 * 28)       # exactly one full row of 2
    np.testing.assert_array_equal(tiles(out["test_error_0"]), x_test[[0, 3]])
    assert out["test_error_1"].shape == (28, 2 * 28)       # one image, then white
    np.testing.assert_array_equal(tiles(out["test_error_1"])[0], x_test[10])
    assert (tiles(out["test_error_1"])[1] == 255).all()
    assert out["test_0"].shape == (2 * 28, 4 * 28)          # 8 right 0s: two full rows
    np.testing.assert_array_equal(tiles(out["test_0"]), x_test[[1, 2, 4, 5, 6, 7, 8, 9]])
    assert out["train_1"].shape == (2 * 28, 4 * 28)         # 7 = one row + 3
    np.testing.assert_array_equal(tiles(out["train_1"])[:7], x_train[5:])
    assert (tiles(out["train_1"])[7] == 255).all()
    assert out["test_error_2"].shape == (28, 2 * 28) and (out["test_error_2"] == 255).all()


def test_mosaics_are_pixel_identical_to_the_original_paste_loop():
    from benchmarks.mosaics import naive_mosaics

    data = fixture_data()
    predicted = centroid_probabilities(data).argmax(axis=1)
    fast = mosaics(data, predicted, {"per_row": 50, "errors_per_row": 10})
    slow = naive_mosaics(data, predicted)
    assert fast.keys() == slow.keys()
    for name in fast:
        np.testing.assert_array_equal(fast[name], slow[name], err_msg=name)
