"""How well the verdicts find wrong labels, on a trained project's full test set.

Synthetic label noise, as tests/integration/test_verdicts.py does on the fixture: the
labels of `--flips` clear test images (correct, calibrated confidence >= 0.99: label
smoothing caps the raw one) are flipped to another class, and each rule for calling an
error `label-error` is scored on the flipped images (recall) and on all it calls
(precision), with the clean labels too (how many errors it calls label errors there).
The rules differ only in the model reader's half:
  cleanlab-raw     confident learning on the uncalibrated probabilities;
  cleanlab         confident learning on the calibrated probabilities;
  shipped          that, and calibrated p(predicted) > 1/2 (verdicts.reads_predicted);
  posterior        calibrated p(predicted) > 1/2 alone;
each AND a majority of the K nearest training images labelled as predicted. Also times the
verdicts' parts (calibration, confident learning, neighbours) against the prediction.

    python -m benchmarks.verdicts --project /path/to/a/project/after/dvc/repro
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from stages import frameworks
from stages.analysis import verdicts
from stages.analysis.neighbours import nearest
from stages.data.mnist import load_processed, validation_split
from stages.data.mnist import raw_pixels as pixels
from stages.runtime import params


def rules(y, probabilities, calibrated, knn_labels, wrong) -> dict[str, set[int]]:
    """Indices each rule calls label-error, among the errors `wrong`."""
    k = knn_labels.shape[1]
    pred = probabilities.argmax(1)[wrong]
    majority = 2 * (knn_labels == pred[:, None]).sum(1) > k
    raw_cl = verdicts.confident_learning(y, probabilities)[wrong]
    cal_cl = verdicts.confident_learning(y, calibrated)[wrong]
    posterior = calibrated[wrong, pred] > 0.5
    return {name: set(wrong[majority & flag].tolist())
            for name, flag in (("cleanlab-raw", raw_cl), ("cleanlab", cal_cl),
                               ("shipped", cal_cl & posterior), ("posterior", posterior))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--flips", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    cfg = params.load(args.project / "params.yaml")
    train, k = cfg["train"], cfg["evaluate"]["neighbours"]
    data = load_processed(args.project / "data/processed/mnist.npz")
    y = data["y_test"].astype(np.int64)
    _, val = validation_split(len(data["y_train"]), train.val_fraction, train.seed)

    started = time.perf_counter()
    model = frameworks.predictor(args.project / "data/model", 2, 2)
    probabilities = model(data["x_test"], 1000)
    val_probabilities = model(data["x_train"][val], 1000)
    predicted = time.perf_counter()
    temperature = verdicts.fit_temperature(val_probabilities, data["y_train"][val])
    calibrated = verdicts.calibrate(probabilities, temperature)
    calibration = time.perf_counter()
    verdicts.confident_learning(y, calibrated)
    cl = time.perf_counter()
    train_pixels = pixels(data["x_train"])
    print(f"temperature {temperature:.3f}; seconds: predict test+validation "
          f"{predicted - started:.2f}, calibrate {calibration - predicted:.2f}, confident "
          f"learning {cl - calibration:.2f}")

    clean_wrong = np.flatnonzero(probabilities.argmax(1) != y)
    t0 = time.perf_counter()
    found, _ = nearest(pixels(data["x_test"][clean_wrong]), train_pixels, k)
    print(f"neighbours of {len(clean_wrong)} errors: {time.perf_counter() - t0:.2f} s")
    clean = rules(y, probabilities, calibrated, data["y_train"][found], clean_wrong)
    print(f"clean labels, {len(clean_wrong)} errors; called label-error: "
          + ", ".join(f"{name} {len(called)}" for name, called in clean.items()))

    print(f"| seed | rule | recall ({args.flips} flipped) | precision | "
          "unflipped errors called |")
    print("|---|---|---|---|---|")
    for seed in args.seeds:
        rng = np.random.default_rng(seed)
        sure = np.flatnonzero((probabilities.argmax(1) == y) & (calibrated.max(1) >= 0.99))
        flipped = np.sort(rng.choice(sure, args.flips, replace=False))
        noisy = y.copy()
        noisy[flipped] = (y[flipped] + rng.integers(1, 10, args.flips)) % 10
        wrong = np.flatnonzero(probabilities.argmax(1) != noisy)
        found, _ = nearest(pixels(data["x_test"][wrong]), train_pixels, k)
        called = rules(noisy, probabilities, calibrated, data["y_train"][found], wrong)
        for name, hits in called.items():
            right = len(hits & set(flipped.tolist()))
            print(f"| {seed} | {name} | {right / args.flips:.2f} | "
                  f"{right / max(1, len(hits)):.2f} | {len(hits) - right} of "
                  f"{len(wrong) - args.flips} |")


if __name__ == "__main__":
    main()
