"""Stage 5: draw the original script's mosaics -> reports/mosaics/, reports/plots/errors/.

For every digit d, as the original laid them out (white canvas, row-major, dataset order):
  train_{d}.bmp       every training image labelled d, `render.per_row` per row;
  test_{d}.bmp        test images of digit d classified correctly, `render.per_row` per row;
  test_error_{d}.bmp  test images of digit d misclassified, `render.errors_per_row` per row.
The error mosaics are also written as PNG, which DVC can show as image plots (not BMP).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from stages.common import (
    DataError,
    atomic_dir,
    check_keys,
    load_mnist,
    load_npz,
    load_params,
    param_int,
    run,
    save_image,
    tile,
)

SECTION = "render"
RAW = "data/raw/mnist.npz"
PREDICTIONS = "data/predictions.npz"
MOSAICS = Path("reports/mosaics")
ERROR_PLOTS = Path("reports/plots/errors")


def validate(params: dict) -> dict:
    check_keys(params, SECTION, {"per_row", "errors_per_row"})
    return {
        "per_row": param_int(params, SECTION, "per_row", 1, 1000),
        "errors_per_row": param_int(params, SECTION, "errors_per_row", 1, 1000),
    }


def mosaics(data: dict[str, np.ndarray], predicted: np.ndarray, cfg: dict) -> dict:
    """Every mosaic by file name, as uint8 pixel arrays."""
    x_train, y_train = data["x_train"], data["y_train"]
    x_test, y_test = data["x_test"], data["y_test"]
    right = predicted == y_test
    out = {}
    for d in range(10):
        out[f"train_{d}"] = tile(x_train[y_train == d], cfg["per_row"])
        out[f"test_{d}"] = tile(x_test[(y_test == d) & right], cfg["per_row"])
        out[f"test_error_{d}"] = tile(x_test[(y_test == d) & ~right], cfg["errors_per_row"])
    return out


def main() -> None:
    cfg = validate(load_params(SECTION))
    data = load_mnist(RAW)
    probabilities = load_npz(PREDICTIONS, ("probabilities",))["probabilities"]
    if probabilities.shape != (len(data["y_test"]), 10):
        raise DataError(f"{PREDICTIONS}: shape {probabilities.shape} does not match the test set")
    images = mosaics(data, probabilities.argmax(axis=1), cfg)
    with atomic_dir(MOSAICS) as tmp:
        for name, pixels in images.items():
            save_image(tmp / f"{name}.bmp", pixels)
    with atomic_dir(ERROR_PLOTS) as tmp:
        for d in range(10):
            save_image(tmp / f"test_error_{d}.png", images[f"test_error_{d}"])
    print(f"render-errors: {len(images)} mosaics -> {MOSAICS}, error PNGs -> {ERROR_PLOTS}")


if __name__ == "__main__":
    run(main)
