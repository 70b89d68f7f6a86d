"""The augmentation's resampling in TensorFlow: each image through its own affine map (and,
with `elastic`, a smooth random displacement field), bilinear, black outside the image.

The maps themselves come from stages/training/augment.py, the same distribution PyTorch's
loop draws from; the draws here are stateless, from (seed, step), inside the compiled step.
"""

from __future__ import annotations

from stages.frameworks.keras.env import tf
from stages.training.augment import DRAWS, affine_rows, displacements, gaussian, is_off


def warp(images, transforms):
    """Resample each image [n, side, side] through its row of 8 projective `transforms`
    (bilinear, black outside the image)."""
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=images[..., None], transforms=transforms,
        output_shape=tf.shape(images)[1:3], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT")
    return out[..., 0]


def sample(images, xs, ys):
    """Bilinear samples of images [n, side, side] at columns xs and rows ys (each [n, side,
    side], in pixels), black outside the image, as warp() samples."""
    side = images.shape[1]
    wide = side + 2  # with the black border outside
    pixels = tf.reshape(tf.pad(images, [[0, 0], [1, 1], [1, 1]]), [-1])
    first = tf.range(tf.shape(images)[0])[:, None, None] * wide * wide
    x0, y0 = tf.floor(xs), tf.floor(ys)
    wx, wy = xs - x0, ys - y0

    def at(rows, cols):
        # A flat index: gather_nd's batch_dims logs a oneDNN fallback line on stderr.
        rows, cols = (tf.cast(tf.clip_by_value(v, -1.0, float(side)), tf.int32) + 1
                      for v in (rows, cols))
        return tf.gather(pixels, first + rows * wide + cols)

    return ((1 - wy) * ((1 - wx) * at(y0, x0) + wx * at(y0, x0 + 1))
            + wy * ((1 - wx) * at(y0 + 1, x0) + wx * at(y0 + 1, x0 + 1)))


def augment(images, seed, rotation: float, shift: float, zoom: float,
            elastic: float = 0.0, elastic_sigma: float = 4.0):
    """Images [n, side, side] in [0, 1] -> the same shape, each randomly rotated, zoomed,
    shifted and (elastic > 0) elastically distorted; `seed` is a shape-[2] int tensor (run
    seed and step number): the draws of a step depend on nothing else."""
    if is_off(rotation, shift, zoom, elastic):
        return images
    n, side = tf.shape(images)[0], images.shape[1]
    u = tf.random.stateless_uniform((DRAWS, n), seed, -1.0, 1.0)
    rows = affine_rows(u, side, rotation, shift, zoom, tf.cos, tf.sin)
    if not elastic:  # an affine map only: TensorFlow's own resampling op
        zero = tf.zeros_like(rows[0])
        return warp(images, tf.stack([*rows, zero, zero], axis=1))
    noise = tf.random.stateless_uniform(
        (2, n, side, side), tf.random.experimental.stateless_fold_in(seed, 1), -1.0, 1.0)
    dx, dy = displacements(noise, tf.constant(gaussian(side, elastic_sigma)), elastic)
    a0, a1, a2, b0, b1, b2 = (r[:, None, None] for r in rows)
    pixels = tf.range(side, dtype=tf.float32)
    cols, lines = pixels[None, None, :], pixels[None, :, None]
    return sample(images, a0 * cols + a1 * lines + a2 + dx, b0 * cols + b1 * lines + b2 + dy)
