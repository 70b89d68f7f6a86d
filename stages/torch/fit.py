"""Training in PyTorch: an explicit loop over batches, as in pytorch/examples' mnist.

`fit(cfg, data, curves_dir)` trains the network `cfg["model"]` names with its recipe and
returns the module, on the CPU. The stage (stages/train.py) has already split the data,
seeded everything and pinned the threads (stages/torch/env.py). Same recipe, same rules
as stages/keras/fit.py: the same batches in the same order (stages/training.py), Adam
with Keras' epsilon, the same cosine decay per step, label smoothing over the 10 classes,
and augmentation drawn from the same distribution of affine maps (stages/augment.py).
"""

from __future__ import annotations

import copy
import sys
import time

import numpy as np
from tqdm import tqdm

from stages.augment import DRAWS, affine_rows, is_off
from stages.errors import stop_if_interrupted
from stages.torch.env import device, torch
from stages.torch.model import build
from stages.training import BestEpoch, Curves, batches

F = torch.nn.functional
KERAS_ADAM_EPSILON = 1e-7  # PyTorch's default is 1e-8


def warp(images, rows):
    """Resample each image [n, side, side] through its affine map, one row (a0, a1, a2,
    b0, b1, b2) per image in pixel units: bilinear, black outside the image."""
    n, side = images.shape[0], images.shape[-1]
    a0, a1, a2, b0, b1, b2 = rows.unbind(1)
    # The same map in grid_sample's units: -1 and 1 are the centres of the edge pixels.
    c = (side - 1) / 2
    theta = torch.stack([torch.stack([a0, a1, a0 + a1 + a2 / c - 1], 1),
                         torch.stack([b0, b1, b0 + b1 + b2 / c - 1], 1)], 1)
    grid = F.affine_grid(theta, [n, 1, side, side], align_corners=True)
    return F.grid_sample(images.unsqueeze(1), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=True).squeeze(1)


def augment(images, generator, rotation: float, shift: float, zoom: float):
    """Images [n, side, side] in [0, 1] -> each randomly rotated, zoomed and shifted, with
    draws from `generator` (a CPU generator of its own, seeded by the run's seed)."""
    if is_off(rotation, shift, zoom):
        return images
    u = (torch.rand((DRAWS, len(images)), generator=generator) * 2 - 1).to(images.device)
    rows = affine_rows(u, images.shape[-1], rotation, shift, zoom, torch.cos, torch.sin)
    return warp(images, torch.stack(rows, 1))


def train_epoch(model, optimizer, scheduler, x, y, order, cfg, generator, bar=None):
    """One pass over the batches of `order`; returns the summed plain cross-entropy of the
    training batches and the number of hits (both with augmentation and dropout on)."""
    model.train()
    loss_sum = torch.zeros((), device=x.device)
    hits = torch.zeros((), device=x.device, dtype=torch.int64)
    for idx in order:
        idx = torch.from_numpy(idx).to(x.device)
        data = augment(x[idx], generator, cfg["rotation"], cfg["shift"], cfg["zoom"])
        target = y[idx]
        optimizer.zero_grad()
        output = model(data)
        loss = F.cross_entropy(output, target, label_smoothing=cfg["label_smoothing"])
        loss.backward()
        optimizer.step()
        if scheduler:
            scheduler.step()
        with torch.no_grad():
            # Logged: plain cross-entropy, the quantity the validation loss is (the smoothed
            # objective has a floor above 0 and would show a gap that is not there).
            plain = F.cross_entropy(output, target) if cfg["label_smoothing"] else loss
            loss_sum += plain * len(target)
            hits += (output.argmax(1) == target).sum()
        if bar:
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        # Between two batches: plain Python, never inside a PyTorch call.
        stop_if_interrupted()
    return float(loss_sum), int(hits)


@torch.inference_mode()
def evaluate(model, x, y, batch_size: int = 1000) -> dict:
    """Mean cross-entropy and accuracy on held-out images, dropout off, BatchNorm frozen."""
    model.eval()
    loss_sum, hits = 0.0, 0
    for start in range(0, len(y), batch_size):
        output = model(x[start:start + batch_size])
        target = y[start:start + batch_size]
        loss_sum += F.cross_entropy(output, target, reduction="sum").item()
        hits += (output.argmax(1) == target).sum().item()
    return {"loss": loss_sum / len(y), "accuracy": hits / len(y)}


def fit(cfg: dict, data: dict, curves_dir):
    """Train for cfg["epochs"], logging curves with dvclive into curves_dir; returns the
    trained module on the CPU.

    data holds x_train, y_train and x_val, y_val (possibly empty); PyTorch shares the
    arrays' memory (no copy on the CPU). Under deferred_interrupts, Ctrl-C stops it
    between two batches.
    """
    where = device(cfg["device"])
    torch.manual_seed(cfg["seed"])  # initial weights and dropout
    # channels_last: oneDNN's convolutions run a third faster on it than on NCHW.
    model = build(cfg["model"]).to(where, memory_format=torch.channels_last)
    x = torch.from_numpy(data.pop("x_train")).to(where)
    y = torch.from_numpy(data.pop("y_train").astype(np.int64)).to(where)
    x_val = torch.from_numpy(data.pop("x_val")).to(where)
    y_val = torch.from_numpy(data.pop("y_val").astype(np.int64)).to(where)
    n = len(y)
    steps_per_epoch = -(-n // cfg["batch_size"])
    # fused: one kernel for every parameter's update (PyTorch's default loops over them).
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg["learning_rate"],
                                 eps=KERAS_ADAM_EPSILON, fused=True)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=cfg["epochs"] * steps_per_epoch)
        if cfg["lr_schedule"] == "cosine" else None)
    rng = np.random.default_rng(cfg["seed"])  # batch order: the same rule in every framework
    generator = torch.Generator().manual_seed(cfg["seed"])  # augmentation draws
    best = BestEpoch(cfg["restore_best"])
    curves = Curves(curves_dir, cfg["epochs"])
    tty = sys.stdout.isatty()
    for epoch in range(1, cfg["epochs"] + 1):
        started = time.perf_counter()
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}", leave=False) if tty else None
        loss_sum, hits = train_epoch(model, optimizer, scheduler, x, y,
                                     batches(n, cfg["batch_size"], rng), cfg, generator, bar)
        if bar:
            bar.close()
        logs = {"train/loss": loss_sum / n}
        if len(y_val):
            # The validation split steers training; the test set is never seen here.
            val = evaluate(model, x_val, y_val)
            logs |= {"eval/loss": val["loss"], "eval/accuracy": val["accuracy"]}
            best.offer(epoch, val["accuracy"], lambda: copy.deepcopy(model.state_dict()))
        curves.epoch(epoch, time.perf_counter() - started, logs, hits / n)
        stop_if_interrupted()
    curves.close(validated=bool(len(y_val)))
    best.restore(cfg["epochs"], model.load_state_dict)
    return model.cpu()
