"""The original script's console drawing of a digit."""

from __future__ import annotations

import numpy as np

# Space is the dark background, '@' the brightest stroke.
PALETTE = " .:-=+*#%@"


def draw(image: np.ndarray) -> str:
    """One text row per image row; each pixel p (0..255) becomes PALETTE[int(p / 255 * 9)]."""
    levels = (np.asarray(image, dtype=np.float64) / 255 * 9).astype(int)
    return "\n".join("".join(PALETTE[v] for v in row) for row in levels)
