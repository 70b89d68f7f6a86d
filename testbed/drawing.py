"""Digits drawn as a hand draws them: strokes in a unit box (x right, y down), drawn with a
round pen on a page of any size, for the prediction command's tests and benchmark."""

from __future__ import annotations

import math

import numpy as np

STROKES = {
    "0": [[(0.5 + 0.32 * math.cos(t), 0.5 + 0.45 * math.sin(t))
           for t in np.linspace(0, 2 * math.pi, 40)]],
    "1": [[(0.45, 0.1), (0.55, 0.0), (0.55, 1.0)]],
    "2": [[(0.15, 0.25), (0.3, 0.05), (0.6, 0.0), (0.8, 0.15), (0.8, 0.35), (0.6, 0.6),
           (0.1, 1.0), (0.9, 1.0)]],
    "3": [[(0.15, 0.1), (0.5, 0.0), (0.8, 0.15), (0.75, 0.35), (0.45, 0.48), (0.8, 0.6),
           (0.85, 0.85), (0.5, 1.0), (0.1, 0.9)]],
    "4": [[(0.6, 0.0), (0.1, 0.65), (0.9, 0.65)], [(0.65, 0.3), (0.65, 1.0)]],
    "7": [[(0.1, 0.05), (0.9, 0.05), (0.45, 1.0)]],
}


def drawn_digit(digit: str, size=(900, 700), box=(120, 80, 420, 480), width: int = 26,
                ink: int = 30, paper: int = 235, noise: float = 0.0):
    """A PIL grey image: `digit`'s strokes drawn with a round pen of `width` px inside `box`
    (left, top, right, bottom) of a `size` canvas; dark ink on light paper by default, with
    Gaussian paper noise of `noise` grey levels (seeded)."""
    from PIL import Image, ImageDraw

    image = Image.new("L", size, paper)
    pen = ImageDraw.Draw(image)
    left, top, right, bottom = box
    for stroke in STROKES[digit]:
        points = [(left + (right - left) * x, top + (bottom - top) * y) for x, y in stroke]
        pen.line(points, fill=ink, width=width, joint="curve")
        for x, y in points:  # round ends and joints, as a pen leaves them
            pen.ellipse([x - width / 2, y - width / 2, x + width / 2, y + width / 2], fill=ink)
    if noise:
        pixels = np.asarray(image, dtype=np.float64)
        pixels = pixels + np.random.default_rng(0).normal(0, noise, pixels.shape)
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image
