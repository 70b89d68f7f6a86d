"""stages/training/augment.py: the geometry of the seeded rotations, shifts and zooms, as each
framework's resampling (the warp() of keras/resample.py and torch/resample.py) applies it."""

from __future__ import annotations

import numpy as np
import pytest

from stages.training.augment import affine_rows, is_off
from tests.digits import fixture_data

FRAMEWORKS = ("keras", "torch")


def _digits(n=6):
    return (fixture_data()["x_train"][:n] / 255).astype(np.float32)


def rows(u, n, rotation=0.0, shift=0.0, zoom=0.0) -> np.ndarray:
    """The affine rows [n, 6] for draws u (one value per draw, shared by every image)."""
    u = np.broadcast_to(np.asarray(u, np.float32)[:, None], (5, n))
    return np.stack(affine_rows(u, 28, rotation, shift, zoom, np.cos, np.sin), 1).astype(
        np.float32)


def warp(framework: str, images: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Each framework's own resampling op on the same images and maps."""
    if framework == "keras":
        from stages.frameworks.keras.resample import tf, warp

        transforms = np.concatenate([affine, np.zeros((len(affine), 2), np.float32)], 1)
        return warp(tf.constant(images), tf.constant(transforms)).numpy()
    from stages.frameworks.torch.resample import torch, warp

    return warp(torch.from_numpy(images), torch.from_numpy(affine)).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_affine_map_moves_rotates_and_zooms_as_documented(framework):
    x = _digits()
    # u = 1 with shift 1/28 of the side: exactly one pixel right and one down.
    moved = np.zeros_like(x)
    moved[:, 1:, 1:] = x[:, :-1, :-1]
    # (Exact in TensorFlow; PyTorch goes through grid units, -1..1: rounding, ~2e-6.)
    assert np.allclose(warp(framework, x, rows([0, 0, 0, 1, 1], 6, shift=1 / 28)), moved,
                       atol=1e-5)
    # A quarter turn about the centre is np.rot90, up to float rounding of cos(90°).
    assert np.allclose(warp(framework, x, rows([1, 0, 0, 0, 0], 6, rotation=90)),
                       np.rot90(x, 1, (1, 2)), atol=1e-5)
    # Zooming in by 1.25 on both axes spreads the ink: more lit pixels, same centre.
    big = warp(framework, x, rows([0, 1, 1, 0, 0], 6, zoom=0.25))
    assert ((big > 0.5).sum((1, 2)) > (x > 0.5).sum((1, 2))).all()
    lines = np.arange(28)[None, :, None]

    def centre(a):
        return (a * lines).sum((1, 2)) / a.sum((1, 2))

    assert np.allclose(centre(big), centre(x), atol=1.0)


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_the_identity_draw_leaves_images_as_they_are(framework):
    x = _digits()
    out = warp(framework, x, rows([0, 0, 0, 0, 0], 6, rotation=30, shift=0.2, zoom=0.2))
    assert np.allclose(out, x, atol=1e-5)


def test_both_frameworks_resample_the_same_map_to_the_same_pixels():
    """TensorFlow's ImageProjectiveTransformV3 and PyTorch's affine_grid + grid_sample,
    both bilinear with black outside: the same augmentation, to float rounding."""
    x = _digits(64)
    u = np.random.default_rng(0).uniform(-1, 1, (5, 64)).astype(np.float32)
    affine = np.stack(affine_rows(u, 28, 15.0, 0.15, 0.15, np.cos, np.sin), 1).astype(
        np.float32)
    keras_out, torch_out = warp("keras", x, affine), warp("torch", x, affine)
    assert not np.allclose(keras_out, x, atol=0.1)  # the maps really moved the digits
    assert np.abs(keras_out - torch_out).max() < 1e-4


def test_augmentation_is_off_only_when_all_three_are_zero():
    assert is_off(0.0, 0.0, 0.0)
    assert not any(is_off(*r) for r in ((10.0, 0, 0), (0, 0.1, 0), (0, 0, 0.1)))


def test_the_blur_keeps_a_constant_away_from_the_edges_and_smooths_noise():
    from stages.training.augment import gaussian

    blur = gaussian(28, 4.0)
    assert np.array_equal(blur, blur.T)
    flat = blur @ np.ones((28, 28), np.float32) @ blur
    assert np.allclose(flat[12:16, 12:16], 1.0, atol=5e-3)  # 3 sigma from every edge
    assert flat[0, 0] < 0.5  # zeros beyond the edges
    noise = np.random.default_rng(0).uniform(-1, 1, (28, 28)).astype(np.float32)
    smooth = blur @ noise @ blur
    # Neighbours move together: the field changes far less from pixel to pixel.
    assert np.abs(np.diff(smooth, axis=1)).mean() < 0.1 * np.abs(np.diff(noise, axis=1)).mean()


def test_displacements_scale_with_alpha_and_vanish_at_zero():
    from stages.training.augment import displacements, gaussian

    u = np.random.default_rng(1).uniform(-1, 1, (2, 3, 28, 28)).astype(np.float32)
    blur = gaussian(28, 4.0)
    dx, dy = displacements(u, blur, 34.0)
    assert dx.shape == dy.shape == (3, 28, 28) and not np.allclose(dx, dy)
    assert not np.any(displacements(u, blur, 0.0)[0])
    assert np.allclose(displacements(u, blur, 17.0)[1], dy / 2, atol=1e-5)
    # Simard's alpha 34, sigma 4: a pixel or so in the middle of the image.
    assert 0.5 < np.sqrt((dx[:, 8:20, 8:20] ** 2).mean()) < 3


def elastic(framework: str, images: np.ndarray, seed: int, alpha: float) -> np.ndarray:
    """Each framework's augment with elastic distortion only."""
    if framework == "keras":
        from stages.frameworks.keras.resample import augment, tf

        return augment(tf.constant(images), tf.constant([seed, 0], tf.int64), 0.0, 0.0, 0.0,
                       alpha, 4.0).numpy()
    from stages.frameworks.torch.resample import augment, torch

    return augment(torch.from_numpy(images), torch.Generator().manual_seed(seed), 0.0, 0.0,
                   0.0, alpha, 4.0).numpy()


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_elastic_distortion_bends_strokes_keeps_the_ink_and_is_seeded(framework):
    x = _digits(32)
    a, b, c = (elastic(framework, x, seed, 34.0) for seed in (1, 1, 2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() >= 0.0 and a.max() <= 1.0 + 1e-6
    assert all(not np.array_equal(a[i], x[i]) for i in range(len(x)))
    # Strokes stretch here and bunch up there: each digit keeps most of its ink, and the
    # batch as a whole about all of it.
    kept = a.sum((1, 2)) / x.sum((1, 2))
    assert ((0.6 < kept) & (kept < 1.4)).all() and abs(a.sum() / x.sum() - 1) < 0.1
    # Stronger alpha, bigger change.
    assert np.abs(elastic(framework, x, 1, 8.0) - x).mean() < np.abs(a - x).mean()


def test_both_frameworks_draw_elastic_distortions_of_the_same_size():
    x = _digits(64)
    change = [np.abs(elastic(framework, x, 1, 34.0) - x).mean() for framework in FRAMEWORKS]
    assert change[0] == pytest.approx(change[1], rel=0.15)


def test_keras_sampling_at_an_affine_grid_is_its_affine_warp():
    """The elastic path's bilinear sampler (stages.frameworks.keras.resample.sample) reads the
    image exactly as TensorFlow's own op does for an affine map."""
    from stages.frameworks.keras.resample import sample, tf

    x = _digits()
    u = np.random.default_rng(2).uniform(-1, 1, (5, 6)).astype(np.float32)
    affine = np.stack(affine_rows(u, 28, 20.0, 0.2, 0.2, np.cos, np.sin), 1).astype(np.float32)
    a0, a1, a2, b0, b1, b2 = (affine[:, i, None, None] for i in range(6))
    cols, lines = np.arange(28, dtype=np.float32)[None, None], np.arange(28, dtype=np.float32)[
        None, :, None]
    got = sample(tf.constant(x), tf.constant(a0 * cols + a1 * lines + a2),
                 tf.constant(b0 * cols + b1 * lines + b2)).numpy()
    assert np.allclose(got, warp("keras", x, affine), atol=1e-6)
