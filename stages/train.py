"""Stage 3: fit the network `train.model` names, with its recipe, in `train.framework`
-> the model and curves.

The recipe (`train.<model>` in params.yaml) says how: epochs, batch size, learning rate
and schedule, augmentation, label smoothing, and the share of the training set held out
for validation, split here with the run's seed. Only that split steers training (best
epoch); the test set is never seen here. The framework (Keras, PyTorch or C) trains it
through its Trainer (stages/frameworks/trainers.py: fit, and the network's save); every
source of randomness is seeded and its kernels run deterministically on a pinned number of
threads, so the same params on the same machine give the same bits.

train_and_save() is the training in one process; launch_workers() runs it as PyTorch's
data-parallel workers when train.torch.workers asks for more than one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from stages.data.mnist import load_processed, validation_split
from stages.frameworks import RUN_INFO
from stages.frameworks.trainers import trainer
from stages.runtime import params
from stages.runtime.failures import DataError, deferred_interrupts, run, stop_if_interrupted
from stages.runtime.machine import cpu_model
from stages.runtime.outputs import atomic_dir
from stages.training.distributed import leave, world


def run_info(cfg: params.TrainConfig, framework_versions: dict, model_file: str) -> dict:
    """What the model is and what its bits depend on, so a differing rerun can be explained."""
    info = {
        "framework": cfg.framework,
        "model": cfg.model,
        "model_file": model_file,
        "device": cfg.device,
        "workers": cfg.workers,
        "python": platform.python_version(),
        "numpy": np.__version__,
        **framework_versions,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "seed": cfg.seed,
    }
    # The thread counts where they are the framework's own settings (not C's: its bits do
    # not depend on them).
    own = params.FRAMEWORK_KEYS[cfg.framework]
    return info | {key: getattr(cfg, key) for key in (*params.THREAD_KEYS, "program")
                   if key in own}


def train_and_save(cfg: params.TrainConfig, args) -> None:
    """Train in this process and write the model and its curves: the whole stage with one
    worker, one worker's share with several (the first one writes, the others only train).
    stop_if_interrupted() marks where Ctrl-C may end it."""
    rank, size, local = world()
    if size != cfg.workers:
        raise DataError(f"started as one of {size} workers, but train.torch.workers is "
                        f"{cfg.workers}: every machine must run the same params.yaml")
    # The machine's threads shared between its workers (at least one each).
    cfg = dataclasses.replace(cfg, intra_op_threads=max(1, cfg.intra_op_threads // local))
    data = load_processed(args.data, only=("x_train", "y_train"))
    train_idx, val_idx = validation_split(len(data["y_train"]), cfg.val_fraction, cfg.seed)
    x, y = data.pop("x_train"), data.pop("y_train")
    data = {"x_train": x[train_idx], "y_train": y[train_idx],
            "x_val": x[val_idx], "y_val": y[val_idx]}
    del x, y
    if rank == 0:
        print(f"train: {cfg.model} in {cfg.framework} on {len(train_idx)} images, "
              f"{len(val_idx)} held out for validation", flush=True)
    stop_if_interrupted()

    framework = trainer(cfg.framework)  # imports the framework (seconds)
    framework.network.configure(cfg.seed, cfg.intra_op_threads, cfg.inter_op_threads)
    stop_if_interrupted()
    started = time.perf_counter()
    if rank:  # a worker other than the first: it trains, and writes nothing
        framework.fit(cfg, data, None)
        leave(size)
        return
    # Curves and model are built aside and swapped in only when training completed, so an
    # interrupted run leaves the previous model and its own curves in place.
    with atomic_dir(args.curves) as curves:
        model = framework.fit(cfg, data, curves)
        seconds = time.perf_counter() - started
        with atomic_dir(args.model_dir) as tmp:
            framework.network.save(model, tmp)
            info = run_info(cfg, framework.network.versions(), framework.network.model_file)
            (tmp / RUN_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
            # The last stopping point: past it, the complete outputs are being moved in
            # (two renames), and a late Ctrl-C lets the run finish rather than lie.
            stop_if_interrupted()
    print(f"train: {cfg.model} for {cfg.epochs} epochs in {seconds:.1f}s "
          f"-> {args.model_dir}")
    leave(size)


def launch_workers(cfg: params.TrainConfig, args, argv: list[str]) -> None:
    """More than one worker (train.torch.workers): start them, each running this same
    command (train_and_save in each), and wait for them all."""
    print(f"train: {cfg.model} in {cfg.framework} on {cfg.workers} workers "
          "(torch.distributed)", flush=True)
    trainer(cfg.framework).launch(cfg, argv)
    print(f"train: {cfg.model} for {cfg.epochs} epochs on {cfg.workers} "
          f"workers -> {args.model_dir}")


def main(argv=None) -> None:
    """`python -m stages.train --data ... --model-dir ... --curves ...`.

    From main()'s first line, Ctrl-C (or SIGTERM) only takes note, and the run stops at the
    next stop_if_interrupted() in its own code: an interrupt never lands inside TensorFlow
    or PyTorch (where it would surface as a traceback from inside the library). It ends the
    run with `error: interrupted; no output was replaced`, exit 130 (143 for SIGTERM). Worst-case
    delay: the longest stretch between two stopping points, i.e. importing the framework,
    Keras' first chunk (which also traces the graph), one chunk of
    speed.keras_steps_per_execution batches in Keras or one batch in PyTorch, one epoch's
    validation pass, or saving. A second Ctrl-C stops at once, with the same line (see
    failures.deferred_interrupts). Before main() (Python's start and this module's
    imports, no framework) Python's default Ctrl-C still applies.
    """
    with deferred_interrupts():
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--data", required=True, help="normalize's scaled arrays (.npz)")
        parser.add_argument("--model-dir", required=True, type=Path, help="the trained model")
        parser.add_argument("--curves", required=True, type=Path, help="dvclive's curves")
        argv = sys.argv[1:] if argv is None else argv
        args = parser.parse_args(argv)
        cfg = params.load()["train"]
        if cfg.workers > 1 and "RANK" not in os.environ:  # the stage itself, not a worker
            launch_workers(cfg, args, argv)
        else:
            train_and_save(cfg, args)


if __name__ == "__main__":
    run(main)
