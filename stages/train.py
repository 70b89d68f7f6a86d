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
    validate_processed,
)

SECTION = "train"
DATA = "data/processed/mnist.npz"
MODEL_DIR = Path("data/model")
CURVES_DIR = "reports/train"
MODEL_NAMES = ("mlp", "cnn", "cnn_large")
KEYS = {
    "model", "epochs", "batch_size", "learning_rate", "lr_schedule", "seed",
    "rotation", "shift", "zoom", "label_smoothing", "restore_best", "steps_per_execution",
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
        "label_smoothing": param_float(params, s, "label_smoothing", 0.0, 0.5),
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

    model = models.build(cfg["model"])
    lr = cfg["learning_rate"]
    if cfg["lr_schedule"] == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(lr, cfg["epochs"] * steps_per_epoch)
    # Compiled so that the saved model can be evaluated or fine-tuned as it is loaded.
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def batch_order(n: int, batch_size: int, rng) -> list:
    """A fresh shuffle each epoch, cut into full batches plus the last, shorter one."""
    order = rng.permutation(n)
    full = n // batch_size * batch_size
    parts = [order[:full].reshape(-1, batch_size)]
    if full < n:
        parts.append(order[full:].reshape(1, -1))
    return parts


def training_loss(label_smoothing: float):
    """Cross-entropy of integer labels against softmax outputs, with smoothed targets.

    Targets are 1 - s + s/10 for the true digit and s/10 for the others: the net is not
    pushed towards infinite confidence, which generalises better on clean data.
    """
    import keras
    import tensorflow as tf

    if not label_smoothing:
        return keras.losses.SparseCategoricalCrossentropy()
    smoothed = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
    return lambda labels, probs: smoothed(tf.one_hot(labels, 10), probs)


def make_steps(model, x, y, cfg: dict):
    """Compiled train and eval loops that run many batches per call.

    For a network as small as the original one, time goes to per-batch overhead, not
    arithmetic: Keras' fit() pays for a data pipeline, metric objects and a Python call per
    few batches. Here the data sits in memory as tensors and one call of train_chunk runs a
    whole chunk of batches in graph: same network, same batches, same Adam updates.
    """
    import keras
    import tensorflow as tf

    from stages.augment import augment

    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    train_loss = training_loss(cfg["label_smoothing"])
    optimizer = model.optimizer
    weights = model.trainable_variables
    seed = tf.constant(cfg["seed"], tf.int64)
    shape_changes = cfg["rotation"], cfg["shift"], cfg["zoom"]

    # One trace for every chunk shape (the last chunk and the last batch are shorter):
    # tracing the model, loss and optimizer into a graph costs as much as an mlp epoch.
    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32)])
    def train_chunk(batches):
        def step(i, loss_sum, hits):
            # Each step's augmentation draws depend on (seed, step) only: reproducible.
            step_seed = tf.stack([seed, tf.cast(optimizer.iterations, tf.int64)])
            xb = augment(tf.gather(x, batches[i]), step_seed, *shape_changes)
            yb = tf.gather(y, batches[i])
            with tf.GradientTape() as tape:
                probs = model(xb, training=True)
                loss = train_loss(yb, probs)
            optimizer.apply(tape.gradient(loss, weights), weights)
            n = tf.cast(tf.size(yb), tf.float32)
            hit = tf.reduce_sum(tf.cast(tf.argmax(probs, 1, output_type=tf.int32) == yb,
                                        tf.float32))
            return i + 1, loss_sum + loss * n, hits + hit

        _, loss_sum, hits = tf.while_loop(
            lambda i, *_: i < tf.shape(batches)[0], step, (0, 0.0, 0.0))
        return loss_sum, hits

    @tf.function(reduce_retracing=True)
    def eval_batch(xb, yb):
        probs = model(xb, training=False)
        loss = loss_fn(yb, probs) * tf.cast(tf.size(yb), tf.float32)
        return loss, tf.reduce_sum(tf.cast(tf.argmax(probs, 1, output_type=tf.int32) == yb,
                                           tf.float32))

    return train_chunk, eval_batch


