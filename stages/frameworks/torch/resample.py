"""The augmentation's resampling in PyTorch: each image through its own affine map (and,
with `elastic`, a smooth random displacement field), bilinear, black outside the image.

The maps come from stages/training/augment.py, the same distribution Keras' loop draws
from; the draws here come from the loop's own seeded torch.Generator.
"""

from __future__ import annotations

from stages.frameworks.torch.env import torch
from stages.training.augment import DRAWS, affine_rows, displacements, gaussian, is_off

F = torch.nn.functional


def warp(images, rows, dx=None, dy=None):
    """Resample each image [n, side, side] through its affine map, one row (a0, a1, a2,
    b0, b1, b2) per image in pixel units, then moved by the field (dx, dy) [n, side, side]
    in pixels if given: bilinear, black outside the image."""
    n, side = images.shape[0], images.shape[-1]
    a0, a1, a2, b0, b1, b2 = rows.unbind(1)
    # The same map in grid_sample's units: -1 and 1 are the centres of the edge pixels.
    c = (side - 1) / 2
    theta = torch.stack([torch.stack([a0, a1, a0 + a1 + a2 / c - 1], 1),
                         torch.stack([b0, b1, b0 + b1 + b2 / c - 1], 1)], 1)
    grid = F.affine_grid(theta, [n, 1, side, side], align_corners=True)
    if dx is not None:
        grid = grid + torch.stack([dx, dy], -1) / c
    return F.grid_sample(images.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=True).squeeze(1)


def augment(images, generator, rotation: float, shift: float, zoom: float,
            elastic: float = 0.0, elastic_sigma: float = 4.0):
    """Images [n, side, side] in [0, 1] -> each randomly rotated, zoomed, shifted and
    (elastic > 0) elastically distorted, with draws from `generator` (a CPU generator of
    its own, seeded by the run's seed)."""
    if is_off(rotation, shift, zoom, elastic):
        return images
    n, side = images.shape[0], images.shape[-1]
    u = (torch.rand((DRAWS, n), generator=generator) * 2 - 1).to(images.device)
    rows = torch.stack(affine_rows(u, side, rotation, shift, zoom, torch.cos, torch.sin), 1)
    if not elastic:
        return warp(images, rows)
    noise = (torch.rand((2, n, side, side), generator=generator) * 2 - 1).to(images.device)
    blur = torch.from_numpy(gaussian(side, elastic_sigma)).to(images.device)
    return warp(images, rows, *displacements(noise, blur, elastic))
