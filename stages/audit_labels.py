"""Opt-in stage: audit the training labels -> suspected label errors, a table and a mosaic.

With `audit.folds` k >= 2, `audit.framework` trains `audit.model` with its recipe
(`train.<model>`) k times, each time on all but one fold of the training set (seeded,
label-blind folds), and predicts the fold it left out: every training image gets
probabilities from a model that never saw it (cross-validation). One temperature fitted on
those out-of-sample probabilities calibrates them; then every training image the
out-of-fold model gets wrong is judged by the rule the test set's errors are
(stages/analysis/verdicts.py): confident learning (cleanlab) on the calibrated
probabilities, and the labels of its K nearest *other* training images
(`evaluate.neighbours`). The label-errors are the suspects.

    reports/audit/label_issues.csv  every out-of-fold error: misclassified.csv's columns
                                    (`true` is the given label), most confident first
    reports/audit/suspects.png      the suspects' images, in that order, 10 per row
    reports/audit/metrics.json      folds, audited images, errors per verdict, temperature

`audit.folds: 0` (the default) trains nothing: the outputs say so, in a second. Training
without the suspects, and what it changes on the test set: benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from stages.analysis import verdicts
from stages.analysis.mosaic import tile
from stages.analysis.neighbours import nearest
from stages.data.mnist import load_processed, raw_pixels, validation_split
from stages.frameworks.trainers import trainer
from stages.runtime import params
from stages.runtime.failures import DataError, run, stop_if_interrupted
from stages.runtime.outputs import atomic_dir, round_floats, save_image, write_csv, write_json
from stages.training.distributed import world

PER_ROW = 10


def folds(n: int, k: int, seed: int) -> list[np.ndarray]:
    """k label-blind folds of range(n), as equal as can be, each in dataset order."""
    if not 2 <= k <= n:
        raise DataError(f"audit.folds {k} needs 2..{n} folds of {n} training images")
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(part) for part in np.array_split(order, k)]


def out_of_fold(cfg: params.TrainConfig, x: np.ndarray, y: np.ndarray,
                parts: list[np.ndarray], batch_size: int) -> np.ndarray:
    """Each image's probabilities from the model trained on the other folds (N×10)."""
    framework = trainer(cfg.framework)
    framework.network.configure(cfg.seed, cfg.intra_op_threads, cfg.inter_op_threads)
    out = np.zeros((len(y), params.CLASSES), dtype=np.float32)
    for j, held_out in enumerate(parts):
        rest = np.setdiff1d(np.arange(len(y)), held_out)
        fit_idx, val_idx = validation_split(len(rest), cfg.val_fraction, cfg.seed)
        data = {"x_train": x[rest[fit_idx]], "y_train": y[rest[fit_idx]],
                "x_val": x[rest[val_idx]], "y_val": y[rest[val_idx]]}
        print(f"audit: fold {j + 1}/{len(parts)}: training on {len(fit_idx)} images, "
              f"predicting {len(held_out)}", flush=True)
        with tempfile.TemporaryDirectory(prefix="mnist-audit-") as curves:
            model = framework.fit(cfg, data, curves)
        out[held_out] = framework.network.predict(model, x[held_out], batch_size)
        stop_if_interrupted()
    return out


def audit(x: np.ndarray, y: np.ndarray, probabilities: np.ndarray, k: int
          ) -> tuple[list[dict], float]:
    """The verdict records of every image the out-of-fold probabilities get wrong, most
    confident first, and the temperature that calibrated them."""
    y = np.asarray(y, dtype=np.int64)
    temperature = verdicts.fit_temperature(probabilities, y)
    calibrated = verdicts.calibrate(probabilities, temperature)
    flagged = verdicts.confident_learning(y, calibrated)
    wrong = np.flatnonzero(probabilities.argmax(axis=1) != y)
    pixels = raw_pixels(x)
    found, _ = nearest(pixels[wrong], pixels, k, exclude=wrong)  # never the image itself
    records = verdicts.judge(y, calibrated, flagged, y[found], wrong)
    for record, row, i in zip(records, found.tolist(), wrong.tolist(), strict=True):
        record["neighbours"] = row
        record["confidence"] = float(probabilities[i, record["predicted"]])
    records.sort(key=lambda r: (-r["p_predicted"], r["index"]))
    return records, temperature


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="normalize's scaled arrays (.npz)")
    parser.add_argument("--out", required=True, type=Path, help="the audit's folder")
    args = parser.parse_args(argv)
    everything = params.load()
    cfg, k = everything["audit"]["train"], everything["evaluate"]["neighbours"]
    names, n_folds = everything["dataset"]["classes"], everything["audit"]["folds"]
    records, temperature, audited = [], None, 0
    if n_folds:
        if cfg.workers > 1 or world()[1] > 1:
            raise DataError("audit-labels trains in this one process: with audit.framework "
                            "torch, set train.torch.workers: 1, and run it alone")
        data = load_processed(args.data, only=("x_train", "y_train"))
        x, y = data["x_train"], data["y_train"]
        parts = folds(len(y), n_folds, cfg.seed)
        probabilities = out_of_fold(cfg, x, y, parts, everything["evaluate"]["batch_size"])
        records, temperature = audit(x, y, probabilities, k)
        audited = len(y)
    suspects = [r for r in records if r["verdict"] == verdicts.LABEL_ERROR]
    metrics = round_floats({"folds": n_folds, "audited": audited, "errors": len(records),
                            **verdicts.counts(records), "temperature": temperature})
    with atomic_dir(args.out) as tmp:
        rows = [(r["index"], r["true"], r["predicted"], f"{r['confidence']:.6f}")
                for r in records]
        write_csv(tmp / "label_issues.csv", verdicts.MISCLASSIFIED_HEADER,
                  verdicts.misclassified_rows(rows, records, names))
        images = (raw_pixels(x[[r["index"] for r in suspects]]) if suspects
                  else np.zeros((0, 28, 28), np.uint8))
        save_image(tmp / "suspects.png", tile(images, PER_ROW))
        write_json(tmp / "metrics.json", metrics)
    if not n_folds:
        print("audit-labels: off (audit.folds: 0); nothing trained")
    else:
        print(f"audit-labels: {audited} training images in {n_folds} folds: "
              f"{len(records)} out-of-fold errors, {len(suspects)} suspected label errors "
              f"-> {args.out}")


if __name__ == "__main__":
    run(main)