def evaluate_split(eval_batch, x, y, batch_size: int = 1000) -> dict:
    loss_sum = hits = 0.0
    for start in range(0, len(y), batch_size):
        loss, hit = eval_batch(x[start:start + batch_size], y[start:start + batch_size])
        loss_sum, hits = loss_sum + float(loss), hits + float(hit)
    return {"loss": loss_sum / len(y), "accuracy": hits / len(y)}


def fit(cfg: dict, data: dict, curves_dir):
    """Train for cfg["epochs"], logging curves with dvclive into curves_dir; returns the model."""
    import keras
    import numpy as np
    import tensorflow as tf
    from dvclive import Live

    keras.utils.set_random_seed(cfg["seed"])  # initial weights and dropout
    n = len(data["y_train"])
    steps_per_epoch = -(-n // cfg["batch_size"])
    model = compile_model(cfg, steps_per_epoch)
    # pop(): once TensorFlow holds its copy, the NumPy one is freed (peak memory).
    x = tf.constant(data.pop("x_train"))
    y = tf.constant(data.pop("y_train").astype(np.int32))
    x_val, y_val = data.pop("x_val"), data.pop("y_val").astype(np.int32)
    train_chunk, eval_batch = make_steps(model, x, y, cfg)
    rng = np.random.default_rng(cfg["seed"])
    chunk = cfg["steps_per_execution"]
    best = (-1.0, None, 0)  # validation accuracy, weights, epoch
    live = Live(dir=str(curves_dir), dvcyaml=None, save_dvc_exp=False, report=None)
    tty = sys.stdout.isatty()
    for epoch in range(1, cfg["epochs"] + 1):
        started = time.perf_counter()
        bar = keras.utils.Progbar(steps_per_epoch, verbose=1) if tty else None
        loss_sum = hits = 0.0
        done = 0
        for part in batch_order(n, cfg["batch_size"], rng):
            for start in range(0, len(part), chunk):
                batches = part[start:start + chunk]
                chunk_loss, chunk_hits = train_chunk(tf.constant(batches, tf.int32))
                loss_sum, hits = loss_sum + float(chunk_loss), hits + float(chunk_hits)
                done += len(batches)
                if bar:
                    bar.update(done, [("loss", float(chunk_loss) / batches.size)])
        logs = {"train/loss": loss_sum / n, "train/accuracy": hits / n}
        if len(y_val):
            # The validation split steers training; the test set is never seen here.
            val = evaluate_split(eval_batch, x_val, y_val)
            logs |= {"eval/loss": val["loss"], "eval/accuracy": val["accuracy"]}
            if cfg["restore_best"] and val["accuracy"] > best[0]:
                best = (val["accuracy"], model.get_weights(), epoch)
        for name, value in logs.items():
            live.log_metric(name, round(value, 6))
        live.next_step()
        print(f"epoch {epoch}/{cfg['epochs']} {time.perf_counter() - started:.1f}s "
              + " ".join(f"{k}={v:.4f}" for k, v in logs.items()), flush=True)
    live.end()
    if best[1] is not None and best[2] != cfg["epochs"]:
        print(f"restoring epoch {best[2]}: best validation accuracy {best[0]:.4f}")
        model.set_weights(best[1])
    return model


def main() -> None:
    cfg = validate(load_params(SECTION))
    data = load_npz(DATA, PROCESSED_KEYS, only=("x_train", "y_train", "x_val", "y_val"))
    validate_processed(data, DATA)
    from stages import models

    models.configure_tensorflow(cfg["seed"], cfg["intra_op_threads"], cfg["inter_op_threads"])
    started = time.perf_counter()
    # Curves and model are built aside and swapped in only when training completed, so an
    # interrupted run leaves the previous model and its own curves in place.
    with atomic_dir(CURVES_DIR) as curves:
        model = fit(cfg, data, curves)
        seconds = time.perf_counter() - started
        with atomic_dir(MODEL_DIR) as tmp:
            models.save_stable(model, tmp / "model.keras")
            (tmp / "run_info.json").write_text(
                json.dumps(run_info(cfg), indent=2, sort_keys=True) + "\n")
    print(f"train: {cfg['model']} for {cfg['epochs']} epochs in {seconds:.1f}s -> {MODEL_DIR}")


if __name__ == "__main__":
    run(main)
