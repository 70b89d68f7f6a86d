"""Training speed and memory: the original script's training (benchmarks/original.py)
against this pipeline's train stage with `train.model: mlp` and the original settings.

Runs alternate, one of each in turn, in one session so that machine noise hits both alike;
each side's median is reported with the ratio stage / original: training time, the whole
process's time, peak RSS, and each run's test accuracy. Part of `make bench`.

    python -m benchmarks.train [--data PATH] [--repeats N]
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path

from benchmarks.common import (
    ROOT,
    argument_parser,
    check_data,
    header,
    prepare_project,
    run_child,
    train_seconds,
)
from testbed.pipeline import paths, stage_command

# The original network and settings: the shipped mlp recipe, on one thread per pool (for a
# network this small TensorFlow spends more time handing ops between threads than on them).
ONE_THREAD = {"intra_op_threads": 1, "inter_op_threads": 1}
MLP_PRESET = {"train": {"model": "mlp", "keras": ONE_THREAD, "torch": ONE_THREAD},
              "speed": {"c_threads": 1}}


def bench_train(data: Path, repeats: int) -> dict:
    project = prepare_project(data, MLP_PRESET)
    original, stage = [], []
    try:
        for _ in range(repeats):
            child = run_child([sys.executable, str(ROOT / "benchmarks" / "original.py"),
                               str(data)], ROOT)
            original.append({**json.loads(child["stdout"].strip().splitlines()[-1]),
                             "peak_rss_mb": child["peak_rss_mb"]})
            child = run_child(stage_command("train"), project)
            seconds = train_seconds(child["stdout"])
            run_child(stage_command("evaluate"), project)
            metrics = json.loads((project / paths()["metrics"]).read_text())
            stage.append({"train_seconds": seconds, "process_seconds": child["wall"],
                          "accuracy": metrics["accuracy"], "peak_rss_mb": child["peak_rss_mb"]})
    finally:
        shutil.rmtree(project, ignore_errors=True)

    def med(runs, key):
        return statistics.median(r[key] for r in runs)

    result = {"repeats": repeats, "original": original, "stage": stage}
    for key in ("train_seconds", "process_seconds", "peak_rss_mb"):
        result[f"{key}_ratio"] = med(stage, key) / med(original, key)
    return result


def report(data: Path, repeats: int = 2) -> None:
    """Measure, and print the comparison as a table."""
    r = bench_train(data, repeats)
    print("\ntraining, mlp, batch 32, 5 epochs (median of "
          f"{r['repeats']} alternating runs each)")
    print(f"{'':24}{'original':>12}{'train stage':>14}{'ratio':>8}")
    for key, label, fmt in (("train_seconds", "training time (s)", "{:.1f}"),
                            ("process_seconds", "whole process (s)", "{:.1f}"),
                            ("peak_rss_mb", "peak RSS (MB)", "{:.0f}")):
        o = statistics.median(x[key] for x in r["original"])
        s = statistics.median(x[key] for x in r["stage"])
        print(f"{label:24}{fmt.format(o):>12}{fmt.format(s):>14}{s / o:>8.2f}")

    def accuracies(runs):
        return " / ".join(f"{x['accuracy']:.4f}" for x in runs)

    print(f"{'test accuracy':24}{accuracies(r['original']):>12}  {accuracies(r['stage'])}")


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser("benchmarks.train", __doc__)
    parser.add_argument("--repeats", type=int, default=2,
                        help="runs of each side, alternating (default: 2)")
    args = parser.parse_args(argv)
    check_data(args.data)
    header()
    report(args.data, args.repeats)


if __name__ == "__main__":
    main()
