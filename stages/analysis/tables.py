"""What the misclassified test images have in common: per-error records and summary tables.

Everything here is plain numpy on the predictions and the neighbour search's results (no
images): the records that order the error sheets and the page, the most confident
mistakes, and the rows of reports/error_neighbours.csv and reports/confident_errors.csv.
Scores (confusion matrix, per-class rates, confusion pairs) are stages/analysis/scoring.py's.
"""

from __future__ import annotations

import numpy as np


def error_order(y_true: np.ndarray, probabilities: np.ndarray) -> np.ndarray:
    """Test indices of the misclassified images, grouped by true class (0..9) and, within a
    class, most confident mistake first (ties: lower index first)."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(y_pred != y_true)
    conf = probabilities[wrong, y_pred[wrong]]
    # lexsort: last key is the primary one.
    return wrong[np.lexsort((wrong, -conf.astype(np.float64), y_true[wrong]))]


def error_records(y_true: np.ndarray, probabilities: np.ndarray) -> list[dict]:
    """One dict per misclassified image, in error_order: index, true, predicted,
    confidence (probability of the predicted class), p_true (probability of the true one)."""
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


def most_confident(records: list[dict], top: int) -> list[dict]:
    """The `top` errors the model was surest of, surest first (ties: lower index first)."""
    ranked = sorted(records, key=lambda r: (-r["confidence"], r["index"]))[:top]
    return [dict(r, rank=rank) for rank, r in enumerate(ranked, start=1)]


def pixel_l2(squared: int) -> float:
    """Euclidean distance of two images with pixels scaled to 0..1 (sqrt of the exact
    squared 0..255 distance, / 255): what the sheets, page and CSV show; -1 if none."""
    return float(np.sqrt(squared) / 255.0) if squared >= 0 else -1.0


def attach_neighbours(records: list[dict], indices: np.ndarray, distances: np.ndarray) -> None:
    """Add each record's neighbours: row i of indices/distances (shape (n, 2, k), slot 0 =
    true class, slot 1 = predicted class, as stages.analysis.neighbours returns them) belongs to
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


def neighbour_rows(records: list[dict], names: list[str]) -> list[list]:
    """Rows of reports/error_neighbours.csv (lists space-separated, nearest first)."""
    return [[r["index"], names[r["true"]], names[r["predicted"]], f"{r['confidence']:.6f}",
             f"{r['p_true']:.6f}", r["nearer"],
             " ".join(str(i) for i in r["true_neighbours"] if i >= 0),
             " ".join(f"{d:.4f}" for d in r["true_l2"] if d >= 0),
             " ".join(str(i) for i in r["pred_neighbours"] if i >= 0),
             " ".join(f"{d:.4f}" for d in r["pred_l2"] if d >= 0)] for r in records]


CONFIDENT_HEADER = ["rank", "index", "true", "predicted", "confidence", "p_true", "verdict"]


def confident_rows(records: list[dict], top: int, names: list[str]) -> list[list]:
    """Rows of reports/confident_errors.csv."""
    return [[r["rank"], r["index"], names[r["true"]], names[r["predicted"]],
             f"{r['confidence']:.6f}", f"{r['p_true']:.6f}", r.get("verdict", "")]
            for r in most_confident(records, top)]
