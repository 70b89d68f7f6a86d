"""Scores of a classifier's test predictions: one definition of each, used by every report.

Plain NumPy on labels and probabilities (no images, no framework): the headline metrics,
the confusion matrix, per-class rates and the most frequent confusions. evaluate writes
them; render-errors shows the same numbers on its page.
"""

from __future__ import annotations

import numpy as np

CLASS_HEADER = ["class", "label", "samples", "errors", "error_rate", "precision", "recall"]
PAIR_HEADER = ["pair", "true", "predicted", "count", "share"]


def confusion(y_true: np.ndarray, y_pred: np.ndarray, classes: int = 10) -> np.ndarray:
    """confusion[t, p] counts images of true class t predicted as p."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * classes + y_pred, minlength=classes * classes).reshape(
        classes, classes)


def cross_entropy(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean -log p(true class), probabilities clipped to [1e-7, 1 - 1e-7] as Keras does."""
    eps = np.float32(1e-7)
    picked = np.clip(probabilities[np.arange(len(y_true)), y_true], eps, 1 - eps)
    return float(-np.log(picked.astype(np.float64)).mean())


def headline(y_true: np.ndarray, probabilities: np.ndarray) -> dict:
    """The numbers `dvc metrics show` lists for the test set: accuracy, errors, loss.
    Everything per class or per pair goes to tables (class_table, confusion_pairs)."""
    wrong = probabilities.argmax(axis=1) != y_true
    return {
        "accuracy": float(1 - wrong.mean()),
        "errors": int(wrong.sum()),
        "loss": cross_entropy(y_true, probabilities),
    }


def class_table(y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> list[dict]:
    """Per true class: name, label, test images, errors, error rate, precision, recall
    (rates are 0 when a class has no images, or nothing was predicted as it)."""
    matrix = confusion(y_true, y_pred, len(names))
    rows = []
    for c, name in enumerate(names):
        samples, hits, predicted = int(matrix[c].sum()), int(matrix[c, c]), int(matrix[:, c].sum())
        rows.append({"class": name, "label": c, "samples": samples, "errors": samples - hits,
                     "error_rate": (samples - hits) / samples if samples else 0.0,
                     "precision": hits / predicted if predicted else 0.0,
                     "recall": hits / samples if samples else 0.0})
    return rows


def confusion_pairs(y_true: np.ndarray, y_pred: np.ndarray, names: list[str]) -> list[dict]:
    """Every (true, predicted) mistake that happened, most frequent first (ties in (true,
    predicted) order); share = the pair's part of all errors."""
    matrix = confusion(y_true, y_pred, len(names))
    np.fill_diagonal(matrix, 0)
    total = int(matrix.sum())
    pairs = sorted((-int(matrix[t, p]), t, p) for t, p in zip(*np.nonzero(matrix)))
    return [{"pair": f"{names[t]}->{names[p]}", "true": int(t), "predicted": int(p),
             "count": -n, "share": -n / total} for n, t, p in pairs]


def class_rows(table: list[dict]) -> list[list]:
    """class_table as CSV rows under CLASS_HEADER."""
    return [[r["class"], r["label"], r["samples"], r["errors"], f"{r['error_rate']:.6f}",
             f"{r['precision']:.6f}", f"{r['recall']:.6f}"] for r in table]


def pair_rows(pairs: list[dict]) -> list[list]:
    """confusion_pairs as CSV rows under PAIR_HEADER."""
    return [[p["pair"], p["true"], p["predicted"], p["count"], f"{p['share']:.6f}"]
            for p in pairs]


def read_class_rows(rows: list[dict[str, str]]) -> list[dict]:
    """class_rows read back from CSV (csv.DictReader's strings) -> class_table's dicts."""
    return [{"class": r["class"], "label": int(r["label"]), "samples": int(r["samples"]),
             "errors": int(r["errors"]), "error_rate": float(r["error_rate"]),
             "precision": float(r["precision"]), "recall": float(r["recall"])} for r in rows]


def read_pair_rows(rows: list[dict[str, str]]) -> list[dict]:
    """pair_rows read back from CSV -> confusion_pairs' dicts."""
    return [{"pair": r["pair"], "true": int(r["true"]), "predicted": int(r["predicted"]),
             "count": int(r["count"]), "share": float(r["share"])} for r in rows]
