"""`make bench`: the default benchmarks side by side in one session, on the full dataset.

In this order, each one module that also runs alone (`python -m benchmarks.NAME --help`):

  train       the original script's training against the train stage (mlp)
  mosaics     every mosaic pasted tile by tile with PIL against stages.analysis.mosaic.tile
  frameworks  the mlp, then the cnn for one epoch, trained in Keras, PyTorch and C: time,
              GFLOP/s against the probed peak, memory, accuracy
  workers     each model trained in PyTorch by 1 and by 2 data-parallel workers
  predict     mnist-predict's preprocessing, per image file from 28×28 to 8000×8000

Each runs with its own defaults here. Only alone, when asked: frontier (the accuracy/cost
frontier, hours), cnn (a convnet over several seeds, minutes per seed), hosts (two test
hosts with a network between them, as root); benchmarks/RESULTS.md has what they gave.

    python -m benchmarks.run [--data PATH]     (make bench BENCH_ARGS="--data PATH")
"""

from __future__ import annotations

from benchmarks import frameworks, mosaics, predict, train, workers
from benchmarks.common import argument_parser, check_data, header


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser("benchmarks.run", __doc__)
    args = parser.parse_args(argv)
    check_data(args.data)
    header()
    train.report(args.data)
    mosaics.report(args.data)
    frameworks.report(args.data)
    frameworks.report(args.data, ("cnn",), epochs=1)
    workers.report(args.data)
    predict.report(args.data)


if __name__ == "__main__":
    main()
