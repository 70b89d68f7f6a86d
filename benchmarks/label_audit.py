"""Does training without the suspected label errors change the test set's results?

Reads a project in which `audit-labels` ran (audit.folds >= 2): its suspects (the
label-errors of reports/audit/label_issues.csv). Then, for each seed, trains the project's
framework and model with its recipe twice, alternating: on every training image, and on all
but the suspects. Prints each run's test errors with their verdicts (evaluate's rule), and
the mean per side. The test set is only scored, never used to choose anything.

    python -m benchmarks.label_audit --project /path/to/project [--seeds 42 1 2 3]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np

from stages.analysis import verdicts
from stages.data.mnist import load_processed, validation_split
from stages.frameworks.trainers import trainer
from stages.runtime import params


def suspects(project: Path) -> np.ndarray:
    with open(project / "reports/audit/label_issues.csv", newline="", encoding="utf-8") as f:
        return np.array(sorted(int(r["index"]) for r in csv.DictReader(f)
                               if r["verdict"] == verdicts.LABEL_ERROR), dtype=np.int64)


def train_and_score(cfg: params.TrainConfig, data: dict, keep: np.ndarray, k: int) -> dict:
    """Train on the training images `keep` (train's split of them for validation), then
    the test errors, by verdict."""
    fit_idx, val_idx = validation_split(len(keep), cfg.val_fraction, cfg.seed)
    x, y = data["x_train"][keep], data["y_train"][keep]
    split = {"x_train": x[fit_idx], "y_train": y[fit_idx], "x_val": x[val_idx],
             "y_val": y[val_idx]}
    framework = trainer(cfg.framework)
    network = framework.network
    network.configure(cfg.seed, cfg.intra_op_threads, cfg.inter_op_threads)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as curves:
        model = framework.fit(cfg, split, curves)
    seconds = time.perf_counter() - started
    probabilities = network.predict(model, data["x_test"], 1000)
    val = network.predict(model, x[val_idx], 1000) if len(val_idx) else None
    records, _ = verdicts.judge_errors(data, probabilities, val, y[val_idx], k)
    return {"seconds": seconds, "errors": len(records), **verdicts.counts(records)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2, 3])
    args = parser.parse_args(argv)
    everything = params.load(args.project / "params.yaml")
    # train's model, trained as the pipeline trains it, with and without the suspects.
    cfg, k = everything["train"], everything["evaluate"]["neighbours"]
    data = load_processed(args.project / "data/processed/mnist.npz")
    drop = suspects(args.project)
    every = np.arange(len(data["y_train"]))
    sides = {"all": every, "without suspects": np.setdiff1d(every, drop)}
    print(f"{cfg.model} in {cfg.framework}: {len(drop)} suspects dropped of {len(every)}")
    print("| seed | training set | test errors | label errors | ambiguous | model errors |")
    print("|---|---|---|---|---|---|")
    runs = {name: [] for name in sides}
    for seed in args.seeds:
        for name, keep in sides.items():
            r = train_and_score(dataclasses.replace(cfg, seed=seed), data, keep, k)
            runs[name].append(r)
            print(f"| {seed} | {name} | {r['errors']} | {r['label_errors']} | "
                  f"{r['ambiguous']} | {r['model_errors']} |", flush=True)
    for name, results in runs.items():
        mean = {key: np.mean([r[key] for r in results]) for key in results[0]}
        print(f"| mean | {name} | {mean['errors']:.2f} | {mean['label_errors']:.2f} | "
              f"{mean['ambiguous']:.2f} | {mean['model_errors']:.2f} |")


if __name__ == "__main__":
    main()
