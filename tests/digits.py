"""Small arrays to test with: the fixture's, toy and random datasets in MNIST's layouts,
named classes, and predicted probabilities made without a network."""

from __future__ import annotations

import numpy as np

from tests.paths import FIXTURE


def fixture_data() -> dict[str, np.ndarray]:
    """The fixture's four arrays (1500 training, 500 test images)."""
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


def toy_digits(n: int = 200, seed: int = 0):
    """Separable toy data, class d lighting pixel (d, d): the fit data (80%) as train gets
    it, and the held-out 20% images and labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n).astype(np.uint8)
    x = np.zeros((n, 28, 28), np.float32)
    x[np.arange(n), y, y] = 1.0
    cut = n * 4 // 5
    data = {"x_train": x[:cut], "y_train": y[:cut], "x_val": x[cut:], "y_val": y[cut:]}
    return data, x[cut:], y[cut:]


def small_mnist(n_train: int = 12, n_test: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny random dataset in Keras' MNIST layout (uint8 images, labels 0..9)."""
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def gz_idx(array: np.ndarray) -> bytes:
    """A gzip-compressed idx file holding array, as MNIST's originals are served."""
    import gzip

    from stages.data import idx

    return gzip.compress(idx.encode(array), mtime=0)


# Fashion-MNIST's class names, two of them changed to hold a comma (CSV quoting) and HTML
# markup (page escaping): names every report must show as they are written.
NAMED_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat, long", "Sandal",
                 "<Shirt> & co", "Sneaker", "Bag", "Ankle boot"]


def centroid_probabilities(data: dict[str, np.ndarray]) -> np.ndarray:
    """Deterministic, realistic-looking predictions without a network: a softmax over
    the negative distances to each class's mean training image (~80% right)."""
    x = data["x_train"].reshape(len(data["x_train"]), -1).astype(np.float64) / 255
    means = np.stack([x[data["y_train"] == d].mean(axis=0) for d in range(10)])
    t = data["x_test"].reshape(len(data["x_test"]), -1).astype(np.float64) / 255
    logits = -((t[:, None, :] - means[None]) ** 2).sum(axis=2)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def probabilities_for(cases: list[tuple[int, int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """(true, predicted, confidence) per test image -> y_true (uint8), probabilities N×10
    (the rest of each row spread evenly over the other nine classes)."""
    y = np.array([t for t, _, _ in cases], dtype=np.uint8)
    p = np.zeros((len(cases), 10), dtype=np.float32)
    for i, (_, pred, conf) in enumerate(cases):
        p[i] = (1 - conf) / 9
        p[i, pred] = conf
    return y, p
