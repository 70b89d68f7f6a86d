"""stages/frameworks/keras/fit.py: the loss, the seeded augmentation and fitting, in Keras."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.digits import fixture_data, toy_digits
from tests.projects import train_cfg


def test_label_smoothing_moves_the_loss_minimum_to_the_smoothed_targets():
    from stages.frameworks.keras.fit import training_loss

    labels = np.array([3, 7], np.int32)
    sure = np.full((2, 10), 1e-6, np.float32)
    sure[[0, 1], labels] = 1 - 9e-6
    smooth = np.full((2, 10), 0.01, np.float32)
    smooth[[0, 1], labels] = 0.91

    plain = training_loss(0.0)
    assert float(plain(labels, sure)) < 1e-4 < float(plain(labels, smooth))
    smoothed = training_loss(0.1)
    # Minimal (the targets' entropy) at 0.91 / 0.01 exactly; higher when over-confident.
    entropy = -(0.91 * np.log(0.91) + 9 * 0.01 * np.log(0.01))
    assert np.isclose(float(smoothed(labels, smooth)), entropy, atol=1e-5)
    assert float(smoothed(labels, sure)) > entropy + 0.5
    # Smoothed towards each image's own label: the same shape one class over costs dearly.
    assert float(smoothed(labels, np.roll(smooth, 1, axis=1))) > entropy + 3


def test_augment_is_seeded_by_run_and_step_stays_in_range_and_is_off_at_zero():
    from stages.frameworks.keras.resample import augment, tf

    x = tf.constant((fixture_data()["x_train"][:6] / 255).astype(np.float32))
    assert augment(x, tf.constant([1, 2], tf.int64), 0.0, 0.0, 0.0) is x
    a = augment(x, tf.constant([1, 2], tf.int64), 10.0, 0.1, 0.1).numpy()
    b = augment(x, tf.constant([1, 2], tf.int64), 10.0, 0.1, 0.1).numpy()
    c = augment(x, tf.constant([1, 3], tf.int64), 10.0, 0.1, 0.1).numpy()
    assert a.shape == x.shape and np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() >= 0.0 and a.max() <= 1.0
    # Each image gets its own draw, and none is left as it was.
    assert all(not np.array_equal(a[i], x.numpy()[i]) for i in range(len(a)))


@pytest.mark.slow
def test_fit_learns_and_is_reproducible_in_process(tmp_path, monkeypatch):
    """A few steps on separable toy data: loss falls, and the same seed gives same weights."""
    monkeypatch.chdir(tmp_path)
    from stages.frameworks.keras.fit import fit, tf

    # Threads are fixed once per process (the stage does it first thing); here only the
    # determinism switch matters, and fit() seeds itself.
    tf.config.experimental.enable_op_determinism()
    data, x_val, y_val = toy_digits()
    cfg = dataclasses.replace(train_cfg(epochs=8, learning_rate=0.01, batch_size=8,
                                        val_fraction=0.2, restore_best=True),
                              steps_per_execution=4)
    first = fit(cfg, dict(data), tmp_path / "curves")
    acc = (first.predict(x_val, verbose=0).argmax(1) == y_val).mean()
    assert acc > 0.9
    # Another chunk length (speed.keras_steps_per_execution): the same bits, curves included.
    second = fit(dataclasses.replace(cfg, steps_per_execution=3), dict(data), tmp_path / "curves2")
    for a, b in zip(first.get_weights(), second.get_weights()):
        assert np.array_equal(a, b)
    for curve in ("train/loss.tsv", "eval/loss.tsv", "eval/accuracy.tsv"):
        assert ((tmp_path / "curves/plots/metrics" / curve).read_bytes()
                == (tmp_path / "curves2/plots/metrics" / curve).read_bytes())
    lines = (tmp_path / "curves/plots/metrics/train/loss.tsv").read_text().splitlines()
    losses = [float(line.split("\t")[1]) for line in lines[1:]]
    assert len(losses) == 8 and losses[-1] < losses[0]
    val = (tmp_path / "curves/plots/metrics/eval/accuracy.tsv").read_text().splitlines()
    assert len(val) == 1 + 8


def test_the_average_starts_at_the_weights_then_moves_by_one_minus_the_decay():
    from stages.frameworks.keras.average import Average
    from stages.frameworks.keras.model import build

    model = build("cnn")
    start = model.get_weights()
    average = Average(model, 0.75)
    average.update(True)
    model.set_weights([w + 4.0 for w in start])
    average.update(False)  # 0.75 start + 0.25 (start + 4)
    with average.swapped_in():
        # Every weight, BatchNorm's moving statistics included.
        assert len(model.get_weights()) == len(start) > len(model.trainable_variables)
        assert all(np.allclose(a, w + 1.0) for a, w in zip(model.get_weights(), start))
    assert all(np.array_equal(a, w + 4.0) for a, w in zip(model.get_weights(), start))
    average.put_in()
    assert all(np.allclose(a, w + 1.0) for a, w in zip(model.get_weights(), start))


def _last_validation(curves) -> float:
    lines = (curves / "plots/metrics/eval/accuracy.tsv").read_text().splitlines()
    return float(lines[-1].split("\t")[1])


@pytest.mark.slow
def test_with_ema_the_average_is_validated_and_returned(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from stages.frameworks.keras.fit import fit, tf

    tf.config.experimental.enable_op_determinism()
    data, x_val, y_val = toy_digits()
    cfg = dataclasses.replace(train_cfg(epochs=3, learning_rate=0.01, batch_size=8,
                                        val_fraction=0.2, ema=0.9), steps_per_execution=4)
    averaged = fit(cfg, dict(data), tmp_path / "ema")
    again = fit(cfg, dict(data), tmp_path / "ema2")
    trained = fit(dataclasses.replace(cfg, ema=0.0), dict(data), tmp_path / "plain")
    accuracy = (averaged.predict(x_val, verbose=0).argmax(1) == y_val).mean()
    assert accuracy == pytest.approx(_last_validation(tmp_path / "ema"))
    assert all(np.array_equal(a, b) for a, b in zip(averaged.get_weights(), again.get_weights()))
    # Same seed, same steps: only the average makes the difference.
    assert not np.array_equal(averaged.get_weights()[0], trained.get_weights()[0])
