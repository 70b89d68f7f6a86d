"""Stage 4: score the model on the test set, once -> reports/metrics.json and friends.

Writes the metrics DVC diffs (loss, accuracy, errors, per-class precision and recall), the
per-image predictions for the confusion matrix, the list of misclassified images, and
prints the original script's "N samples, M wrong" line (and, behind a param, its full
listing of every error with its console drawing).
"""

from __future__ import annotations

import numpy as np

from stages.common import (
    PROCESSED_KEYS,
    check_keys,
    draw,
    load_npz,
    load_params,
    param_bool,
    param_int,
    round_floats,
    run,
    validate_processed,
    save_npz,
    write_csv,
    write_json,
)

SECTION = "evaluate"
DATA = "data/processed/mnist.npz"
MODEL = "data/model/model.keras"
METRICS = "reports/metrics.json"
CONFUSION = "reports/plots/confusion.csv"
MISCLASSIFIED = "reports/misclassified.csv"
PREDICTIONS = "data/predictions.npz"


def validate(params: dict) -> dict:
    check_keys(params, SECTION, {"list_errors", "batch_size"})
    return {
        "list_errors": param_bool(params, SECTION, "list_errors"),
        "batch_size": param_int(params, SECTION, "batch_size", 1, 65_536),
    }


def confusion(y_true: np.ndarray, y_pred: np.ndarray, classes: int = 10) -> np.ndarray:
    """confusion[t, p] counts images of true digit t predicted as p."""
    return np.bincount(y_true.astype(np.int64) * classes + y_pred,
                       minlength=classes * classes).reshape(classes, classes)


def metrics(y_true: np.ndarray, probabilities: np.ndarray, loss: float) -> dict:
    y_pred = probabilities.argmax(axis=1)
    matrix = confusion(y_true, y_pred)
    hits = np.diag(matrix)
    per_class = {}
    for d in range(10):
        predicted, actual = matrix[:, d].sum(), matrix[d].sum()
        per_class[str(d)] = {
            "precision": float(hits[d] / predicted) if predicted else 0.0,
            "recall": float(hits[d] / actual) if actual else 0.0,
            "errors": int(actual - hits[d]),
        }
    return round_floats({
        "loss": float(loss),
        "accuracy": float(hits.sum() / len(y_true)),
        "errors": int(len(y_true) - hits.sum()),
        "samples": int(len(y_true)),
        "per_class": per_class,
    })


def misclassified(y_true: np.ndarray, probabilities: np.ndarray) -> list[tuple]:
    """(test index, true, predicted, confidence in the prediction), by index."""
    y_pred = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(y_pred != y_true)
    return [(int(i), int(y_true[i]), int(y_pred[i]), f"{probabilities[i, y_pred[i]]:.6f}")
            for i in wrong]


def listing(rows: list[tuple], images: np.ndarray) -> str:
    """The original's console listing: index, predicted, true, then the drawing."""
    return "\n".join(
        f"index {i}: predicted {pred}, true {true}\n{draw(images[i] * 255)}"
        for i, true, pred, _ in rows
    )


def cross_entropy(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    # Computed from the predictions themselves: one pass over the test set, not two.
    eps = np.float32(1e-7)  # Keras clips probabilities the same way
    picked = np.clip(probabilities[np.arange(len(y_true)), y_true], eps, 1 - eps)
    return float(-np.log(picked.astype(np.float64)).mean())


def main() -> None:
    cfg = validate(load_params(SECTION))
    train = load_params("train")
    intra = param_int(train, "train", "intra_op_threads", 1, 1024)
    inter = param_int(train, "train", "inter_op_threads", 1, 1024)
    data = load_npz(DATA, PROCESSED_KEYS, only=("x_test", "y_test"))
    validate_processed(data, DATA)
    from stages.models import configure_tensorflow  # first: it quiets TensorFlow's logs

    configure_tensorflow(0, intra, inter)
    import keras

    model = keras.models.load_model(MODEL)
    x, y = data["x_test"], data["y_test"].astype(np.int64)
    # Plain calls, not predict(): no tf.data pipeline to build for 10 batches.
    probabilities = np.concatenate([
        model(x[start:start + cfg["batch_size"]], training=False).numpy()
        for start in range(0, len(x), cfg["batch_size"])])
    result = metrics(y, probabilities, cross_entropy(y, probabilities))
    rows = misclassified(y, probabilities)

    if cfg["list_errors"]:
        print(listing(rows, x))
    print(f"test loss {result['loss']:.4f}, test accuracy {result['accuracy']:.4f}")
    print(f"{result['samples']} samples, {result['errors']} wrong")

    write_json(METRICS, result)
    write_csv(CONFUSION, ["actual", "predicted"], zip(y.tolist(), probabilities.argmax(1).tolist()))
    write_csv(MISCLASSIFIED, ["index", "true", "predicted", "confidence"], rows)
    save_npz(PREDICTIONS, probabilities=probabilities.astype(np.float32))


if __name__ == "__main__":
    run(main)
