"""stages/analysis/tables.py: per-error records, the most confident mistakes, and the rows of
reports/error_neighbours.csv and reports/confident_errors.csv (class names as written)."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from stages.analysis import tables as error_tables
from stages.runtime.outputs import write_csv
from tests.digits import NAMED_CLASSES, probabilities_for

DIGITS = [str(c) for c in range(10)]


def test_error_records_are_grouped_by_true_class_most_confident_first():
    y, p = probabilities_for([(3, 5, 0.6), (1, 7, 0.7), (3, 3, 0.9), (3, 8, 0.95),
                              (1, 4, 0.99), (3, 5, 0.6), (0, 0, 0.99), (9, 4, 0.51)])
    records = error_tables.error_records(y, p)
    assert [(r["index"], r["true"], r["predicted"]) for r in records] == [
        (4, 1, 4), (1, 1, 7),           # class 1: 0.99 before 0.7
        (3, 3, 8), (0, 3, 5), (5, 3, 5),  # class 3: 0.95, then the 0.6 tie by index
        (7, 9, 4),
    ]
    assert records[0]["confidence"] == pytest.approx(0.99)
    assert records[0]["p_true"] == pytest.approx(0.01 / 9, rel=1e-3)
    assert np.array_equal(error_tables.error_order(y, p), [r["index"] for r in records])


def test_no_errors_no_records():
    y, p = probabilities_for([(2, 2, 0.9), (5, 5, 0.4)])
    assert error_tables.error_records(y, p) == []


def test_most_confident_ranks_across_classes():
    y, p = probabilities_for([(3, 5, 0.6), (1, 7, 0.97), (2, 8, 0.99), (5, 6, 0.97)])
    records = error_tables.error_records(y, p)
    top = error_tables.most_confident(records, 3)
    assert [(r["rank"], r["index"]) for r in top] == [(1, 2), (2, 1), (3, 3)]
    assert len(error_tables.most_confident(records, 10)) == 4
    rows = error_tables.confident_rows(records, 2, DIGITS)
    assert rows[0][:4] == [1, 2, "2", "8"] and rows[0][4] == "0.990000"
    assert len(rows) == 2


def test_pixel_l2_is_the_scaled_euclidean_distance():
    assert error_tables.pixel_l2(255 * 255 * 4) == pytest.approx(2.0)
    assert error_tables.pixel_l2(0) == 0.0
    assert error_tables.pixel_l2(-1) == -1.0  # no such neighbour


def records_with_neighbours() -> list[dict]:
    y, p = probabilities_for([(3, 5, 0.6), (1, 7, 0.95), (2, 2, 0.9), (2, 2, 0.9),
                              (4, 6, 0.7)])
    records = error_tables.error_records(y, p)  # class 1 first, then 3, then 4
    idx = np.array([[[10, 11], [20, -1]], [[30, 31], [40, 41]], [[-1, -1], [50, 51]]])
    dist = np.array([[[100, 400], [900, -1]], [[2500, 2500], [2500, 3600]],
                     [[-1, -1], [10, 20]]])
    error_tables.attach_neighbours(records, idx, dist)
    return records


def test_attach_neighbours_says_which_class_holds_the_nearest_image():
    records = records_with_neighbours()
    assert [r["nearer"] for r in records] == ["true", "tie", "unknown"]
    assert records[0]["true_neighbours"] == [10, 11] and records[0]["pred_neighbours"] == [20, -1]
    assert records[0]["true_l2"] == pytest.approx([10 / 255, 20 / 255])
    assert records[0]["pred_l2"] == pytest.approx([30 / 255, -1.0])


def test_attach_neighbours_needs_one_row_per_record():
    records = records_with_neighbours()
    with pytest.raises(ValueError):
        error_tables.attach_neighbours(records, np.zeros((2, 2, 2), int), np.zeros((2, 2, 2)))


def test_neighbour_rows_leave_missing_neighbours_out():
    rows = error_tables.neighbour_rows(records_with_neighbours(), DIGITS)
    assert rows[0][:6] == [1, "1", "7", "0.950000", f"{0.05 / 9:.6f}", "true"]
    assert rows[0][6:] == ["10 11", "0.0392 0.0784", "20", "0.1176"]  # -1 left out
    assert rows[2][6:] == ["", "", "50 51", f"{np.sqrt(10) / 255:.4f} {np.sqrt(20) / 255:.4f}"]
    assert all(len(row) == len(error_tables.NEIGHBOUR_HEADER) for row in rows)


def read_back(path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_csv_rows_carry_class_names_as_written(tmp_path):
    """A comma inside a name is quoted: the CSV reads back to the very name."""
    records = records_with_neighbours()
    write_csv(tmp_path / "n.csv", error_tables.NEIGHBOUR_HEADER,
              error_tables.neighbour_rows(records, NAMED_CLASSES))
    write_csv(tmp_path / "c.csv", error_tables.CONFIDENT_HEADER,
              error_tables.confident_rows(records, 10, NAMED_CLASSES))
    neighbours = read_back(tmp_path / "n.csv")
    assert [(r["true"], r["predicted"]) for r in neighbours] == [
        (NAMED_CLASSES[r["true"]], NAMED_CLASSES[r["predicted"]]) for r in records]
    assert NAMED_CLASSES[4] in {r["true"] for r in neighbours}  # "Coat, long"
    confident = read_back(tmp_path / "c.csv")
    by_index = {r["index"]: r for r in records}
    for row in confident:
        rec = by_index[int(row["index"])]
        assert (row["true"], row["predicted"]) == (NAMED_CLASSES[rec["true"]],
                                                   NAMED_CLASSES[rec["predicted"]])
    assert [int(r["rank"]) for r in confident] == [1, 2, 3]
