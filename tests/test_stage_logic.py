"""The pure logic of normalize, train, models and evaluate, called as plain functions."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import FIXTURE
from stages import evaluate, normalize, train
from stages.common import draw


def small_mnist(n_train=60, n_test=20, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train).astype(np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test).astype(np.uint8),
    }


# --- normalize -----------------------------------------------------------------------


def test_scale_is_float32_in_unit_range_and_exact_at_the_ends():
    images = np.array([[0, 255], [51, 102]], dtype=np.uint8)
    scaled = normalize.scale(images)
    assert scaled.dtype == np.float32
    assert scaled[0, 0] == 0.0 and scaled[0, 1] == 1.0
    assert np.allclose(scaled[1], [0.2, 0.4])


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5])
def test_split_is_a_seeded_partition_in_dataset_order(fraction):
    train_idx, val_idx = normalize.split(1000, fraction, seed=7)
    assert len(val_idx) == round(1000 * fraction)
    assert np.array_equal(np.sort(np.concatenate([train_idx, val_idx])), np.arange(1000))
    assert np.all(np.diff(train_idx) > 0) and np.all(np.diff(val_idx) > 0)
    again = normalize.split(1000, fraction, seed=7)
    assert np.array_equal(again[1], val_idx)
    if fraction:
        assert not np.array_equal(normalize.split(1000, fraction, seed=8)[1], val_idx)


def test_split_refuses_a_fraction_that_leaves_no_training_or_validation_image():
    with pytest.raises(ValueError):
        normalize.split(3, 0.01, seed=0)  # rounds to 0 validation images


def test_normalize_keeps_labels_with_their_images_and_reports_counts():
    data = small_mnist()
    out, report = normalize.normalize(data, {"val_fraction": 0.25, "seed": 1, "sample_index": 0})
    assert tuple(out) == ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
    assert len(out["y_train"]) == 45 and len(out["y_val"]) == 15
    # Every processed image is the scaled raw image with the same label.
    for x, y in zip(out["x_val"], out["y_val"]):
        match = np.flatnonzero((normalize.scale(data["x_train"]) == x).all(axis=(1, 2)))
        assert data["y_train"][match[0]] == y
    assert report["val"]["count"] == 15
    assert sum(report["train"]["class_counts"].values()) == 45
    assert report["test"]["class_counts"] == {
        str(d): int((data["y_test"] == d).sum()) for d in range(10)}


def test_summary_prints_what_the_original_printed():
    data = small_mnist()
    data["x_train"][3] = 0
    data["x_train"][3, 10, 5] = 255
    text = normalize.summary(data, 3)
    assert "x_train: shape (60, 28, 28), dtype uint8" in text
    assert f"label of training sample 3: {data['y_train'][3]}" in text
    assert "pixel min 0, max 255" in text
    assert text.endswith(draw(data["x_train"][3]))
    assert "@" in text.splitlines()[-28 + 10]


# --- train ---------------------------------------------------------------------------


def train_params(**overrides):
    params = {
        "model": "mlp", "epochs": 1, "batch_size": 8, "learning_rate": 0.001,
        "lr_schedule": "constant", "seed": 3, "rotation": 0.0, "shift": 0.0, "zoom": 0.0,
        "label_smoothing": 0.0, "restore_best": True, "steps_per_execution": 4,
        "intra_op_threads": 1, "inter_op_threads": 1,
    }
    return params | overrides


@pytest.mark.parametrize("n,batch", [(10, 3), (12, 4), (5, 8)])
def test_batch_order_covers_every_image_once_with_one_short_last_batch(n, batch):
    parts = train.batch_order(n, batch, np.random.default_rng(0))
    flat = np.concatenate([p.ravel() for p in parts])
    assert np.array_equal(np.sort(flat), np.arange(n))
    assert all(p.shape[1] == batch for p in parts[:1] if n >= batch)
    assert sum(p.size for p in parts) == n
    if n % batch:
        assert parts[-1].shape == (1, n % batch)


def test_train_validate_accepts_every_model_name():
    for name in train.MODEL_NAMES:
        assert train.validate(train_params(model=name))["model"] == name


@pytest.mark.slow
def test_fit_learns_and_is_reproducible_in_process(tmp_path, monkeypatch):
    """A few steps on separable toy data: loss falls, and the same seed gives same weights."""
    monkeypatch.chdir(tmp_path)
    import tensorflow as tf

    # Threads are fixed once per process (the stage does it first thing); here only the
    # determinism switch matters, and fit() seeds itself.
    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 200).astype(np.uint8)
    x = np.zeros((200, 28, 28), np.float32)
    x[np.arange(200), y, y] = 1.0  # digit d lights pixel (d, d)
    data = {"x_train": x[:160], "y_train": y[:160], "x_val": x[160:], "y_val": y[160:]}
    cfg = train.validate(train_params(epochs=8, learning_rate=0.01))
    first = train.fit(cfg, dict(data), tmp_path / "curves")
    acc = (first.predict(x[160:], verbose=0).argmax(1) == y[160:]).mean()
    assert acc > 0.9
    second = train.fit(cfg, dict(data), tmp_path / "curves2")
    for a, b in zip(first.get_weights(), second.get_weights()):
        assert np.array_equal(a, b)
    lines = (tmp_path / "curves/plots/metrics/train/loss.tsv").read_text().splitlines()
    losses = [float(line.split("\t")[1]) for line in lines[1:]]
    assert len(losses) == 8 and losses[-1] < losses[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mlp", "cnn", "cnn_large"])
def test_models_map_images_to_ten_probabilities_and_save_byte_stably(name, tmp_path):
    import keras

    from stages import models

    model = models.build(name)
    x = np.random.default_rng(0).random((4, 28, 28), dtype=np.float32)
    probs = model.predict(x, verbose=0)
    assert probs.shape == (4, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)
    models.save_stable(model, tmp_path / "a.keras")
    models.save_stable(model, tmp_path / "b.keras")
    assert (tmp_path / "a.keras").read_bytes() == (tmp_path / "b.keras").read_bytes()
    loaded = keras.models.load_model(tmp_path / "a.keras")
    assert np.array_equal(loaded.predict(x, verbose=0), probs)


def test_mlp_is_the_original_network():
    from stages import models

    model = models.build("mlp")
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["Flatten", "Dense", "Dropout", "Dense"]
    assert model.layers[1].units == 128 and model.layers[1].activation.__name__ == "relu"
    assert model.layers[2].rate == 0.2
    assert model.layers[3].units == 10 and model.layers[3].activation.__name__ == "softmax"
    assert model.count_params() == 784 * 128 + 128 + 128 * 10 + 10


def test_label_smoothing_moves_the_loss_minimum_to_the_smoothed_targets():
    labels = np.array([3, 7], np.int32)
    sure = np.full((2, 10), 1e-6, np.float32)
    sure[[0, 1], labels] = 1 - 9e-6
    smooth = np.full((2, 10), 0.01, np.float32)
    smooth[[0, 1], labels] = 0.91

    plain = train.training_loss(0.0)
    assert float(plain(labels, sure)) < 1e-4 < float(plain(labels, smooth))
    smoothed = train.training_loss(0.1)
    # Minimal (the targets' entropy) at 0.91 / 0.01 exactly; higher when over-confident.
    entropy = -(0.91 * np.log(0.91) + 9 * 0.01 * np.log(0.01))
    assert np.isclose(float(smoothed(labels, smooth)), entropy, atol=1e-5)
    assert float(smoothed(labels, sure)) > entropy + 0.5
    # Smoothed towards each image's own label: the same shape one class over costs dearly.
    assert float(smoothed(labels, np.roll(smooth, 1, axis=1))) > entropy + 3


def _digits(n=6):
    with np.load(FIXTURE) as f:
        return (f["x_train"][:n] / 255).astype(np.float32)


def _warp(images, u, rotation=0.0, shift=0.0, zoom=0.0):
    import tensorflow as tf

    from stages.augment import affine_params, warp

    u = tf.constant(np.broadcast_to(np.asarray(u, np.float32)[:, None], (5, len(images))))
    return warp(tf.constant(images), affine_params(u, 28, rotation, shift, zoom)).numpy()


def test_affine_map_moves_rotates_and_zooms_as_documented():
    x = _digits()
    # u = 1 with shift 1/28 of the side: exactly one pixel right and one down.
    moved = np.zeros_like(x)
    moved[:, 1:, 1:] = x[:, :-1, :-1]
    assert np.array_equal(_warp(x, [0, 0, 0, 1, 1], shift=1 / 28), moved)
    # A quarter turn about the centre is np.rot90, up to float rounding of cos(90°).
    assert np.allclose(_warp(x, [1, 0, 0, 0, 0], rotation=90), np.rot90(x, 1, (1, 2)), atol=1e-5)
    # Zooming in by 1.25 on both axes spreads the ink: more lit pixels, same centre.
    big = _warp(x, [0, 1, 1, 0, 0], zoom=0.25)
    assert ((big > 0.5).sum((1, 2)) > (x > 0.5).sum((1, 2))).all()
    rows = np.arange(28)[None, :, None]
    centre = lambda a: (a * rows).sum((1, 2)) / a.sum((1, 2))  # noqa: E731
    assert np.allclose(centre(big), centre(x), atol=1.0)


def test_augment_is_seeded_stays_in_range_and_is_off_at_zero():
    import tensorflow as tf

    from stages.augment import augment

    x = tf.constant(_digits())
    assert augment(x, tf.constant([1, 2], tf.int64), 0.0, 0.0, 0.0) is x
    a = augment(x, tf.constant([1, 2], tf.int64), 10.0, 0.1, 0.1).numpy()
    b = augment(x, tf.constant([1, 2], tf.int64), 10.0, 0.1, 0.1).numpy()
    c = augment(x, tf.constant([1, 3], tf.int64), 10.0, 0.1, 0.1).numpy()
    assert a.shape == x.shape and np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() >= 0.0 and a.max() <= 1.0
    # Each image gets its own draw, and none is left as it was.
    assert all(not np.array_equal(a[i], x.numpy()[i]) for i in range(len(a)))


def test_renumbered_shared_ids_keep_their_links():
    from stages.models import _renumber_shared_ids

    config = {"a": {"shared_object_id": 987}, "b": [{"shared_object_id": 123},
                                                    {"shared_object_id": 987}]}
    assert _renumber_shared_ids(config) == {
        "a": {"shared_object_id": 1}, "b": [{"shared_object_id": 2}, {"shared_object_id": 1}]}


# --- evaluate ------------------------------------------------------------------------


def test_confusion_counts_true_rows_and_predicted_columns():
    matrix = evaluate.confusion(np.array([0, 0, 1, 2]), np.array([0, 1, 1, 1]))
    assert matrix[0, 0] == 1 and matrix[0, 1] == 1 and matrix[1, 1] == 1 and matrix[2, 1] == 1
    assert matrix.sum() == 4 and matrix.shape == (10, 10)


def test_metrics_precision_recall_and_errors():
    y = np.array([0, 0, 1, 1])
    probs = np.eye(10, dtype=np.float32)[[0, 1, 1, 1]]
    m = evaluate.metrics(y, probs, loss=0.5)
    assert m["accuracy"] == 0.75 and m["errors"] == 1 and m["samples"] == 4
    assert m["per_class"]["0"] == {"precision": 1.0, "recall": 0.5, "errors": 1}
    assert m["per_class"]["1"]["precision"] == round(2 / 3, 6)
    assert m["per_class"]["5"] == {"precision": 0.0, "recall": 0.0, "errors": 0}


def test_misclassified_lists_index_true_predicted_confidence_by_index():
    y = np.array([3, 1, 4, 1])
    probs = np.full((4, 10), 0.01, np.float32)
    probs[0, 3] = probs[1, 7] = probs[2, 4] = probs[3, 2] = 0.91
    rows = evaluate.misclassified(y, probs)
    assert [r[:3] for r in rows] == [(1, 1, 7), (3, 1, 2)]
    assert rows[0][3] == "0.910000"


def test_cross_entropy_matches_keras():
    import keras

    rng = np.random.default_rng(1)
    probs = rng.random((50, 10)).astype(np.float32)
    probs /= probs.sum(1, keepdims=True)
    y = rng.integers(0, 10, 50)
    expected = float(keras.losses.SparseCategoricalCrossentropy()(y, probs))
    assert evaluate.cross_entropy(y, probs) == pytest.approx(expected, rel=1e-5)


def test_listing_is_the_original_format():
    images = np.zeros((3, 28, 28), np.float32)
    text = evaluate.listing([(2, 5, 6, "0.9")], images)
    assert text.splitlines()[0] == "index 2: predicted 6, true 5"
    assert len(text.splitlines()) == 29
