"""The error analysis of render-errors: neighbour search, tables, annotated sheets, the stage.

The tiler itself (stages.common.tile) is tested in test_common.py; here its use by the
stage (which images land in which mosaic) and everything the stage adds on top of it.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from conftest import FIXTURE, ROOT, run_env
from stages import error_sheets, error_tables
from stages.common import ParamError, read_csv_rows, save_npz
from stages.neighbours import nearest_by_class, squared_distances
from stages.render_errors import mosaics, validate

# --- shared helpers (also used by test_errors_page.py) --------------------------------


def fixture_data() -> dict[str, np.ndarray]:
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


def centroid_probabilities(data: dict[str, np.ndarray]) -> np.ndarray:
    """Deterministic, realistic-looking predictions without a network: a softmax over
    the negative distances to each digit's mean training image (~80% right)."""
    x = data["x_train"].reshape(len(data["x_train"]), -1).astype(np.float64) / 255
    means = np.stack([x[data["y_train"] == d].mean(axis=0) for d in range(10)])
    t = data["x_test"].reshape(len(data["x_test"]), -1).astype(np.float64) / 255
    logits = -((t[:, None, :] - means[None]) ** 2).sum(axis=2)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def analysed(data, probabilities, k=3) -> list[dict]:
    from stages.render_errors import analyse

    return analyse(data, probabilities, k)


def reference_nearest(queries, train_x, train_y, classes, k):
    """Brute force: sort every training image of the class by (distance, index)."""
    m, s = classes.shape
    idx = np.full((m, s, k), -1, dtype=np.int64)
    dist = np.full((m, s, k), -1, dtype=np.int64)
    for i in range(m):
        all_d = squared_distances(queries[i : i + 1], train_x)[0]  # one query: small memory
        for j in range(s):
            members = np.flatnonzero(train_y == classes[i, j])
            order = sorted(members.tolist(), key=lambda t: (all_d[t], t))[:k]
            idx[i, j, : len(order)] = order
            dist[i, j, : len(order)] = all_d[order]
    return idx, dist


# --- neighbour search -----------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_neighbours_match_brute_force_on_random_data(seed):
    rng = np.random.default_rng(seed)
    n, m, side = int(rng.integers(5, 80)), int(rng.integers(1, 30)), int(rng.integers(2, 6))
    # Few distinct pixel values: many exact ties, which must go to the lower index.
    levels = np.array([0, 1, 128, 255], dtype=np.uint8)[: int(rng.integers(2, 5))]
    train_x = rng.choice(levels, size=(n, side, side))
    train_y = rng.integers(0, 4, n).astype(np.uint8)
    queries = rng.choice(levels, size=(m, side, side))
    classes = rng.integers(0, 5, (m, 2))  # class 4 has no training images at all
    k = int(rng.integers(1, 8))
    got = nearest_by_class(queries, train_x, train_y, classes, k)
    want = reference_nearest(queries, train_x, train_y, classes, k)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])


def test_neighbours_only_come_from_the_requested_class():
    data = fixture_data()
    queries = data["x_test"][:40]
    classes = np.stack([data["y_test"][:40], (data["y_test"][:40] + 3) % 10], axis=1)
    idx, dist = nearest_by_class(queries, data["x_train"], data["y_train"], classes, 5)
    assert (idx >= 0).all()
    np.testing.assert_array_equal(data["y_train"][idx], np.repeat(classes[:, :, None], 5, 2))
    assert (np.diff(dist, axis=2) >= 0).all()  # nearest first
    ref = reference_nearest(queries, data["x_train"], data["y_train"], classes, 5)
    np.testing.assert_array_equal(idx, ref[0])
    np.testing.assert_array_equal(dist, ref[1])


@pytest.mark.parametrize("query_chunk,train_chunk", [(1, 1), (3, 7), (16, 50), (1000, 5000)])
def test_chunking_never_changes_the_result(query_chunk, train_chunk):
    data = fixture_data()
    rng = np.random.default_rng(1)
    classes = rng.integers(0, 10, (60, 2))
    whole = nearest_by_class(data["x_test"][:60], data["x_train"], data["y_train"], classes, 4,
                             query_chunk=10**6, train_chunk=10**6)
    chunked = nearest_by_class(data["x_test"][:60], data["x_train"], data["y_train"], classes,
                               4, query_chunk=query_chunk, train_chunk=train_chunk)
    np.testing.assert_array_equal(whole[0], chunked[0])
    np.testing.assert_array_equal(whole[1], chunked[1])


