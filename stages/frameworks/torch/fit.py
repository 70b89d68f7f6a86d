"""Training in PyTorch: an explicit loop over batches, as in pytorch/examples' mnist.

`fit(cfg, data, curves_dir)` trains the network `cfg.model` names with its recipe and
returns the module, on the CPU. The stage (stages/train.py) has already split the data,
seeded everything and pinned the threads (env.py). Same recipe, same rules as Keras' loop:
the same batches in the same order (stages/training/epochs.py), Adam with Keras' epsilon,
the same cosine decay per step, label smoothing over the 10 classes, and augmentation drawn
from the same distribution of affine maps (resample.py, on stages/training/augment.py).

With `train.torch.workers` N > 1 the same loop runs data-parallel in N processes
(DistributedDataParallel over torch.distributed; gloo on the CPU, nccl on GPUs), started by
torch.distributed's own launcher (launcher.py, or torchrun on other machines). The recipe
keeps its meaning: every step is one global batch of `batch_size` images in the same order
as with one process; each worker takes an equal contiguous share of it and DDP averages the
gradients, so Adam takes the same steps with the same learning rate. Only rank 0
evaluates, reports and returns the model.
"""

from __future__ import annotations

import copy
import datetime
import os
import sys
import time

import numpy as np
from tqdm import tqdm

from stages.frameworks.torch.env import device, torch
from stages.frameworks.torch.launcher import (
    interface_towards,
    lost_worker,
    silent_worker,
    where_workers,
)
from stages.frameworks.torch.model import build
from stages.frameworks.torch.resample import augment
from stages.runtime.failures import PipelineError, stop_if_interrupted
from stages.runtime.params import TrainConfig
from stages.training.distributed import world
from stages.training.epochs import BestEpoch, Curves, batches

F = torch.nn.functional
KERAS_ADAM_EPSILON = 1e-7  # PyTorch's default is 1e-8


def train_epoch(model, optimizer, scheduler, x, y, order, cfg, generator, bar=None,
                rank: int = 0, size: int = 1, average=None):
    """One pass over the batches of `order`; returns the summed plain cross-entropy of this
    worker's training images and its number of hits (both with augmentation and dropout
    on)."""
    model.train()
    loss_sum = torch.zeros((), device=x.device)
    hits = torch.zeros((), device=x.device, dtype=torch.int64)
    for batch in order:
        idx = torch.from_numpy(share(batch, rank, size)).to(x.device)
        data = augment(x[idx], generator, cfg.rotation, cfg.shift, cfg.zoom,
                       cfg.elastic, cfg.elastic_sigma)
        target = y[idx]
        optimizer.zero_grad()
        output = model(data)
        loss = F.cross_entropy(output, target, label_smoothing=cfg.label_smoothing)
        if size > 1:
            # DDP averages the workers' gradients; weighting each worker's mean by its share
            # makes that average the gradient of the global batch's mean loss.
            loss = loss * (len(idx) * size / len(batch))
        loss.backward()
        optimizer.step()
        if scheduler:
            scheduler.step()
        if average:
            average.update_parameters(model)
        with torch.no_grad():
            # Logged: plain cross-entropy, the quantity the validation loss is (the smoothed
            # objective has a floor above 0 and would show a gap that is not there).
            plain = (loss if not cfg.label_smoothing and size == 1
                     else F.cross_entropy(output, target))
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


# Data-parallel wrappers kept until the process ends (see the end of fit).
ALIVE: list = []


