"""stages/augment.py: the geometry of the seeded rotations, shifts and zooms, as each
framework's resampling (keras_fit.warp, torch_fit.warp) applies it."""

from __future__ import annotations

import numpy as np
import pytest

from stages.augment import affine_rows, is_off
from tests.helpers import fixture_data

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
        from stages.keras.fit import tf, warp

        transforms = np.concatenate([affine, np.zeros((len(affine), 2), np.float32)], 1)
        return warp(tf.constant(images), tf.constant(transforms)).numpy()
    from stages.torch.fit import torch, warp

    return warp(torch.from_numpy(images), torch.from_numpy(affine)).numpy()


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
