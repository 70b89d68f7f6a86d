"""Mosaics: images laid out as tiles on a white canvas, as the original script laid them out.

render-errors' per-class mosaics and audit-labels' mosaic of suspected label errors.
"""

from __future__ import annotations

import math

import numpy as np

from stages.data.mnist import IMAGE_SIDE
from stages.runtime import params


def tile(images: np.ndarray, per_row: int) -> np.ndarray:
    """Lay 28×28 tiles left-to-right, top-to-bottom on a white canvas, as the original did.

    The canvas is per_row tiles wide and ceil(n / per_row) tiles high. With no images the
    original would have made a zero-height canvas, which no viewer opens; we return one
    white row of tiles instead.
    """
    if per_row < 1:
        raise ValueError(f"per_row must be >= 1, got {per_row}")
    images = np.asarray(images, dtype=np.uint8)
    n = len(images)
    rows = max(1, math.ceil(n / per_row))
    side = IMAGE_SIDE
    canvas = np.full((rows * per_row, side, side), 255, dtype=np.uint8)
    canvas[:n] = images
    # (rows, per_row, 28, 28) -> (rows, 28, per_row, 28): rows of tiles, pixel rows inside.
    return canvas.reshape(rows, per_row, side, side).transpose(0, 2, 1, 3).reshape(
        rows * side, per_row * side)


def mosaics(data: dict[str, np.ndarray], predicted: np.ndarray, cfg: dict,
            classes: int = params.CLASSES) -> dict:
    """Every mosaic by file name, as uint8 pixel arrays."""
    x_train, y_train = data["x_train"], data["y_train"]
    x_test, y_test = data["x_test"], data["y_test"]
    right = predicted == y_test
    out = {}
    for c in range(classes):
        out[f"train_{c}"] = tile(x_train[y_train == c], cfg["per_row"])
        out[f"test_{c}"] = tile(x_test[(y_test == c) & right], cfg["per_row"])
        out[f"test_error_{c}"] = tile(x_test[(y_test == c) & ~right], cfg["errors_per_row"])
    return out