def fit(cfg: TrainConfig, data: dict, curves_dir):
    """Train for cfg.epochs, logging curves with dvclive into curves_dir (rank 0; the
    others pass None); returns the trained module on the CPU.

    data holds x_train, y_train and x_val, y_val (possibly empty); PyTorch shares the
    arrays' memory (no copy on the CPU). Under deferred_interrupts, Ctrl-C stops it
    between two batches.
    """
    where = device(cfg.device)
    rank, size, _ = world()
    torch.manual_seed(cfg.seed)  # initial weights and dropout
    # channels_last: oneDNN's convolutions run faster on it than on NCHW.
    model = build(cfg.model).to(where, memory_format=torch.channels_last)
    net, where_ranks = model, []
    if size > 1:
        if where.type != "cuda":  # gloo's sockets: on the interface towards the rendezvous
            os.environ.setdefault("GLOO_SOCKET_IFNAME",
                                  interface_towards(os.environ["MASTER_ADDR"]))
        # A collective that waits longer than speed.peer_timeout for another machine
        # raises (gloo's default would wait 30 minutes on one that went silent).
        torch.distributed.init_process_group(
            "nccl" if where.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=cfg.peer_timeout))
        # Which machine each worker is on, to name one that stops answering.
        where_ranks = where_workers(rank, size)
        # Every worker starts from rank 0's weights (DDP broadcasts them) and draws its own
        # dropout masks and augmentation (rank 0 the same ones as a single process).
        torch.manual_seed(cfg.seed + 1_000_003 * rank)
        net = torch.nn.parallel.DistributedDataParallel(model)
    x = torch.from_numpy(data.pop("x_train")).to(where)
    y = torch.from_numpy(data.pop("y_train").astype(np.int64)).to(where)
    x_val = torch.from_numpy(data.pop("x_val")).to(where)
    y_val = torch.from_numpy(data.pop("y_val").astype(np.int64)).to(where)
    n = len(y)
    steps_per_epoch = -(-n // cfg.batch_size)
    # fused: one kernel for every parameter's update (PyTorch's default loops over them).
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.learning_rate,
                                 eps=KERAS_ADAM_EPSILON, fused=True)
    scheduler = (torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=cfg.epochs * steps_per_epoch)
        if cfg.lr_schedule == "cosine" else None)
    rng = np.random.default_rng(cfg.seed)  # batch order: the same rule as Keras'
    # augmentation draws
    generator = torch.Generator().manual_seed(cfg.seed + 1_000_003 * rank)
    # `ema`: PyTorch's own weight average, updated after every step; BatchNorm's running
    # statistics are averaged alongside (use_buffers), so the average is a complete model.
    average = (torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema),
        use_buffers=True) if cfg.ema else None)
    result = average.module if average else model  # what is validated and returned
    best = BestEpoch(cfg.restore_best and rank == 0)
    curves = Curves(curves_dir, cfg.epochs) if rank == 0 else None
    tty = sys.stdout.isatty() and rank == 0
    try:
        for epoch in range(1, cfg.epochs + 1):
            started = time.perf_counter()
            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}", leave=False) if tty else None
            loss_sum, hits = train_epoch(net, optimizer, scheduler, x, y,
                                         batches(n, cfg.batch_size, rng), cfg, generator, bar,
                                         rank, size, average)
            if bar:
                bar.close()
            if size > 1:  # the epoch's numbers over every worker's images
                totals = torch.tensor([loss_sum, float(hits)], dtype=torch.float64)
                torch.distributed.all_reduce(totals)
                loss_sum, hits = float(totals[0]), int(totals[1])
            if rank:
                stop_if_interrupted()
                continue
            logs = {"train/loss": loss_sum / n}
            if len(y_val):
                # The validation split steers training; the test set is never seen here.
                val = evaluate(result, x_val, y_val)
                logs |= {"eval/loss": val["loss"], "eval/accuracy": val["accuracy"]}
                best.offer(epoch, val["accuracy"], lambda: copy.deepcopy(result.state_dict()))
            curves.epoch(epoch, time.perf_counter() - started, logs, hits / n)
            stop_if_interrupted()
        if size > 1:
            torch.distributed.barrier()  # no worker leaves while another still needs it
            torch.distributed.destroy_process_group()
            # Never destroyed: the process group's destructor waits for gloo's thread while
            # holding the GIL, and deadlocks when that thread needs the GIL to free a
            # tensor (pytorch/pytorch#56297). The worker leaves by os._exit instead
            # (stages/training/distributed.py: leave).
            ALIVE.append(net)
    except RuntimeError as err:  # gloo's, when a worker on another machine stops answering
        lost = (lost_worker(str(err), where_ranks, rank)
                or silent_worker(str(err), where_ranks, rank, cfg.peer_timeout)
                if size > 1 else None)
        if lost is None:
            raise
        raise PipelineError(lost) from None
    if rank:
        return result.cpu()  # the same weights as rank 0's; the stage saves rank 0's only
    curves.close(validated=bool(len(y_val)))
    best.restore(cfg.epochs, result.load_state_dict)
    return result.cpu()


def share(idx: np.ndarray, rank: int, size: int) -> np.ndarray:
    """This worker's contiguous part of a global batch (parts differ by at most one image:
    the last, shorter batch of an epoch need not divide evenly)."""
    return np.array_split(idx, size)[rank]
