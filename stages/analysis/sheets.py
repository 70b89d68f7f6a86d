"""Annotated error sheets: each misclassified test image beside its nearest training images.

One sheet per true class (reports/plots/errors/sheet_{c}.png, a DVC image plot), one row
per error, most confident mistake first:

    [test image]  #index true->pred   [k nearest training images    [k nearest training images
                  conf 0.987           of the true class]            of the predicted class]

Text is drawn with Pillow's built-in bitmap font (ImageFont.load_default_imagefont(): a
6×11 px monospace font embedded in Pillow; no FreeType, no font files, no network), so a
sheet is the same bytes on every machine with the same Pillow. The page
(reports/errors.html) shows the same rows with HTML captions and uses `strip` for images.
"""

from __future__ import annotations

import functools

import numpy as np

from stages.data.mnist import IMAGE_SIDE

TILE = IMAGE_SIDE
GAP = 1            # white pixels between neighbour tiles in a strip
PAD = 4            # margin around the sheet and between rows
COLUMN_GAP = 8
CHAR_W, LINE_H = 6, 13  # bitmap font: 6 px per character, 11 px glyphs + 2 px leading
MIN_TEXT_CHARS = 12     # "#12345 7->2" / "conf 0.987"
WHITE, BLACK, MISSING = 255, 0, 208  # MISSING: a class with fewer than k training images


@functools.lru_cache(maxsize=1)
def font():
    from PIL import ImageFont

    return ImageFont.load_default_imagefont()


def strip(images: np.ndarray, indices) -> np.ndarray:
    """Tiles images[i] for i in `indices` left to right, GAP white pixels apart; an index
    of -1 (no such neighbour) gives a light grey tile."""
    indices = list(indices)
    width = max(1, len(indices)) * (TILE + GAP) - GAP
    out = np.full((TILE, width), WHITE, dtype=np.uint8)
    for j, i in enumerate(indices):
        x = j * (TILE + GAP)
        out[:, x : x + TILE] = images[i] if i >= 0 else MISSING
    return out


def caption(record: dict, names: list[str]) -> tuple[str, str]:
    """The two text lines beside an error: '#index true->pred' and 'conf 0.987'."""
    return (f"#{record['index']} {names[record['true']]}->{names[record['predicted']]}",
            f"conf {record['confidence']:.3f}")


def _columns(k: int, names: list[str]) -> dict[str, int]:
    block = max(k * (TILE + GAP) - GAP, len("nearest true") * CHAR_W)
    x_text = PAD + TILE + COLUMN_GAP
    # Room for the longest caption: '#12345 ' and two class names joined by '->'.
    longest = 7 + 2 * max(map(len, names)) + 2
    x_true = x_text + max(MIN_TEXT_CHARS, longest) * CHAR_W + COLUMN_GAP
    x_pred = x_true + block + 2 * COLUMN_GAP
    return {"image": PAD, "text": x_text, "true": x_true, "pred": x_pred,
            "width": x_pred + block + PAD}


def error_sheet(label: int, records: list[dict], x_test: np.ndarray, x_train: np.ndarray,
                k: int, names: list[str]) -> np.ndarray:
    """The sheet of one true digit: a two-line header, then one row per record (in the
    order given). Records carry 'true_neighbours' and 'pred_neighbours' (k indices each)."""
    from PIL import Image, ImageDraw

    col = _columns(k, names)
    title = (f"true class {names[label]}: {len(records)} error{'s' if len(records) != 1 else ''}"
             + (", most confident first" if records else ""))
    header = ["test", "#index t->p", "nearest true", "nearest pred"]
    width = max(col["width"], PAD + len(title) * CHAR_W + PAD)
    top = PAD + 2 * LINE_H + PAD
    row_h = TILE + PAD
    height = top + len(records) * row_h + (PAD if records else 0)
    canvas = np.full((height, width), WHITE, dtype=np.uint8)
    texts = [((PAD, PAD), title)]
    for name, text in zip(("image", "text", "true", "pred"), header):
        texts.append(((col[name], PAD + LINE_H), text))
    for r, rec in enumerate(records):
        y = top + r * row_h
        canvas[y : y + TILE, PAD : PAD + TILE] = x_test[rec["index"]]
        for name, key in (("true", "true_neighbours"), ("pred", "pred_neighbours")):
            tiles = strip(x_train, rec[key])
            canvas[y : y + TILE, col[name] : col[name] + tiles.shape[1]] = tiles
        first, second = caption(rec, names)
        texts.append(((col["text"], y + 1), first))
        texts.append(((col["text"], y + 1 + LINE_H), second))
    image = Image.fromarray(canvas, mode="L")
    draw = ImageDraw.Draw(image)
    for xy, text in texts:
        draw.text(xy, text, fill=BLACK, font=font())
    return np.asarray(image)


def error_sheets(records: list[dict], x_test: np.ndarray, x_train: np.ndarray,
                 k: int, names: list[str]) -> dict[str, np.ndarray]:
    """sheet_{c} for every class label c (a class without errors gets a header-only sheet);
    records must already be grouped by true class and ordered within it."""
    return {
        f"sheet_{c}": error_sheet(c, [r for r in records if r["true"] == c], x_test, x_train,
                                  k, names)
        for c in range(len(names))
    }
