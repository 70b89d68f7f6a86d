"""How much of a convnet's result is the seed: the convnet trained by the train stage and
evaluated by the evaluate stage once per seed, default params otherwise.

One JSON line per seed as it ends (training seconds, the last epoch's validation accuracy,
test accuracy and errors, peak RSS), then the test errors' mean and worst and the median
training time. Minutes per seed; not part of `make bench`.

    python -m benchmarks.cnn [--data PATH] [--model cnn|cnn_large]
                             [--framework keras|torch|c] [--seeds 42 1 2]
"""

from __future__ import annotations

import json
import re
import shutil
import statistics
from pathlib import Path

from benchmarks.common import (
    argument_parser,
    check_data,
    header,
    prepare_project,
    train_and_evaluate,
    train_seconds,
)


def bench_cnn(data: Path, model: str, seeds: list[int], framework: str = "keras") -> list[dict]:
    """Train and evaluate `model` with the default params once per seed, via the stages."""
    project = prepare_project(data, {"train": {"model": model, "framework": framework}})
    runs = []
    try:
        for seed in seeds:
            child, metrics = train_and_evaluate(project, seed)
            seconds = train_seconds(child["stdout"])
            last_epoch = [line for line in child["stdout"].splitlines()
                          if line.startswith("epoch ")][-1]
            val = re.search(r"eval/accuracy=([\d.]+)", last_epoch)
            runs.append({"seed": seed, "train_seconds": seconds,
                         "val_accuracy": float(val.group(1)) if val else None,
                         "test_accuracy": metrics["accuracy"], "test_errors": metrics["errors"],
                         "peak_rss_mb": child["peak_rss_mb"]})
            print(json.dumps(runs[-1]), flush=True)
    finally:
        shutil.rmtree(project, ignore_errors=True)
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser("benchmarks.cnn", __doc__)
    parser.add_argument("--model", choices=("cnn", "cnn_large"), default="cnn",
                        help="the convnet preset (default: cnn)")
    parser.add_argument("--framework", choices=("keras", "torch", "c"), default="keras",
                        help="who trains it (default: keras)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2],
                        help="one training per seed (default: 42 1 2)")
    args = parser.parse_args(argv)
    check_data(args.data)
    header()
    print(f"\n{args.model} in {args.framework}, default params, seeds {args.seeds} "
          "(train + evaluate stages)")
    runs = bench_cnn(args.data, args.model, args.seeds, args.framework)
    errors = [r["test_errors"] for r in runs]
    print(f"test errors {errors}: mean {statistics.mean(errors):.1f}, worst {max(errors)}; "
          f"training {statistics.median(r['train_seconds'] for r in runs):.0f}s (median)")


if __name__ == "__main__":
    main()
