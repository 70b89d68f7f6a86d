"""Stage 5: show the model's mistakes -> mosaics, annotated error sheets, tables, a page.

For every class c, as the original laid them out (white canvas, row-major, dataset order):
  train_{c}.bmp       every training image labelled c, `render.per_row` per row;
  test_{c}.bmp        test images of class c classified correctly, `render.per_row` per row;
  test_error_{c}.bmp  test images of class c misclassified, `render.errors_per_row` per row.
The error mosaics are also written as PNG, which DVC can show as image plots (not BMP).

Then the error analysis, which explains the mistakes rather than only counting them:
  sheet_{c}.png          every error of true class c, most confident first, annotated
                         (index, true->predicted, confidence) beside its
                         `render.neighbours_k` nearest training images of the true and of
                         the predicted class (stages/analysis/neighbours.py);
  confident_errors.csv   the `render.top_confident` surest mistakes;
  error_neighbours.csv   every error with its neighbours and distances;
  errors.html            one self-contained page with all of the above, every error's
                         verdict (label-error, ambiguous, model-error) and its evidence in
                         words, and evaluate's per-class table and confusion pairs.
Everything is derived from the raw images, the predictions and evaluate's tables, so
changing a render param reruns this stage only, never evaluate or train.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from stages.analysis import scoring, tables, verdicts
from stages.analysis.mosaic import mosaics
from stages.data.mnist import check_finite, load_mnist
from stages.data.npz import load_npz
from stages.runtime import params
from stages.runtime.failures import DataError, run
from stages.runtime.outputs import atomic_dir, save_image, write_csv, write_text


def analyse(data: dict[str, np.ndarray], probabilities: np.ndarray, k: int) -> list[dict]:
    """Every error (grouped by true class, most confident first) with its k nearest
    training images of the true and of the predicted class."""
    from stages.analysis.neighbours import nearest_by_class

    records = tables.error_records(data["y_test"], probabilities)
    order = np.array([r["index"] for r in records], dtype=np.int64)
    classes = np.array([[r["true"], r["predicted"]] for r in records],
                       dtype=np.int64).reshape(-1, 2)
    indices, distances = nearest_by_class(data["x_test"][order], data["x_train"],
                                          data["y_train"], classes, k)
    tables.attach_neighbours(records, indices, distances)
    return records


def read_table(path, parse, header: list[str]) -> list[dict]:
    """One of evaluate's CSV tables, checked: its header, and every row parses."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != header:
                raise DataError(f"{path}: header {reader.fieldnames}, expected {header}")
            return parse(list(reader))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, UnicodeDecodeError, csv.Error, KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path}: unreadable table ({err})") from None


def attach_verdicts(records: list[dict], judged: dict[int, dict], names: list[str],
                    source) -> None:
    """Each error's verdict and its evidence in words, from evaluate's misclassified.csv,
    which must list exactly these errors with the same labels."""
    if sorted(judged) != sorted(r["index"] for r in records):
        raise DataError(f"{source}: lists other images than the predictions' errors "
                        "(rerun evaluate)")
    for r in records:
        mine = judged[r["index"]]
        if (mine["true"], mine["predicted"]) != (r["true"], r["predicted"]):
            raise DataError(f"{source}: image {r['index']} has other labels than in the "
                            "predictions (rerun evaluate)")
        r["verdict"], r["evidence"] = mine["verdict"], verdicts.evidence(mine, names)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, what in (("raw", "verified MNIST (.npz)"), ("predictions", "probabilities"),
                       ("classes", "evaluate's per-class table"),
                       ("pairs", "evaluate's confusion pairs"),
                       ("misclassified", "evaluate's errors with their verdicts"),
                       ("mosaics", "BMP folder"),
                       ("error-plots", "PNG folder"), ("confident", "CSV"),
                       ("neighbours", "CSV"), ("page", "HTML")):
        parser.add_argument(f"--{name}", required=True, type=Path, help=what)
    args = parser.parse_args(argv)
    everything = params.load()
    cfg, names = everything["render"], everything["dataset"]["classes"]
    k = cfg["neighbours_k"]

    data = load_mnist(args.raw)
    probabilities = load_npz(args.predictions, ("probabilities",))["probabilities"]
    if probabilities.shape != (len(data["y_test"]), len(names)):
        raise DataError(f"{args.predictions}: shape {probabilities.shape} does not match the "
                        f"{len(data['y_test'])} test images and {len(names)} classes")
    check_finite(probabilities, str(args.predictions))
    rates = read_table(args.classes, scoring.read_class_rows, scoring.CLASS_HEADER)
    pairs = read_table(args.pairs, scoring.read_pair_rows, scoring.PAIR_HEADER)
    if [r["label"] for r in rates] != list(range(len(names))):
        raise DataError(f"{args.classes}: one row per class label 0..{len(names) - 1} expected")
    y_true, y_pred = data["y_test"], probabilities.argmax(axis=1)
    images = mosaics(data, y_pred, cfg, len(names))
    records = analyse(data, probabilities, k)
    judged = read_table(args.misclassified, lambda rows: verdicts.read_misclassified(rows, names),
                        verdicts.MISCLASSIFIED_HEADER)
    attach_verdicts(records, judged, names, args.misclassified)

    from stages.analysis.page import render
    from stages.analysis.sheets import error_sheets

    sheets = error_sheets(records, data["x_test"], data["x_train"], k, names)
    matrix = scoring.confusion(y_true, y_pred, len(names))
    page = render(records, rates, pairs, matrix, data["x_test"], data["x_train"], names, k,
                  cfg["top_confident"], cfg["top_pairs"])
    nearer = sum(r["nearer"] == "predicted" for r in records)

    with atomic_dir(args.mosaics) as tmp:
        for name, pixels in images.items():
            save_image(tmp / f"{name}.bmp", pixels)
    with atomic_dir(args.error_plots) as tmp:
        for c in range(len(names)):
            save_image(tmp / f"test_error_{c}.png", images[f"test_error_{c}"])
        for name, pixels in sheets.items():
            save_image(tmp / f"{name}.png", pixels)
    write_csv(args.confident, tables.CONFIDENT_HEADER,
              tables.confident_rows(records, cfg["top_confident"], names))
    write_csv(args.neighbours, tables.NEIGHBOUR_HEADER, tables.neighbour_rows(records, names))
    write_text(args.page, page)
    print(f"render-errors: {len(images)} mosaics -> {args.mosaics}, error PNGs and annotated "
          f"sheets -> {args.error_plots}")
    print(f"render-errors: {len(records)} errors, {nearer} nearer a training image of the "
          f"predicted class than of the true one; page -> {args.page}")


if __name__ == "__main__":
    run(main)
