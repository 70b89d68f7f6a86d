"""stages/data/console.py: the original script's text drawing of a digit."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from stages.data.console import PALETTE, draw


def test_draw_palette_levels():
    # The original's ten characters, darkest first: level = floor(v / 255 * 9). Below:
    # the first value of each level, and the one just below it.
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
    assert draw(np.array([[0.5]], np.float32) * 255) == PALETTE[4]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hnp.arrays(np.uint8, (28, 28), elements=st.integers(0, 255)))
def test_draw_is_a_monotone_map_onto_the_palette(image):
    lines = draw(image).split("\n")
    assert len(lines) == 28 and {len(line) for line in lines} == {28}
    levels = np.array([[PALETTE.index(c) for c in line] for line in lines])
    assert np.array_equal(levels, image.astype(int) * 9 // 255)
    order = np.argsort(image, axis=None, kind="stable")
    assert (np.diff(levels.ravel()[order]) >= 0).all()