def test_distance_is_squared_euclidean_on_raw_pixels():
    query = np.zeros((1, 28, 28), dtype=np.uint8)
    a = np.zeros((28, 28), dtype=np.uint8)
    a[0, 0] = 200                       # L1 200, squared L2 40000
    b = np.zeros((28, 28), dtype=np.uint8)
    b[1, :4] = 60                       # L1 240, squared L2 14400: nearer only under L2
    full = np.full((28, 28), 255, dtype=np.uint8)  # the largest possible distance
    train = np.stack([a, b, full])
    idx, dist = nearest_by_class(query, train, np.zeros(3, np.uint8), np.array([[0]]), 3)
    assert idx[0, 0].tolist() == [1, 0, 2]
    assert dist[0, 0].tolist() == [14400, 40000, 784 * 255 * 255]  # exact, no rounding


def test_missing_neighbours_are_padded():
    train = np.zeros((3, 28, 28), dtype=np.uint8)
    idx, dist = nearest_by_class(train[:1], train, np.array([0, 0, 1]), np.array([[0, 1, 2]]), 3)
    assert idx[0].tolist() == [[0, 1, -1], [2, -1, -1], [-1, -1, -1]]
    assert dist[0].tolist() == [[0, 0, -1], [0, -1, -1], [-1, -1, -1]]


def test_neighbour_search_refuses_normalized_images_and_bad_k():
    x = np.zeros((2, 28, 28), dtype=np.float32)
    with pytest.raises(ValueError, match="integers"):
        nearest_by_class(x, x, np.zeros(2), np.zeros((2, 1)), 1)
    u = x.astype(np.uint8)
    with pytest.raises(ValueError, match=">= 1"):
        nearest_by_class(u, u, np.zeros(2), np.zeros((2, 1)), 0)


# --- tables ---------------------------------------------------------------------------


