"""stages/analysis/scoring.py: the one definition of every score the reports show.

Expected values are computed here from the definitions (counting by hand over the
examples), never copied from a run.
"""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from stages.analysis import scoring
from stages.runtime.outputs import write_csv
from tests.digits import NAMED_CLASSES, probabilities_for

DIGITS = [str(c) for c in range(10)]
# A small example: (true, predicted) per test image. Class 2 is never predicted, class 5
# is predicted but never true, classes 6..9 do not occur at all.
CASES = [(0, 0), (0, 0), (0, 1), (1, 1), (1, 1), (1, 0), (1, 5), (2, 1), (2, 3), (3, 3),
         (4, 5), (4, 5), (4, 4)]
Y_TRUE = np.array([t for t, _ in CASES])
Y_PRED = np.array([p for _, p in CASES])


def test_confusion_counts_true_rows_and_predicted_columns():
    matrix = scoring.confusion(Y_TRUE, Y_PRED)
    assert matrix.shape == (10, 10) and matrix.sum() == len(CASES)
    for t in range(10):
        for p in range(10):
            assert matrix[t, p] == CASES.count((t, p)), (t, p)


def test_confusion_of_fewer_classes():
    assert scoring.confusion(np.array([0, 1, 1]), np.array([1, 1, 0]), classes=2).tolist() == \
        [[0, 1], [1, 1]]


# --- headline --------------------------------------------------------------------------


def test_headline_accuracy_errors_and_loss_from_their_definitions():
    y, probs = probabilities_for([(0, 0, 0.9), (1, 1, 0.6), (2, 7, 0.8), (3, 3, 0.99),
                                  (4, 9, 0.5)])
    got = scoring.headline(y, probs)
    wrong = sum(int(np.argmax(row)) != t for row, t in zip(probs, y))
    assert got["errors"] == wrong == 2
    assert got["accuracy"] == pytest.approx(1 - wrong / len(y))
    loss = sum(-math.log(float(row[t])) for row, t in zip(probs, y)) / len(y)
    assert got["loss"] == pytest.approx(loss, rel=1e-6)
    assert set(got) == {"accuracy", "errors", "loss"}


def test_a_perfect_model_has_accuracy_1_and_no_errors():
    y = np.arange(10) % 10
    got = scoring.headline(y, np.eye(10, dtype=np.float32)[y])
    assert got["accuracy"] == 1.0 and got["errors"] == 0
    # p = 1 is clipped to 1 - 1e-7 in float32, as Keras does: a tiny positive loss
    assert got["loss"] == pytest.approx(-math.log(float(np.float32(1) - np.float32(1e-7))))
    assert got["loss"] > 0


def test_cross_entropy_clips_a_zero_probability():
    probs = np.zeros((1, 10), np.float32)
    probs[0, 3] = 1.0
    assert scoring.cross_entropy(np.array([0]), probs) == pytest.approx(-math.log(1e-7),
                                                                         rel=1e-5)


def test_cross_entropy_matches_keras():
    from stages.frameworks.keras.env import keras

    rng = np.random.default_rng(1)
    probs = rng.random((50, 10)).astype(np.float32)
    probs /= probs.sum(1, keepdims=True)
    y = rng.integers(0, 10, 50)
    expected = float(keras.losses.SparseCategoricalCrossentropy()(y, probs))
    assert scoring.cross_entropy(y, probs) == pytest.approx(expected, rel=1e-5)


# --- per class -------------------------------------------------------------------------


def by_definition(c: int) -> dict:
    """Class c's row, counted over CASES from the definitions."""
    samples = sum(t == c for t, _ in CASES)
    predicted = sum(p == c for _, p in CASES)
    hits = sum(t == p == c for t, p in CASES)
    return {"samples": samples, "errors": samples - hits,
            "error_rate": (samples - hits) / samples if samples else 0.0,
            "precision": hits / predicted if predicted else 0.0,
            "recall": hits / samples if samples else 0.0}


