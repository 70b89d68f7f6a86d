"""stages/analysis/sheets.py: one annotated sheet per true class, every error beside its
nearest training images, captions drawn with Pillow's built-in bitmap font."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from stages.analysis import sheets as error_sheets
from stages.render_errors import analyse
from tests.digits import NAMED_CLASSES, centroid_probabilities, fixture_data

DIGITS = [str(c) for c in range(10)]
HEADER_H = error_sheets.PAD + 2 * error_sheets.LINE_H + error_sheets.PAD


def drawn_text(text: str) -> np.ndarray:
    image = Image.new("L", (len(text) * error_sheets.CHAR_W, 11), 255)
    ImageDraw.Draw(image).text((0, 0), text, fill=0, font=error_sheets.font())
    return np.asarray(image)


def assert_text_at(sheet: np.ndarray, y: int, x: int, text: str) -> None:
    glyphs = drawn_text(text)
    assert x + glyphs.shape[1] <= sheet.shape[1], f"{text!r} runs off the sheet"
    np.testing.assert_array_equal(sheet[y : y + 11, x : x + glyphs.shape[1]], glyphs,
                                  err_msg=text)


@pytest.fixture(scope="module")
def analysed():
    data = fixture_data()
    return data, analyse(data, centroid_probabilities(data), 3)


@pytest.mark.parametrize("names", [DIGITS, NAMED_CLASSES], ids=["digits", "named"])
def test_sheet_rows_show_image_caption_and_neighbours_in_order(analysed, names):
    data, records = analysed
    k = 3
    label = max(range(10), key=lambda d: sum(r["true"] == d for r in records))
    mine = [r for r in records if r["true"] == label]
    assert len(mine) >= 3
    assert [r["confidence"] for r in mine] == sorted((r["confidence"] for r in mine),
                                                     reverse=True)
    sheet = error_sheets.error_sheet(label, mine, data["x_test"], data["x_train"], k, names)
    col = error_sheets._columns(k, names)
    row_h = error_sheets.TILE + error_sheets.PAD
    assert sheet.shape[0] == HEADER_H + len(mine) * row_h + error_sheets.PAD
    p = error_sheets.PAD
    assert_text_at(sheet, p, p, f"true class {names[label]}: {len(mine)} errors, "
                                "most confident first")
    for r, rec in enumerate(mine):
        y = HEADER_H + r * row_h
        np.testing.assert_array_equal(sheet[y : y + 28, col["image"] : col["image"] + 28],
                                      data["x_test"][rec["index"]])
        first, second = error_sheets.caption(rec, names)
        assert first == f"#{rec['index']} {names[label]}->{names[rec['predicted']]}"
        assert second == f"conf {rec['confidence']:.3f}"
        for line, text in enumerate((first, second)):
            assert_text_at(sheet, y + 1 + line * error_sheets.LINE_H, col["text"], text)
        for name, key in (("true", "true_neighbours"), ("pred", "pred_neighbours")):
            for j, t in enumerate(rec[key]):
                x = col[name] + j * (28 + error_sheets.GAP)
                np.testing.assert_array_equal(sheet[y : y + 28, x : x + 28], data["x_train"][t])
        assert (data["y_train"][rec["true_neighbours"]] == label).all()
        assert (data["y_train"][rec["pred_neighbours"]] == rec["predicted"]).all()


def test_long_class_names_widen_the_sheet_and_never_overlap_the_images():
    longest = ["x" * 24] * 10
    short, wide = error_sheets._columns(3, DIGITS), error_sheets._columns(3, longest)
    assert wide["width"] > short["width"] and wide["true"] > short["true"]
    caption = f"#12345 {longest[0]}->{longest[1]}"
    assert wide["text"] + len(caption) * error_sheets.CHAR_W < wide["true"]
    rec = {"index": 12345, "true": 0, "predicted": 1, "confidence": 0.5, "p_true": 0.1,
           "true_neighbours": [0, 0, 0], "pred_neighbours": [0, 0, 0]}
    x = np.zeros((12346, 28, 28), np.uint8)
    sheet = error_sheets.error_sheet(0, [rec], x, x[:1], 3, longest)
    assert sheet.shape[1] == wide["width"]
    assert_text_at(sheet, HEADER_H + 1, wide["text"], caption)
    # the caption's white margin: nothing drawn between its end and the first neighbour
    end = wide["text"] + len(caption) * error_sheets.CHAR_W
    assert (sheet[HEADER_H : HEADER_H + 28, end : wide["true"]] == error_sheets.WHITE).all()


def test_named_captions_are_drawn_in_full(analysed):
    data, records = analysed
    rec = next(r for r in records if r["true"] == 6 or r["predicted"] == 6)
    sheet = error_sheets.error_sheet(rec["true"], [rec], data["x_test"], data["x_train"], 3,
                                     NAMED_CLASSES)
    col = error_sheets._columns(3, NAMED_CLASSES)
    first, _ = error_sheets.caption(rec, NAMED_CLASSES)
    assert "<Shirt> & co" in first
    assert_text_at(sheet, HEADER_H + 1, col["text"], first)


def test_sheet_of_a_class_without_errors_and_with_one_error():
    x = np.zeros((2, 28, 28), dtype=np.uint8)
    empty = error_sheets.error_sheet(4, [], x, x, 3, NAMED_CLASSES)
    assert empty.shape[0] == HEADER_H
    p = error_sheets.PAD
    assert_text_at(empty, p, p, f"true class {NAMED_CLASSES[4]}: 0 errors")
    rec = {"index": 1, "true": 4, "predicted": 9, "confidence": 0.5, "p_true": 0.4,
           "true_neighbours": [0, -1, -1], "pred_neighbours": [-1, -1, -1]}
    one = error_sheets.error_sheet(4, [rec], x, x, 3, NAMED_CLASSES)
    assert one.shape[0] == empty.shape[0] + error_sheets.TILE + 2 * error_sheets.PAD
    assert_text_at(one, p, p, f"true class {NAMED_CLASSES[4]}: 1 error, most confident first")
    col = error_sheets._columns(3, NAMED_CLASSES)
    y = empty.shape[0]
    # Missing neighbours are light grey tiles, real ones are the images.
    assert (one[y : y + 28, col["true"] : col["true"] + 28] == 0).all()
    assert (one[y : y + 28, col["true"] + 29 : col["true"] + 57] == error_sheets.MISSING).all()
    assert (one[y : y + 28, col["pred"] : col["pred"] + 28] == error_sheets.MISSING).all()


def test_strip_lays_tiles_left_to_right_with_white_gaps():
    images = np.stack([np.full((28, 28), v, np.uint8) for v in (10, 20, 30)])
    out = error_sheets.strip(images, [2, -1, 0])
    assert out.shape == (28, 3 * 28 + 2 * error_sheets.GAP)
    step = 28 + error_sheets.GAP
    assert [int(out[0, j * step]) for j in range(3)] == [30, error_sheets.MISSING, 10]
    assert (out[:, 28:step] == error_sheets.WHITE).all()


def test_sheets_cover_every_class_and_are_byte_stable(analysed):
    data, records = analysed
    records = [dict(r, true_neighbours=r["true_neighbours"][:2],
                    pred_neighbours=r["pred_neighbours"][:2]) for r in records]
    sheets = error_sheets.error_sheets(records, data["x_test"], data["x_train"], 2,
                                       NAMED_CLASSES)
    assert sorted(sheets) == [f"sheet_{d}" for d in range(10)]
    for d in range(10):
        n = sum(r["true"] == d for r in records)
        assert sheets[f"sheet_{d}"].shape[0] == HEADER_H + n * (
            error_sheets.TILE + error_sheets.PAD) + (error_sheets.PAD if n else 0)

    def png(pixels):
        buf = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buf, format="PNG")
        return buf.getvalue()

    again = error_sheets.error_sheets(records, data["x_test"], data["x_train"], 2,
                                      NAMED_CLASSES)
    assert all(png(sheets[n]) == png(again[n]) for n in sheets)


def test_annotation_font_is_pillows_builtin_bitmap_font():
    # Not FreeType: the same glyphs on every machine, no font files, no network.
    assert type(error_sheets.font()) is ImageFont.ImageFont
    assert error_sheets.font().getbbox("#0123456789->.") == (0, 0, 14 * error_sheets.CHAR_W, 11)
