"""Stage 3: fit the network `train.model` names -> data/model/, reports/train/ (curves).

Every source of randomness is seeded and TensorFlow's ops run deterministically on a
pinned number of threads, so the same params on the same machine give the same bits.
Only the validation split steers training (best epoch); the test set is never seen here.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

from stages.common import (
    PROCESSED_KEYS,
    atomic_dir,
    check_keys,
    load_npz,
    load_params,
    param_bool,
    param_choice,
    param_float,
    param_int,
    run,
)

SECTION = "train"
DATA = "data/processed/mnist.npz"
MODEL_DIR = Path("data/model")
CURVES_DIR = "reports/train"
MODEL_NAMES = ("mlp", "cnn", "cnn_large")
KEYS = {
    "model", "epochs", "batch_size", "learning_rate", "lr_schedule", "seed",
    "rotation", "shift", "zoom", "restore_best", "steps_per_execution",
    "intra_op_threads", "inter_op_threads",
}


def validate(params: dict) -> dict:
    check_keys(params, SECTION, KEYS)
    s = SECTION
    return {
        "model": param_choice(params, s, "model", MODEL_NAMES),
        "epochs": param_int(params, s, "epochs", 1, 10_000),
        "batch_size": param_int(params, s, "batch_size", 1, 65_536),
        "learning_rate": param_float(params, s, "learning_rate", 1e-7, 10.0),
        "lr_schedule": param_choice(params, s, "lr_schedule", ("constant", "cosine")),
        "seed": param_int(params, s, "seed", 0, 2**31 - 1),
        "rotation": param_float(params, s, "rotation", 0.0, 180.0),
        "shift": param_float(params, s, "shift", 0.0, 0.5),
        "zoom": param_float(params, s, "zoom", 0.0, 0.5),
        "restore_best": param_bool(params, s, "restore_best"),
        "steps_per_execution": param_int(params, s, "steps_per_execution", 1, 100_000),
        "intra_op_threads": param_int(params, s, "intra_op_threads", 1, 1024),
        "inter_op_threads": param_int(params, s, "inter_op_threads", 1, 1024),
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_info(cfg: dict) -> dict:
    """What the model's bits depend on, so a differing rerun can be explained."""
    import keras
    import numpy as np
    import tensorflow as tf

    return {
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "intra_op_threads": cfg["intra_op_threads"],
        "inter_op_threads": cfg["inter_op_threads"],
        "seed": cfg["seed"],
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
    }


def compile_model(cfg: dict, steps_per_epoch: int):
    import keras

    from stages import models

    aug = models.augmentation(cfg["rotation"], cfg["shift"], cfg["zoom"], cfg["seed"])
    model = models.build(cfg["model"], aug)
    lr = cfg["learning_rate"]
    if cfg["lr_schedule"] == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(lr, cfg["epochs"] * steps_per_epoch)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=lr),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        # Several batches per call cut Keras' per-step Python overhead; the math per
        # batch is unchanged.
        steps_per_execution=cfg["steps_per_execution"],
    )
    return model


def fit(cfg: dict, data: dict):
    import keras
    from dvclive import Live
    from dvclive.keras import DVCLiveCallback

    steps_per_epoch = -(-len(data["y_train"]) // cfg["batch_size"])
    model = compile_model(cfg, steps_per_epoch)
    has_val = len(data["y_val"]) > 0
    live = Live(dir=CURVES_DIR, dvcyaml=None, save_dvc_exp=False, report=None)
    callbacks = [DVCLiveCallback(live=live)]
    if cfg["restore_best"] and has_val:
        # Best epoch by validation accuracy only: the test set stays unseen until evaluate.
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor="val_accuracy", patience=cfg["epochs"], restore_best_weights=True,
            verbose=0))
    model.fit(
        data["x_train"], data["y_train"],
        batch_size=cfg["batch_size"],
        epochs=cfg["epochs"],
        validation_data=(data["x_val"], data["y_val"]) if has_val else None,
        callbacks=callbacks,
        # A live bar on a terminal, one line per epoch in logs (e.g. under dvc repro).
        verbose=1 if sys.stdout.isatty() else 2,
    )
    return model


def main() -> None:
    cfg = validate(load_params(SECTION))
    data = load_npz(DATA, PROCESSED_KEYS, only=("x_train", "y_train", "x_val", "y_val"))
    from stages import models

    models.configure_tensorflow(cfg["seed"], cfg["intra_op_threads"], cfg["inter_op_threads"])

    started = time.perf_counter()
    model = fit(cfg, data)
    seconds = time.perf_counter() - started
    with atomic_dir(MODEL_DIR) as tmp:
        models.save_stable(model, tmp / "model.keras")
        (tmp / "run_info.json").write_text(
            json.dumps(run_info(cfg), indent=2, sort_keys=True) + "\n")
    print(f"train: {cfg['model']} for {cfg['epochs']} epochs in {seconds:.1f}s -> {MODEL_DIR}")


if __name__ == "__main__":
    run(main)