def test_class_table_from_the_definitions():
    table = scoring.class_table(Y_TRUE, Y_PRED, NAMED_CLASSES)
    assert [r["label"] for r in table] == list(range(10))
    assert [r["class"] for r in table] == NAMED_CLASSES
    for c, row in enumerate(table):
        assert {k: row[k] for k in by_definition(c)} == pytest.approx(by_definition(c)), c
    # Spot checks of the example, by hand: class 1 is 2 of 4 right, and 2 of the 4 images
    # predicted as 1 are 1s; class 5 is predicted 3 times, never rightly.
    assert (table[1]["recall"], table[1]["precision"]) == (0.5, 0.5)
    assert (table[5]["samples"], table[5]["precision"]) == (0, 0.0)
    assert table[2]["error_rate"] == 1.0 and table[2]["precision"] == 0.0
    assert sum(r["errors"] for r in table) == sum(t != p for t, p in CASES)


# --- confusion pairs -------------------------------------------------------------------


def test_confusion_pairs_most_frequent_first_ties_in_true_predicted_order():
    pairs = scoring.confusion_pairs(Y_TRUE, Y_PRED, DIGITS)
    mistakes = [(t, p) for t, p in CASES if t != p]
    assert [(r["true"], r["predicted"], r["count"]) for r in pairs] == [
        (4, 5, 2),                                      # the only pair seen twice
        (0, 1, 1), (1, 0, 1), (1, 5, 1), (2, 1, 1), (2, 3, 1),  # ties: (true, predicted)
    ]
    for r in pairs:
        assert r["count"] == mistakes.count((r["true"], r["predicted"]))
        assert r["share"] == pytest.approx(r["count"] / len(mistakes))
        assert r["pair"] == f"{r['true']}->{r['predicted']}"
    assert sum(r["share"] for r in pairs) == pytest.approx(1.0)


def test_confusion_pairs_are_named_by_class_and_empty_without_errors():
    pairs = scoring.confusion_pairs(Y_TRUE, Y_PRED, NAMED_CLASSES)
    assert pairs[0]["pair"] == f"{NAMED_CLASSES[4]}->{NAMED_CLASSES[5]}"
    assert scoring.confusion_pairs(Y_TRUE, Y_TRUE, NAMED_CLASSES) == []


# --- CSV rows ----------------------------------------------------------------------------


def written(tmp_path, header, rows) -> list[dict[str, str]]:
    write_csv(tmp_path / "t.csv", header, rows)
    with open(tmp_path / "t.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_class_rows_round_trip_through_csv_with_any_class_names(tmp_path):
    table = scoring.class_table(Y_TRUE, Y_PRED, NAMED_CLASSES)
    rows = written(tmp_path, scoring.CLASS_HEADER, scoring.class_rows(table))
    assert [r["class"] for r in rows] == NAMED_CLASSES  # "Coat, long" is one field
    back = scoring.read_class_rows(rows)
    assert len(back) == len(table)
    for got, want in zip(back, table):
        assert got == pytest.approx(want, abs=5e-7)  # rates are written with 6 decimals


def test_pair_rows_round_trip_through_csv(tmp_path):
    pairs = scoring.confusion_pairs(Y_TRUE, Y_PRED, NAMED_CLASSES)
    rows = written(tmp_path, scoring.PAIR_HEADER, scoring.pair_rows(pairs))
    assert rows[0]["pair"] == f"{NAMED_CLASSES[4]}->{NAMED_CLASSES[5]}"  # holds a comma
    back = scoring.read_pair_rows(rows)
    assert [r["pair"] for r in back] == [p["pair"] for p in pairs]
    for got, want in zip(back, pairs):
        assert got == pytest.approx(want, abs=5e-7)


def test_read_class_rows_refuses_a_non_number():
    rows = [dict(zip(scoring.CLASS_HEADER, ["0", "zero", "1", "0", "0", "0", "0"]))]
    with pytest.raises(ValueError):
        scoring.read_class_rows(rows)
