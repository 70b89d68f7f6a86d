"""Stage 2: inspect and scale -> data/processed/mnist.npz, reports/data.json, sample.bmp.

Prints the original script's dataset summary (shapes, dtypes, label of a sample, pixel
range, the sample drawn as text) and saves that sample as a BMP, as the original's 1.bmp.
Pixels become float32 in [0, 1]. Splits stay as they are: the validation split is a
training choice, made by the train stage from its recipe.
"""

from __future__ import annotations

import argparse

import numpy as np

from stages.data.console import draw
from stages.data.mnist import MNIST_KEYS, SPLITS, check_finite, load_mnist, scale
from stages.runtime import params
from stages.runtime.failures import ParamError, run
from stages.runtime.outputs import round_floats, save_image, save_npz, write_json


def summary(data: dict[str, np.ndarray], index: int, classes: list[str]) -> str:
    """The original script's inspection printout."""
    lines = [f"{key}: shape {data[key].shape}, dtype {data[key].dtype}" for key in data]
    x = data["x_train"]
    lines += [
        f"label of training sample {index}: {classes[int(data['y_train'][index])]}",
        f"pixel min {int(x.min())}, max {int(x.max())}",
        draw(x[index]),
    ]
    return "\n".join(lines)


def stats(data: dict[str, np.ndarray]) -> dict:
    """Per split: image count, count per class, pixel mean and std (raw 0..255 values, as
    published for MNIST: train mean 33.318421)."""
    def part(x, y):
        return {
            "count": int(len(y)),
            "class_counts": {str(c): int((y == c).sum()) for c in range(params.CLASSES)},
            "pixel_mean": float(x.mean()),
            "pixel_std": float(x.std()),
        }

    return round_floats({split: part(data[f"x_{split}"], data[f"y_{split}"])
                         for split in SPLITS})


def normalize(data: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict]:
    out = {key: scale(data[key]) if key.startswith("x_") else data[key] for key in MNIST_KEYS}
    for split in SPLITS:
        check_finite(out[f"x_{split}"], f"x_{split}")
    return out, stats(data)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--raw", required=True, help="verified MNIST, Keras layout (uint8)")
    parser.add_argument("--out", required=True, help="scaled arrays (.npz)")
    parser.add_argument("--report", required=True, help="per-split statistics (.json)")
    parser.add_argument("--sample", required=True, help="the sample image (.bmp)")
    args = parser.parse_args(argv)
    cfg = params.load()
    index, classes = cfg["normalize"]["sample_index"], cfg["dataset"]["classes"]

    data = load_mnist(args.raw)
    if index >= len(data["y_train"]):
        raise ParamError(f"normalize.sample_index: got {index}; allowed: 0 to "
                         f"{len(data['y_train']) - 1}")
    print(summary(data, index, classes))
    processed, report = normalize(data)
    save_image(args.sample, data["x_train"][index])
    save_npz(args.out, **processed)
    write_json(args.report, report)
    print(f"normalize: {report['train']['count']} train, {report['test']['count']} test "
          f"images -> {args.out}")


if __name__ == "__main__":
    run(main)
