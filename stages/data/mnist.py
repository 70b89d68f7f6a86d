"""The dataset on disk: MNIST's layout, loaded and checked.

Raw (data/raw/mnist.npz, Keras' layout): x_train N×28×28 uint8, y_train N uint8 labels
0..9, x_test, y_test. Processed (data/processed/mnist.npz): the same keys, pixels float32
in [0, 1]. The files are read by stages/data/npz.py, which never unpickles and caps sizes.
"""

from __future__ import annotations

import numpy as np

from stages.data.npz import load_npz
from stages.runtime.failures import DataError

IMAGE_SIDE = 28
MNIST_KEYS = ("x_train", "y_train", "x_test", "y_test")
SPLITS = ("train", "test")


def _check_labels(y: np.ndarray, name: str, source: str) -> None:
    if y.dtype != np.uint8 or y.ndim != 1:
        raise DataError(f"{source}: {name} must be 1-D uint8, got {y.dtype} shape {y.shape}")
    if y.size and y.max() > 9:
        raise DataError(f"{source}: {name} has label {int(y.max())}; allowed 0..9")


def _check_images(x: np.ndarray, name: str, source: str) -> None:
    if x.ndim != 3 or x.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise DataError(f"{source}: {name} must be N×28×28, got shape {x.shape}")
    if len(x) == 0:
        raise DataError(f"{source}: {name} is empty")


def validate_mnist(data: dict[str, np.ndarray], source: str) -> None:
    """Keras' MNIST layout: uint8 images N×28×28, uint8 labels 0..9, as many of each."""
    for split in SPLITS:
        x, y = data[f"x_{split}"], data[f"y_{split}"]
        if x.dtype != np.uint8 or y.dtype != np.uint8:
            raise DataError(
                f"{source}: x_{split}/y_{split} must be uint8, got {x.dtype}/{y.dtype}")
        _check_images(x, f"x_{split}", source)
        _check_labels(y, f"y_{split}", source)
        if len(x) != len(y):
            raise DataError(f"{source}: {len(x)} x_{split} images but {len(y)} y_{split} labels")


def validate_processed(data: dict[str, np.ndarray], source: str) -> None:
    """normalize's output (any subset of its arrays): float32 pixels in [0, 1], finite,
    N×28×28; uint8 labels 0..9; as many labels as images."""
    for split in SPLITS:
        x, y = data.get(f"x_{split}"), data.get(f"y_{split}")
        if x is not None:
            if x.dtype != np.float32:
                raise DataError(f"{source}: x_{split} must be float32, got {x.dtype}")
            _check_images(x, f"x_{split}", source)
            check_finite(x, f"{source}: x_{split}")
            if x.min() < 0 or x.max() > 1:
                raise DataError(f"{source}: x_{split} has pixels outside [0, 1]")
        if y is not None:
            _check_labels(y, f"y_{split}", source)
        if x is not None and y is not None and len(x) != len(y):
            raise DataError(f"{source}: {len(x)} x_{split} images but {len(y)} y_{split} labels")


def raw_pixels(x: np.ndarray) -> np.ndarray:
    """normalize's float pixels back to the raw 0..255 integers (x = raw / 255 exactly)."""
    return np.rint(x * np.float32(255)).astype(np.uint8)


def load_mnist(path) -> dict[str, np.ndarray]:
    data = load_npz(path, MNIST_KEYS)
    validate_mnist(data, str(path))
    return data


def load_processed(path, only=MNIST_KEYS) -> dict[str, np.ndarray]:
    data = load_npz(path, MNIST_KEYS, only=only)
    validate_processed(data, str(path))
    return data


def scale(images: np.ndarray) -> np.ndarray:
    # float32 halves memory against the original's float64 at no loss for 8-bit inputs.
    return images.astype(np.float32) / np.float32(255.0)


def check_finite(array: np.ndarray, name: str) -> None:
    if not np.isfinite(array).all():
        raise DataError(f"{name}: holds NaN or infinite values")


def validation_split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training indices, validation indices): the seeded, label-blind split of the training
    set that train holds out and evaluate calibrates on; both parts keep dataset order."""
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and not 0 < n_val < n:
        raise DataError(f"val_fraction {val_fraction} leaves no usable split of {n} images")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])
