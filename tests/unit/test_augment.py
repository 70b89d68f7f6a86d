"""stages/augment.py: seeded rotations, shifts and zooms in one affine resampling."""

from __future__ import annotations

import numpy as np

from tests.helpers import fixture_data


def _digits(n=6):
    return (fixture_data()["x_train"][:n] / 255).astype(np.float32)


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

    def centre(a):
        return (a * rows).sum((1, 2)) / a.sum((1, 2))

    assert np.allclose(centre(big), centre(x), atol=1.0)


def test_the_identity_draw_leaves_images_as_they_are():
    x = _digits()
    assert np.array_equal(_warp(x, [0, 0, 0, 0, 0], rotation=30, shift=0.2, zoom=0.2), x)


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
