"""Stage 5: show the model's mistakes -> reports/mosaics/, reports/plots/errors/, tables, page.

For every digit d, as the original laid them out (white canvas, row-major, dataset order):
  train_{d}.bmp       every training image labelled d, `render.per_row` per row;
  test_{d}.bmp        test images of digit d classified correctly, `render.per_row` per row;
  test_error_{d}.bmp  test images of digit d misclassified, `render.errors_per_row` per row.
The error mosaics are also written as PNG, which DVC can show as image plots (not BMP).

Then the error analysis, which explains the mistakes rather than only counting them:
  reports/plots/errors/sheet_{d}.png  every error of true digit d, most confident first,
      annotated (index, true->predicted, confidence) beside its `render.neighbours_k`
      nearest training images of the true and of the predicted digit (stages.neighbours);
  reports/errors_summary.json         error counts and rates (dvc metrics);
  reports/plots/class_errors.csv      error rate per true digit (dvc plots);
  reports/plots/confusion_pairs.csv   the `render.top_pairs` most frequent confusions;
  reports/confident_errors.csv        the `render.top_confident` surest mistakes;
  reports/error_neighbours.csv        every error with its neighbours and distances;
  reports/errors.html                 one self-contained page with all of the above.
Everything is derived from the raw data and data/predictions.npz, so changing a render
param reruns this stage only, never evaluate or train.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stages import error_tables as tables
from stages.common import (
    DataError,
    atomic_dir,
    check_finite,
    check_keys,
    load_mnist,
    load_npz,
    load_params,
    param_int,
    round_floats,
    run,
    save_image,
    tile,
    write_csv,
    write_json,
    write_text,
)

SECTION = "render"
RAW = "data/raw/mnist.npz"
PREDICTIONS = "data/predictions.npz"
MOSAICS = Path("reports/mosaics")
ERROR_PLOTS = Path("reports/plots/errors")
SUMMARY = Path("reports/errors_summary.json")
CLASS_ERRORS = Path("reports/plots/class_errors.csv")
CONFUSION_PAIRS = Path("reports/plots/confusion_pairs.csv")
CONFIDENT = Path("reports/confident_errors.csv")
NEIGHBOURS = Path("reports/error_neighbours.csv")
PAGE = Path("reports/errors.html")


def validate(params: dict) -> dict:
    check_keys(params, SECTION, {"per_row", "errors_per_row", "neighbours_k", "top_confident",
                                 "top_pairs"})
    return {
        "per_row": param_int(params, SECTION, "per_row", 1, 1000),
        "errors_per_row": param_int(params, SECTION, "errors_per_row", 1, 1000),
        "neighbours_k": param_int(params, SECTION, "neighbours_k", 1, 20),
        "top_confident": param_int(params, SECTION, "top_confident", 1, 10_000),
        "top_pairs": param_int(params, SECTION, "top_pairs", 1, 90),
    }


def mosaics(data: dict[str, np.ndarray], predicted: np.ndarray, cfg: dict) -> dict:
    """Every mosaic by file name, as uint8 pixel arrays."""
    x_train, y_train = data["x_train"], data["y_train"]
    x_test, y_test = data["x_test"], data["y_test"]
    right = predicted == y_test
    out = {}
    for d in range(10):
        out[f"train_{d}"] = tile(x_train[y_train == d], cfg["per_row"])
        out[f"test_{d}"] = tile(x_test[(y_test == d) & right], cfg["per_row"])
        out[f"test_error_{d}"] = tile(x_test[(y_test == d) & ~right], cfg["errors_per_row"])
    return out


def analyse(data: dict[str, np.ndarray], probabilities: np.ndarray, k: int) -> list[dict]:
    """Every error (grouped by true digit, most confident first) with its k nearest
    training images of the true and of the predicted digit."""
    from stages.neighbours import nearest_by_class

    records = tables.error_records(data["y_test"], probabilities)
    order = np.array([r["index"] for r in records], dtype=np.int64)
    classes = np.array([[r["true"], r["predicted"]] for r in records],
                       dtype=np.int64).reshape(-1, 2)
    indices, distances = nearest_by_class(data["x_test"][order], data["x_train"],
                                          data["y_train"], classes, k)
    tables.attach_neighbours(records, indices, distances)
    return records


def main() -> None:
    cfg = validate(load_params(SECTION))
    data = load_mnist(RAW)
    probabilities = load_npz(PREDICTIONS, ("probabilities",))["probabilities"]
    if probabilities.shape != (len(data["y_test"]), 10):
        raise DataError(f"{PREDICTIONS}: shape {probabilities.shape} does not match the test set")
    check_finite(probabilities, PREDICTIONS)
    y_true, y_pred = data["y_test"], probabilities.argmax(axis=1)
    images = mosaics(data, y_pred, cfg)
    records = analyse(data, probabilities, cfg["neighbours_k"])

    from stages.error_sheets import error_sheets
    from stages.errors_page import render

    sheets = error_sheets(records, data["x_test"], data["x_train"], cfg["neighbours_k"])
    page = render(records, y_true, y_pred, data["x_test"], data["x_train"],
                  cfg["neighbours_k"], cfg["top_confident"], cfg["top_pairs"])
    nearer = sum(r["nearer"] == "predicted" for r in records)

    with atomic_dir(MOSAICS) as tmp:
        for name, pixels in images.items():
            save_image(tmp / f"{name}.bmp", pixels)
    with atomic_dir(ERROR_PLOTS) as tmp:
        for d in range(10):
            save_image(tmp / f"test_error_{d}.png", images[f"test_error_{d}"])
        for name, pixels in sheets.items():
            save_image(tmp / f"{name}.png", pixels)
    write_json(SUMMARY, round_floats(tables.summary(y_true, y_pred, records, nearer)))
    write_csv(CLASS_ERRORS, tables.CLASS_HEADER, tables.class_rows(y_true, y_pred))
    write_csv(CONFUSION_PAIRS, tables.PAIR_HEADER,
              tables.pair_rows(y_true, y_pred, cfg["top_pairs"]))
    write_csv(CONFIDENT, tables.CONFIDENT_HEADER,
              tables.confident_rows(records, cfg["top_confident"]))
    write_csv(NEIGHBOURS, tables.NEIGHBOUR_HEADER, tables.neighbour_rows(records))
    write_text(PAGE, page)
    print(f"render-errors: {len(images)} mosaics -> {MOSAICS}, error PNGs and annotated "
          f"sheets -> {ERROR_PLOTS}")
    print(f"render-errors: {len(records)} errors, {nearer} nearer a training image of the "
          f"predicted digit than of the true one; page -> {PAGE}")


if __name__ == "__main__":
    run(main)
