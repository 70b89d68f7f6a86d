"""Benchmark the render-errors stage on the full dataset: mosaics and neighbour search.

Mosaics: all 30 of them (every training image by digit, correct and wrong test images),
drawn two ways and compared pixel for pixel:
  naive  the original's way: a PIL canvas and one Image.paste per 28×28 tile;
  tile   stages.analysis.mosaic.tile (numpy reshapes), as stages.analysis.mosaic.mosaics calls it.
Both get the same images; writing the BMP files is the same for both and timed apart.

Neighbour search (stages.analysis.neighbours, exact squared L2 in pixel space): the stage's own
work (k nearest training images of the true and of the predicted digit for every
misclassified test image), and a stress case: all 10000 test images, each against the
training images of its true digit and of its runner-up digit (~2 × 6000 per query).

Predictions: data/predictions.npz if it exists and fits the test set, else a fixed fake
one (seeded, ~2% of test images wrong, like the original network).

Prints the times, the speed-up against its target and whether the pixels match; exits 1
when either falls short. Part of `make bench`.

    python -m benchmarks.mosaics [--data PATH]     (default: dvc.yaml's raw path)
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import argument_parser, header
from stages.analysis.mosaic import mosaics
from stages.analysis.neighbours import nearest_by_class
from stages.data.mnist import IMAGE_SIDE, load_mnist
from stages.data.npz import load_npz
from stages.runtime.outputs import save_image
from testbed.pipeline import paths

PER_ROW, ERRORS_PER_ROW, K = 50, 10, 3
TARGET_SPEEDUP = 10.0


def naive_tile(images: np.ndarray, per_row: int) -> np.ndarray:
    """The original script's layout, one PIL paste per tile (white canvas, row-major)."""
    from PIL import Image

    rows = max(1, math.ceil(len(images) / per_row))
    canvas = Image.new("L", (per_row * IMAGE_SIDE, rows * IMAGE_SIDE), 255)
    for n, image in enumerate(images):
        canvas.paste(Image.fromarray(image, mode="L"),
                     ((n % per_row) * IMAGE_SIDE, (n // per_row) * IMAGE_SIDE))
    return np.asarray(canvas)


def naive_mosaics(data: dict[str, np.ndarray], predicted: np.ndarray) -> dict:
    x_train, y_train = data["x_train"], data["y_train"]
    x_test, y_test = data["x_test"], data["y_test"]
    right = predicted == y_test
    out = {}
    for d in range(10):
        out[f"train_{d}"] = naive_tile(x_train[y_train == d], PER_ROW)
        out[f"test_{d}"] = naive_tile(x_test[(y_test == d) & right], PER_ROW)
        out[f"test_error_{d}"] = naive_tile(x_test[(y_test == d) & ~right], ERRORS_PER_ROW)
    return out


def load_probabilities(y_test: np.ndarray, path=None) -> tuple[np.ndarray, str]:
    """Real predictions if `path` (default: the pipeline's) fits the test set, else
    deterministic fake ones."""
    path = path or paths()["predictions"]
    if Path(path).exists():
        probabilities = load_npz(path, ("probabilities",))["probabilities"]
        if probabilities.shape == (len(y_test), 10):
            return probabilities, str(path)
    rng = np.random.default_rng(0)
    wrong = rng.random(len(y_test)) < 0.02
    predicted = np.where(wrong, (y_test + rng.integers(1, 10, len(y_test))) % 10, y_test)
    probabilities = np.full((len(y_test), 10), 0.01, dtype=np.float32)
    probabilities[np.arange(len(y_test)), predicted] = rng.uniform(0.5, 0.99, len(y_test))
    return probabilities, "fake (seed 0, ~2% wrong)"


def _best(fn, repeats: int):
    best, result = math.inf, None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def run(mnist_path=None, repeats: int = 3, stress: bool = True,
        predictions_path=None) -> dict:
    mnist_path = mnist_path or paths()["raw"]
    data = load_mnist(mnist_path)
    probabilities, source = load_probabilities(data["y_test"], predictions_path)
    predicted = probabilities.argmax(axis=1)
    cfg = {"per_row": PER_ROW, "errors_per_row": ERRORS_PER_ROW}

    naive_s, naive = _best(lambda: naive_mosaics(data, predicted), repeats)
    tile_s, tiled = _best(lambda: mosaics(data, predicted, cfg), repeats)
    assert naive.keys() == tiled.keys()
    for name in naive:
        assert naive[name].shape == tiled[name].shape, name
        assert np.array_equal(naive[name], tiled[name]), f"{name}: pixels differ"
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        for name, pixels in tiled.items():
            save_image(Path(tmp) / f"{name}.bmp", pixels)
        write_s = time.perf_counter() - start

    y_test = data["y_test"]
    wrong = np.flatnonzero(predicted != y_test)
    start = time.perf_counter()
    nearest_by_class(data["x_test"][wrong], data["x_train"], data["y_train"],
                     np.stack([y_test[wrong], predicted[wrong]], axis=1), K)
    errors_s = time.perf_counter() - start

    result = {
        "predictions": source,
        "tiles": int(sum(len(data[k]) for k in ("x_train", "x_test"))),
        "mosaics": len(tiled),
        "naive_paste_s": naive_s,
        "numpy_tile_s": tile_s,
        "speedup": naive_s / tile_s,
        "meets_target": naive_s / tile_s >= TARGET_SPEEDUP,
        "pixel_identical": True,  # asserted above
        "bmp_write_s": write_s,
        "errors": int(len(wrong)),
        "neighbours_k": K,
        "neighbours_errors_s": errors_s,
    }
    if stress:
        # Runner-up digit: the second most probable one (ties broken by the lower digit).
        order = np.argsort(-probabilities, axis=1, kind="stable")
        other = np.where(order[:, 0] == y_test, order[:, 1], order[:, 0])
        start = time.perf_counter()
        nearest_by_class(data["x_test"], data["x_train"], data["y_train"],
                         np.stack([y_test, other], axis=1), K)
        result["neighbours_all_test_s"] = time.perf_counter() - start
        result["neighbours_all_test_queries"] = int(len(y_test))
    return result


def report(data: Path) -> bool:
    """Measure, and print the results; whether the speed-up met its target and the pixels
    matched."""
    print("\nrendering and neighbour search (benchmarks/mosaics.py)")
    r = run(data)
    print(f"mosaics: {r['mosaics']} files, {r['tiles']} tiles, predictions: {r['predictions']}")
    print(f"  {'naive PIL paste loop':<28}{r['naive_paste_s']:8.3f} s")
    print(f"  {'stages.analysis.mosaic.tile':<28}{r['numpy_tile_s']:8.3f} s")
    print(f"  {'speed-up':<28}{r['speedup']:8.1f} x   (target >= {TARGET_SPEEDUP:.0f} x: "
          f"{'met' if r['meets_target'] else 'NOT MET'})")
    print(f"  {'pixel identical':<28}{'yes' if r['pixel_identical'] else 'NO':>8}")
    print(f"  {'writing the 30 BMPs (both)':<28}{r['bmp_write_s']:8.3f} s")
    print(f"neighbours (k={r['neighbours_k']}, exact squared L2 on raw pixels, "
          "training images of the true and of the predicted digit):")
    print(f"  {r['errors']} misclassified test images{'':<4}{r['neighbours_errors_s']:8.3f} s")
    if "neighbours_all_test_s" in r:
        print(f"  all {r['neighbours_all_test_queries']} test images (true + runner-up digit)"
              f"{r['neighbours_all_test_s']:8.3f} s")
    return r["meets_target"] and r["pixel_identical"]


def main(argv: list[str] | None = None) -> int:
    parser = argument_parser("benchmarks.mosaics", __doc__, Path(paths()["raw"]))
    args = parser.parse_args(argv)
    if not args.data.is_file():
        print(f"error: {args.data} not found: run `dvc repro download` or pass --data PATH "
              "to a full mnist.npz", file=sys.stderr)
        return 2
    header()
    return 0 if report(args.data) else 1


if __name__ == "__main__":
    sys.exit(main())
