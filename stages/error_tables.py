"""What the misclassified test images have in common: per-error records and summary tables.

Everything here is plain numpy on the predictions (no images): the records that order the
error sheets, per-class error rates, the most frequent confusion pairs, the most confident
mistakes, and the numbers for reports/errors_summary.json.
"""

from __future__ import annotations

import numpy as np

CLASSES = 10


def confusion(y_true: np.ndarray, y_pred: np.ndarray, classes: int = CLASSES) -> np.ndarray:
    """confusion[t, p] counts test images of true digit t predicted as p."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    return np.bincount(y_true * classes + y_pred, minlength=classes * classes).reshape(
        classes, classes
    )


def error_order(y_true: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Test indices of the misclassified images, grouped by true digit (0..9) and, within a
    digit, most confident mistake first (ties: lower index first)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(y_pred != y_true)
    conf = probabilities[wrong, y_pred[wrong]]
    # lexsort: last key is the primary one.
    return wrong[np.lexsort((wrong, -conf.astype(np.float64), y_true[wrong]))]


def error_records(y_true: np.ndarray, probabilities: np.ndarray) -> list[dict]:
    """One dict per misclassified image, in error_order: index, true, predicted,
    confidence (probability of the predicted digit), p_true (probability of the true one)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = probabilities.argmax(axis=1)
    return [
        {
            "index": int(i),
            "true": int(y_true[i]),
            "predicted": int(y_pred[i]),
            "confidence": float(probabilities[i, y_pred[i]]),
            "p_true": float(probabilities[i, y_true[i]]),
        }
        for i in error_order(y_true, probabilities)
    ]


def class_error_rates(y_true: np.ndarray, y_pred: np.ndarray) -> list[dict]:
    """Per true digit: test images, errors, error rate (0 when the digit has no images)."""
    matrix = confusion(y_true, y_pred)
    rows = []
    for d in range(CLASSES):
        samples = int(matrix[d].sum())
        errors = samples - int(matrix[d, d])
        rows.append({"digit": d, "samples": samples, "errors": errors,
                     "error_rate": errors / samples if samples else 0.0})
    return rows


def confusion_pairs(y_true: np.ndarray, y_pred: np.ndarray, top: int) -> list[dict]:
    """The `top` most frequent (true, predicted) mistakes; ties in (true, predicted) order.
    share = the pair's part of all errors."""
    matrix = confusion(y_true, y_pred)
    np.fill_diagonal(matrix, 0)
    total = int(matrix.sum())
    pairs = [(int(matrix[t, p]), t, p) for t in range(CLASSES) for p in range(CLASSES)
             if matrix[t, p] > 0]
    pairs.sort(key=lambda x: (-x[0], x[1], x[2]))
    return [{"pair": f"{t}->{p}", "true": t, "predicted": p, "count": n,
             "share": n / total} for n, t, p in pairs[:top]]


def most_confident(records: list[dict], top: int) -> list[dict]:
    """The `top` errors the model was surest of, surest first (ties: lower index first)."""
    ranked = sorted(records, key=lambda r: (-r["confidence"], r["index"]))[:top]
    return [dict(r, rank=rank) for rank, r in enumerate(ranked, start=1)]


def summary(y_true: np.ndarray, y_pred: np.ndarray, records: list[dict],
            nearer_predicted: int) -> dict:
    """The numbers `dvc metrics` shows for the error analysis (all numeric, stable keys)."""
    rates = class_error_rates(y_true, y_pred)
    samples = len(y_true)
    errors = len(records)
    pairs = confusion_pairs(y_true, y_pred, 1)
    confidences = [r["confidence"] for r in records]
    return {
        "samples": samples,
        "errors": errors,
        "error_rate": errors / samples if samples else 0.0,
        "per_class": {str(r["digit"]): {"errors": r["errors"], "error_rate": r["error_rate"]}
                      for r in rates},
        "top_confusion": ({"true": pairs[0]["true"], "predicted": pairs[0]["predicted"],
                           "count": pairs[0]["count"]} if pairs
                          else {"true": -1, "predicted": -1, "count": 0}),
        "mean_error_confidence": float(np.mean(confidences)) if confidences else 0.0,
        "confident_errors": sum(c >= 0.9 for c in confidences),
        # Errors whose nearest training image of the predicted digit is nearer than the
        # nearest one of the true digit: the image looks like what the model said.
        "nearer_predicted_class": nearer_predicted,
    }


def pixel_l2(squared: int) -> float:
    """Euclidean distance of two images with pixels scaled to 0..1 (sqrt of the exact
    squared 0..255 distance, / 255): what the sheets, page and CSV show; -1 if none."""
    return float(np.sqrt(squared) / 255.0) if squared >= 0 else -1.0


def attach_neighbours(records: list[dict], indices: np.ndarray, distances: np.ndarray) -> None:
    """Add each record's neighbours: row i of indices/distances (shape (n, 2, k), slot 0 =
    true digit, slot 1 = predicted digit, as stages.neighbours returns them) belongs to
    records[i]. 'nearer' says which class holds the single nearest training image."""
    for rec, idx, dist in zip(records, indices.tolist(), distances.tolist(), strict=True):
        rec["true_neighbours"], rec["pred_neighbours"] = idx
        rec["true_l2"] = [pixel_l2(d) for d in dist[0]]
        rec["pred_l2"] = [pixel_l2(d) for d in dist[1]]
        t, p = dist[0][0], dist[1][0]
        if t < 0 or p < 0:
            rec["nearer"] = "unknown"
        else:
            rec["nearer"] = "predicted" if p < t else "true" if t < p else "tie"


NEIGHBOUR_HEADER = ["index", "true", "predicted", "confidence", "p_true", "nearer",
                    "true_neighbours", "true_l2", "pred_neighbours", "pred_l2"]


def neighbour_rows(records: list[dict]) -> list[list]:
    """Rows of reports/error_neighbours.csv (lists space-separated, nearest first)."""
    return [[r["index"], r["true"], r["predicted"], f"{r['confidence']:.6f}",
             f"{r['p_true']:.6f}", r["nearer"],
             " ".join(str(i) for i in r["true_neighbours"] if i >= 0),
             " ".join(f"{d:.4f}" for d in r["true_l2"] if d >= 0),
             " ".join(str(i) for i in r["pred_neighbours"] if i >= 0),
             " ".join(f"{d:.4f}" for d in r["pred_l2"] if d >= 0)] for r in records]


CONFIDENT_HEADER = ["rank", "index", "true", "predicted", "confidence", "p_true"]


def confident_rows(records: list[dict], top: int) -> list[list]:
    """Rows of reports/confident_errors.csv."""
    return [[r["rank"], r["index"], r["true"], r["predicted"], f"{r['confidence']:.6f}",
             f"{r['p_true']:.6f}"] for r in most_confident(records, top)]


CLASS_HEADER = ["digit", "samples", "errors", "error_rate"]
PAIR_HEADER = ["pair", "true", "predicted", "count", "share"]


def class_rows(y_true: np.ndarray, y_pred: np.ndarray) -> list[list]:
    return [[r["digit"], r["samples"], r["errors"], f"{r['error_rate']:.6f}"]
            for r in class_error_rates(y_true, y_pred)]


def pair_rows(y_true: np.ndarray, y_pred: np.ndarray, top: int) -> list[list]:
    return [[r["pair"], r["true"], r["predicted"], r["count"], f"{r['share']:.6f}"]
            for r in confusion_pairs(y_true, y_pred, top)]
