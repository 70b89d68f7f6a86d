"""Stage 4: score the model on the test set, once -> metrics, tables and predictions.

Writes the headline metrics DVC shows and diffs (accuracy, errors, loss, and the errors
per verdict), the per-class table (error rate, precision, recall), every confusion pair,
the per-image predictions for the confusion matrix, the list of misclassified images with
each one's verdict and evidence, and the probabilities the stages after it read. Prints the
original script's "N samples, M wrong" line (and, behind a param, its full listing of every
error with its console drawing).

The verdicts say whose mistake each error is (stages/analysis/verdicts.py): the label's
(label-error), nobody's for sure (ambiguous), or the model's (model-error). They need the
model's probabilities on train's validation split (to calibrate them) and the training
images (the neighbours), so this stage reads both.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from stages import frameworks
from stages.analysis import scoring, verdicts
from stages.data.console import draw
from stages.data.mnist import load_processed, validation_split
from stages.runtime import params
from stages.runtime.failures import run
from stages.runtime.outputs import round_floats, save_npz, write_csv, write_json


def listing(rows: list[tuple], images: np.ndarray, names: list[str]) -> str:
    """The original's console listing: index, predicted, true, then the drawing."""
    return "\n".join(
        f"index {i}: predicted {names[pred]}, true {names[true]}\n{draw(images[i] * 255)}"
        for i, true, pred, _ in rows
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="normalize's scaled arrays (.npz)")
    parser.add_argument("--model-dir", required=True, type=Path, help="train's model")
    parser.add_argument("--predictions", required=True, help="probabilities N×10 (.npz)")
    parser.add_argument("--metrics", required=True, help="headline metrics (.json)")
    parser.add_argument("--confusion", required=True, help="actual,predicted per image (.csv)")
    parser.add_argument("--classes", required=True, help="per-class table (.csv)")
    parser.add_argument("--pairs", required=True, help="confusion pairs (.csv)")
    parser.add_argument("--misclassified", required=True, help="misclassified images (.csv)")
    args = parser.parse_args(argv)
    everything = params.load()
    cfg, train = everything["evaluate"], everything["train"]
    names = everything["dataset"]["classes"]
    data = load_processed(args.data)

    x, y = data["x_test"], data["y_test"].astype(np.int64)
    _, val_idx = validation_split(len(data["y_train"]), train.val_fraction, train.seed)
    # Whichever framework trained it: the model folder says which (stages/frameworks/__init__.py).
    model = frameworks.predictor(args.model_dir, train.intra_op_threads,
                                 train.inter_op_threads)
    probabilities = model(x, cfg["batch_size"])
    val_probabilities = model(data["x_train"][val_idx], cfg["batch_size"]) if len(val_idx) else None
    y_pred = probabilities.argmax(axis=1)
    rows = verdicts.misclassified(y, probabilities)
    records, temperature = verdicts.judge_errors(data, probabilities, val_probabilities,
                                                 data["y_train"][val_idx],
                                                 cfg["neighbours"])
    result = round_floats(scoring.headline(y, probabilities) | verdicts.counts(records)
                          | {"temperature": temperature})

    if cfg["list_errors"]:
        print(listing(rows, x, names))
    print(f"test loss {result['loss']:.4f}, test accuracy {result['accuracy']:.4f}")
    print(f"{len(y)} samples, {result['errors']} wrong")
    print(f"verdicts: {result['label_errors']} label errors, {result['ambiguous']} ambiguous, "
          f"{result['model_errors']} model errors (calibration temperature "
          f"{temperature:.3f})")

    save_npz(args.predictions, probabilities=probabilities)
    write_csv(args.confusion, ["actual", "predicted"],
              ((names[t], names[p]) for t, p in zip(y.tolist(), y_pred.tolist())))
    write_csv(args.classes, scoring.CLASS_HEADER,
              scoring.class_rows(scoring.class_table(y, y_pred, names)))
    write_csv(args.pairs, scoring.PAIR_HEADER,
              scoring.pair_rows(scoring.confusion_pairs(y, y_pred, names)))
    write_csv(args.misclassified, verdicts.MISCLASSIFIED_HEADER,
              verdicts.misclassified_rows(rows, records, names))
    write_json(args.metrics, result)


if __name__ == "__main__":
    run(main)
