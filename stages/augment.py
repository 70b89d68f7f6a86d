"""Seeded augmentation for training: small random rotations, zooms and shifts.

All three are folded into one affine map per image and applied in a single bilinear
resampling: a third of the cost of three separate Keras layers (each resamples the
whole batch), and no interpolation blur compounded three times. It runs inside the
training step, outside the network, so the saved model is the plain classifier.

Randomness is stateless: the draws for a batch depend only on (seed, step number), so a
run is reproducible to the bit whatever else ran in the process before it.
"""

from __future__ import annotations

import math


def affine_params(u, side: int, rotation: float, shift: float, zoom: float):
    """Map uniform draws u in [-1, 1] of shape [5, n] to the 8-number projective transforms
    ImageProjectiveTransformV3 takes, one row per image.

    Each row sends an output pixel (x, y) to the input point it samples from: rotate by up
    to `rotation` degrees and scale each axis by 1 ± `zoom` about the image centre, then
    move by up to `shift` × side pixels.
    """
    import tensorflow as tf

    angle = u[0] * (rotation * math.pi / 180)
    scale_x, scale_y = 1 + u[1] * zoom, 1 + u[2] * zoom
    move_x, move_y = u[3] * (shift * side), u[4] * (shift * side)
    cos, sin = tf.cos(angle), tf.sin(angle)
    a0, a1 = cos / scale_x, -sin / scale_x
    b0, b1 = sin / scale_y, cos / scale_y
    centre = (side - 1) / 2
    a2 = centre - (a0 + a1) * centre - move_x
    b2 = centre - (b0 + b1) * centre - move_y
    zero = tf.zeros_like(a0)
    return tf.stack([a0, a1, a2, b0, b1, b2, zero, zero], axis=1)


def augment(images, seed, rotation: float, shift: float, zoom: float):
    """Images [n, side, side] in [0, 1] -> the same shape, each randomly rotated, zoomed and
    shifted; `seed` is a shape-[2] int tensor (e.g. run seed and step number)."""
    import tensorflow as tf

    if not (rotation or shift or zoom):
        return images
    n, side = tf.shape(images)[0], images.shape[1]
    u = tf.random.stateless_uniform((5, n), seed, -1.0, 1.0)
    return warp(images, affine_params(u, side, rotation, shift, zoom))


def warp(images, transforms):
    """Resample each image [n, side, side] through its row of `transforms` (bilinear,
    black outside the image)."""
    import tensorflow as tf

    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=images[..., None], transforms=transforms,
        output_shape=tf.shape(images)[1:3], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT")
    return out[..., 0]