def probs_for(pairs: list[tuple[int, int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """(true, predicted, confidence) per test image -> y_true, probabilities."""
    y = np.array([t for t, _, _ in pairs], dtype=np.uint8)
    p = np.zeros((len(pairs), 10), dtype=np.float32)
    for i, (t, pred, conf) in enumerate(pairs):
        p[i] = (1 - conf) / 9
        p[i, pred] = conf
    return y, p


def test_error_records_are_grouped_by_true_digit_most_confident_first():
    y, p = probs_for([(3, 5, 0.6), (1, 7, 0.7), (3, 3, 0.9), (3, 8, 0.95), (1, 4, 0.99),
                      (3, 5, 0.6), (0, 0, 0.99), (9, 4, 0.51)])
    records = error_tables.error_records(y, p)
    assert [(r["index"], r["true"], r["predicted"]) for r in records] == [
        (4, 1, 4), (1, 1, 7),           # digit 1: 0.99 before 0.7
        (3, 3, 8), (0, 3, 5), (5, 3, 5),  # digit 3: 0.95, then the 0.6 tie by index
        (7, 9, 4),
    ]
    assert records[0]["confidence"] == pytest.approx(0.99)
    assert records[0]["p_true"] == pytest.approx(0.01 / 9, rel=1e-3)
    assert 2 not in [r["index"] for r in records] and 6 not in [r["index"] for r in records]


def test_class_error_rates_and_confusion_pairs():
    y, p = probs_for([(3, 5, 0.6)] * 3 + [(3, 3, 0.9)] + [(4, 9, 0.8)] * 3 + [(1, 7, 0.9)])
    y_pred = p.argmax(axis=1)
    rates = {r["digit"]: r for r in error_tables.class_error_rates(y, y_pred)}
    assert rates[3] == {"digit": 3, "samples": 4, "errors": 3, "error_rate": 0.75}
    assert rates[0] == {"digit": 0, "samples": 0, "errors": 0, "error_rate": 0.0}
    pairs = error_tables.confusion_pairs(y, y_pred, top=10)
    # Equal counts: (true, predicted) order.
    assert [(r["pair"], r["count"]) for r in pairs] == [("3->5", 3), ("4->9", 3), ("1->7", 1)]
    assert sum(r["share"] for r in pairs) == pytest.approx(1.0)
    assert len(error_tables.confusion_pairs(y, y_pred, top=2)) == 2
    assert error_tables.confusion_pairs(y, y, top=5) == []


def test_most_confident_ranks_across_digits():
    y, p = probs_for([(3, 5, 0.6), (1, 7, 0.97), (2, 8, 0.99), (5, 6, 0.97)])
    records = error_tables.error_records(y, p)
    top = error_tables.most_confident(records, 3)
    assert [(r["rank"], r["index"]) for r in top] == [(1, 2), (2, 1), (3, 3)]
    rows = error_tables.confident_rows(records, 2)
    assert rows[0][:4] == [1, 2, 2, 8] and rows[0][4] == "0.990000"


def test_summary_and_neighbour_rows():
    y, p = probs_for([(3, 5, 0.6), (1, 7, 0.95), (2, 2, 0.9), (2, 2, 0.9)])
    records = error_tables.error_records(y, p)  # digit 1 first, then digit 3
    idx = np.array([[[10, 11], [20, -1]], [[30, 31], [40, 41]]])
    dist = np.array([[[100, 400], [900, -1]], [[2500, 2500], [2500, 3600]]])
    error_tables.attach_neighbours(records, idx, dist)
    assert records[0]["nearer"] == "true" and records[1]["nearer"] == "tie"
    assert records[0]["true_l2"] == pytest.approx([10 / 255, 20 / 255])
    rows = error_tables.neighbour_rows(records)
    assert rows[0][:6] == [1, 1, 7, "0.950000", f"{0.05 / 9:.6f}", "true"]
    assert rows[0][6:] == ["10 11", "0.0392 0.0784", "20", "0.1176"]  # -1 left out
    summary = error_tables.summary(y, p.argmax(1), records, nearer_predicted=0)
    assert summary["errors"] == 2 and summary["samples"] == 4 and summary["error_rate"] == 0.5
    assert summary["per_class"]["2"] == {"errors": 0, "error_rate": 0.0}
    assert summary["per_class"]["3"] == {"errors": 1, "error_rate": 1.0}
    assert summary["confident_errors"] == 1
    assert summary["top_confusion"] == {"true": 1, "predicted": 7, "count": 1}
    json.dumps(summary)  # plain JSON types only


# --- annotated sheets -----------------------------------------------------------------


def drawn_text(text: str) -> np.ndarray:
    image = Image.new("L", (len(text) * error_sheets.CHAR_W, 11), 255)
    ImageDraw.Draw(image).text((0, 0), text, fill=0, font=error_sheets.font())
    return np.asarray(image)


def test_sheet_rows_show_image_caption_and_neighbours_in_order():
    data = fixture_data()
    probabilities = centroid_probabilities(data)
    k = 3
    records = analysed(data, probabilities, k)
    digit = max(range(10), key=lambda d: sum(r["true"] == d for r in records))
    mine = [r for r in records if r["true"] == digit]
    assert len(mine) >= 3
    assert [r["confidence"] for r in mine] == sorted((r["confidence"] for r in mine),
                                                     reverse=True)
    sheet = error_sheets.error_sheet(digit, mine, data["x_test"], data["x_train"], k)
    col = error_sheets._columns(k)
    top = error_sheets.PAD + 2 * error_sheets.LINE_H + error_sheets.PAD
    row_h = error_sheets.TILE + error_sheets.PAD
    assert sheet.shape[0] == top + len(mine) * row_h + error_sheets.PAD
    for r, rec in enumerate(mine):
        y = top + r * row_h
        np.testing.assert_array_equal(sheet[y : y + 28, col["image"] : col["image"] + 28],
                                      data["x_test"][rec["index"]])
        first, second = error_sheets.caption(rec)
        assert first == f"#{rec['index']} {digit}->{rec['predicted']}"
        assert second == f"conf {rec['confidence']:.3f}"
        for line, text in enumerate((first, second)):
            glyphs = drawn_text(text)
            y0, x0 = y + 1 + line * error_sheets.LINE_H, col["text"]
            np.testing.assert_array_equal(
                sheet[y0 : y0 + 11, x0 : x0 + glyphs.shape[1]], glyphs, err_msg=text)
        for name, key in (("true", "true_neighbours"), ("pred", "pred_neighbours")):
            for j, t in enumerate(rec[key]):
                x = col[name] + j * (28 + error_sheets.GAP)
                np.testing.assert_array_equal(sheet[y : y + 28, x : x + 28], data["x_train"][t])
        assert (data["y_train"][rec["true_neighbours"]] == digit).all()
        assert (data["y_train"][rec["pred_neighbours"]] == rec["predicted"]).all()


def test_sheet_of_a_digit_without_errors_and_with_one_error():
    x = np.zeros((2, 28, 28), dtype=np.uint8)
    empty = error_sheets.error_sheet(4, [], x, x, 3)
    assert empty.shape[0] == error_sheets.PAD + 2 * error_sheets.LINE_H + error_sheets.PAD
    title = drawn_text("true digit 4: 0 errors")
    p = error_sheets.PAD
    np.testing.assert_array_equal(empty[p : p + 11, p : p + title.shape[1]], title)
    rec = {"index": 1, "true": 4, "predicted": 9, "confidence": 0.5, "p_true": 0.4,
           "true_neighbours": [0, -1, -1], "pred_neighbours": [-1, -1, -1]}
    one = error_sheets.error_sheet(4, [rec], x, x, 3)
    assert one.shape[0] == empty.shape[0] + error_sheets.TILE + 2 * error_sheets.PAD
    col = error_sheets._columns(3)
    y = empty.shape[0]
    # Missing neighbours are light grey tiles, real ones are the images.
    assert (one[y : y + 28, col["true"] : col["true"] + 28] == 0).all()
    assert (one[y : y + 28, col["true"] + 29 : col["true"] + 57] == error_sheets.MISSING).all()
    assert (one[y : y + 28, col["pred"] : col["pred"] + 28] == error_sheets.MISSING).all()


def test_sheets_cover_every_digit_and_are_byte_stable():
    data = fixture_data()
    records = analysed(data, centroid_probabilities(data), 2)
    sheets = error_sheets.error_sheets(records, data["x_test"], data["x_train"], 2)
    assert sorted(sheets) == [f"sheet_{d}" for d in range(10)]

    def png(pixels):
        buf = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buf, format="PNG")
        return buf.getvalue()

    again = error_sheets.error_sheets(records, data["x_test"], data["x_train"], 2)
    assert all(png(sheets[n]) == png(again[n]) for n in sheets)


def test_annotation_font_is_pillows_builtin_bitmap_font():
    # Not FreeType: the same glyphs on every machine, no font files, no network.
    assert type(error_sheets.font()) is ImageFont.ImageFont
    assert error_sheets.font().getbbox("#0123456789->.") == (0, 0, 14 * error_sheets.CHAR_W, 11)


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
    tiles = lambda m: m.reshape(-1, 28, m.shape[1] // 28, 28).transpose(0, 2, 1, 3).reshape(
        -1, 28, 28)
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


# --- params and the stage -------------------------------------------------------------

GOOD = {"per_row": 50, "errors_per_row": 10, "neighbours_k": 3, "top_confident": 20,
        "top_pairs": 10}


def test_default_params_are_valid():
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())["render"]
    assert validate(params) == params


@pytest.mark.parametrize("key,value", [
    ("neighbours_k", 0), ("neighbours_k", 21), ("neighbours_k", True), ("neighbours_k", 2.5),
    ("top_confident", 0), ("top_confident", "20"), ("top_pairs", 0), ("top_pairs", 91),
])
def test_bad_params_are_refused(key, value):
    with pytest.raises(ParamError, match=f"render.{key}"):
        validate(dict(GOOD, **{key: value}))


def test_unknown_and_missing_params_are_refused():
    with pytest.raises(ParamError, match="did you mean 'neighbours_k'"):
        validate({**{k: v for k, v in GOOD.items() if k != "neighbours_k"}, "neighbors_k": 3})
    with pytest.raises(ParamError, match="top_pairs: missing"):
        validate({k: v for k, v in GOOD.items() if k != "top_pairs"})


OUTPUTS = ["reports/errors.html", "reports/errors_summary.json",
           "reports/plots/class_errors.csv", "reports/plots/confusion_pairs.csv",
           "reports/confident_errors.csv", "reports/error_neighbours.csv"]


def stage(cwd: Path) -> subprocess.CompletedProcess:
    env = run_env()
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, "-m", "stages.render_errors"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def stage_dir(tmp_path_factory):
    """The stage run (twice) on the fixture with centroid predictions, outside DVC."""
    cwd = tmp_path_factory.mktemp("render")
    shutil.copy(ROOT / "params.yaml", cwd / "params.yaml")
    (cwd / "data/raw").mkdir(parents=True)
    shutil.copy(FIXTURE, cwd / "data/raw/mnist.npz")
    data = fixture_data()
    save_npz(cwd / "data/predictions.npz", probabilities=centroid_probabilities(data))
    first = stage(cwd)
    assert first.returncode == 0, first.stderr
    files = sorted(p for p in (cwd / "reports").rglob("*") if p.is_file())
    snapshot = {p: p.read_bytes() for p in files}
    second = stage(cwd)
    assert second.returncode == 0, second.stderr
    return cwd, first, snapshot


def test_stage_writes_every_output_byte_reproducibly(stage_dir):
    cwd, first, snapshot = stage_dir
    for name in OUTPUTS:
        assert (cwd / name).is_file(), name
    for d in range(10):
        for name in (f"train_{d}.bmp", f"test_{d}.bmp", f"test_error_{d}.bmp"):
            assert (cwd / "reports/mosaics" / name).is_file()
        for name in (f"test_error_{d}.png", f"sheet_{d}.png"):
            assert Image.open(cwd / "reports/plots/errors" / name).format == "PNG"
    now = sorted(p for p in (cwd / "reports").rglob("*") if p.is_file())
    assert now == sorted(snapshot)
    for path in now:
        assert path.read_bytes() == snapshot[path], f"{path} differs between two runs"
    assert "errors, " in first.stdout and "nearer a training image" in first.stdout


def test_stage_tables_agree_with_each_other(stage_dir):
    cwd, _, _ = stage_dir
    data = fixture_data()
    probabilities = centroid_probabilities(data)
    wrong = int((probabilities.argmax(1) != data["y_test"]).sum())
    summary = json.loads((cwd / "reports/errors_summary.json").read_text())
    assert summary["errors"] == wrong and summary["samples"] == 500
    neighbours = read_csv_rows(cwd / "reports/error_neighbours.csv")
    assert len(neighbours) == wrong
    assert sum(r["nearer"] == "predicted" for r in neighbours) == summary["nearer_predicted_class"]
    for row in neighbours:
        for key in ("true", "pred"):
            ids = [int(i) for i in row[f"{key}_neighbours"].split()]
            assert len(ids) == 3
            label = int(row["true"] if key == "true" else row["predicted"])
            assert (data["y_train"][ids] == label).all()
            dists = [float(v) for v in row[f"{key}_l2"].split()]
            assert dists == sorted(dists)
    classes = read_csv_rows(cwd / "reports/plots/class_errors.csv")
    assert [int(r["digit"]) for r in classes] == list(range(10))
    assert sum(int(r["errors"]) for r in classes) == wrong
    assert sum(int(r["samples"]) for r in classes) == 500
    pairs = read_csv_rows(cwd / "reports/plots/confusion_pairs.csv")
    assert 0 < len(pairs) <= 10
    counts = [int(r["count"]) for r in pairs]
    assert counts == sorted(counts, reverse=True)
    confident = read_csv_rows(cwd / "reports/confident_errors.csv")
    assert len(confident) == min(20, wrong)
    conf = [float(r["confidence"]) for r in confident]
    assert conf == sorted(conf, reverse=True)
    assert conf[0] == max(float(r["confidence"]) for r in neighbours)


def test_stage_refuses_bad_params_before_reading_any_data(tmp_path):
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["render"]["neighbours_k"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = stage(tmp_path)  # no data at all: the param error must come first
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: render.neighbours_k: "), lines
    assert not (tmp_path / "reports").exists()


def test_stage_sheet_heights_match_error_counts(stage_dir):
    cwd, _, _ = stage_dir
    neighbours = read_csv_rows(cwd / "reports/error_neighbours.csv")
    header = error_sheets.PAD + 2 * error_sheets.LINE_H + error_sheets.PAD
    for d in range(10):
        n = sum(int(r["true"]) == d for r in neighbours)
        _, height = Image.open(cwd / f"reports/plots/errors/sheet_{d}.png").size
        assert height == header + n * (error_sheets.TILE + error_sheets.PAD) + (
            error_sheets.PAD if n else 0)
        width, rows = Image.open(cwd / f"reports/mosaics/test_error_{d}.bmp").size
        assert rows == max(1, math.ceil(n / 10)) * 28
