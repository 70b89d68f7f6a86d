"""Data-parallel workers: each model trained in PyTorch by 1 and by 2 workers
(`train.torch.workers`), shipped params otherwise, for the images/s of both on this machine.

The variants go through benchmarks/frameworks.py's runner (each trained twice,
alternating, evaluated after the first run) and its table, the same columns. Part of
`make bench` (the mlp, full recipe).

    python -m benchmarks.workers [--data PATH] [--models mlp cnn] [--epochs N]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import argument_parser, check_data, header
from benchmarks.frameworks import add_model_arguments, bench_variants, runs_table


def bench_workers(data: Path, models: list[str], epochs: int | None) -> list[dict]:
    """Each model trained in PyTorch by 1 and by 2 data-parallel workers."""
    return bench_variants(data, {(model, "torch", workers): {
        "framework": "torch", "model": model, "torch": {"workers": workers}}
        for model in models for workers in (1, 2)}, epochs)


def report(data: Path, models: Sequence[str] = ("mlp",), epochs: int | None = None
           ) -> None:
    """Measure, and print each run's row as it ends and then the table."""
    print(f"\nworkers: {', '.join(models)} in PyTorch, 1 and 2 data-parallel workers "
          "(train.torch.workers), shipped params otherwise, each trained twice")
    print(runs_table(bench_workers(data, list(models), epochs)))


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser("benchmarks.workers", __doc__)
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    check_data(args.data)
    header()
    report(args.data, args.models, args.epochs)


if __name__ == "__main__":
    main()
