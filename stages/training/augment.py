"""Seeded augmentation for training: small random rotations, zooms and shifts, and
elastic distortion (Simard et al. 2003, "Best practices for convolutional neural networks
applied to visual document analysis").

All of them are folded into one map per image and applied in a single bilinear
resampling (each framework's fit module does the resampling with its own op): a third
of the cost of three separate resamplings, and no interpolation blur compounded three
times. It runs in the training step, outside the network, so the saved model is the plain
classifier.

This module holds the geometry only, in plain arithmetic that works the same on NumPy
arrays, TensorFlow tensors and PyTorch tensors: both frameworks draw the same
distribution of maps from the same formula.
"""

from __future__ import annotations

import math

import numpy as np

DRAWS = 5  # uniform numbers in [-1, 1] per image: angle, x and y scale, x and y shift


def affine_rows(u, side: int, rotation: float, shift: float, zoom: float, cos, sin) -> tuple:
    """Map uniform draws u in [-1, 1] of shape [5, n] to (a0, a1, a2, b0, b1, b2), each [n].

    An output pixel at column x, row y samples the input at (a0 x + a1 y + a2,
    b0 x + b1 y + b2): rotated by up to `rotation` degrees and each axis scaled by
    1 ± `zoom` about the image centre, then moved by up to `shift` × side pixels.
    `cos` and `sin` are the array library's own (np.cos, tf.cos, torch.cos).
    """
    angle = u[0] * (rotation * math.pi / 180)
    scale_x, scale_y = 1 + u[1] * zoom, 1 + u[2] * zoom
    move_x, move_y = u[3] * (shift * side), u[4] * (shift * side)
    c, s = cos(angle), sin(angle)
    a0, a1 = c / scale_x, -s / scale_x
    b0, b1 = s / scale_y, c / scale_y
    centre = (side - 1) / 2
    a2 = centre - (a0 + a1) * centre - move_x
    b2 = centre - (b0 + b1) * centre - move_y
    return a0, a1, a2, b0, b1, b2


def gaussian(side: int, sigma: float) -> np.ndarray:
    """The [side, side] matrix G of a 1-D Gaussian blur of standard deviation `sigma`
    pixels (zeros beyond the edges): G @ f @ G blurs an image f along both axes.

    G is symmetric, so the same product needs no transpose in any array library.
    """
    offsets = np.arange(side)[:, None] - np.arange(side)[None, :]
    kernel = np.exp(-offsets.astype(np.float64) ** 2 / (2 * sigma**2))
    # Normalised over the whole, untruncated kernel: the blur of a constant field is that
    # constant away from the edges.
    reach = np.arange(-side - int(6 * sigma), side + int(6 * sigma) + 1)
    return (kernel / np.exp(-reach.astype(np.float64) ** 2 / (2 * sigma**2)).sum()).astype(
        np.float32)


def displacements(u, blur, alpha: float) -> tuple:
    """Map uniform draws u in [-1, 1] of shape [2, n, side, side] to an elastic field
    (dx, dy), each [n, side, side] in pixels: white noise blurred by `blur` (gaussian()),
    times `alpha`. Neighbouring pixels move together, so strokes bend rather than break.
    """
    field = (blur @ u @ blur) * alpha
    return field[0], field[1]


def is_off(rotation: float, shift: float, zoom: float, elastic: float = 0.0) -> bool:
    return not (rotation or shift or zoom or elastic)
