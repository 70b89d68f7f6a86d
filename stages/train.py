"""Stage 3: fit the network `train.model` names, with its recipe -> the model and curves.

The recipe (`train.<model>` in params.yaml) says how: epochs, batch size, learning rate
and schedule, augmentation, label smoothing, and the share of the training set held out
for validation, split here with the run's seed. Only that split steers training (best
epoch); the test set is never seen here. Every source of randomness is seeded and
TensorFlow's ops run deterministically on a pinned number of threads, so the same params
on the same machine give the same bits.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import zipfile
from pathlib import Path

import numpy as np

from stages import params
from stages.dataset import load_processed
from stages.errors import DataError, deferred_interrupts, run, stop_if_interrupted
from stages.outputs import atomic_dir, atomic_path

FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def split(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, label-blind split of the training set; both parts keep dataset order."""
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and not 0 < n_val < n:
        raise DataError(f"val_fraction {val_fraction} leaves no usable split of {n} images")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


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
    from stages.keras_env import keras, tf

    return {
        "model": cfg["model"],
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
    from stages import models
    from stages.keras_env import keras

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
    from stages.keras_env import keras, tf

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
    from stages.augment import augment
    from stages.keras_env import keras, tf

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
                objective = train_loss(yb, probs)
            optimizer.apply(tape.gradient(objective, weights), weights)
            # Logged: plain cross-entropy, the same quantity as the validation loss (the
            # smoothed objective has a floor above 0 and would show a gap that is not there).
            # Without smoothing the objective is that loss already: not computed twice.
            loss = loss_fn(yb, probs) if cfg["label_smoothing"] else objective
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
    """Train for cfg["epochs"], logging curves with dvclive into curves_dir; returns the model.

    data holds x_train, y_train and x_val, y_val (possibly empty); it is emptied as the
    arrays move into TensorFlow, so the NumPy copies are freed (peak memory).
    Under deferred_interrupts, Ctrl-C stops it between two compiled chunks, never inside one.
    """
    from dvclive import Live

    from stages.keras_env import keras, tf

    keras.utils.set_random_seed(cfg["seed"])  # initial weights and dropout
    n = len(data["y_train"])
    steps_per_epoch = -(-n // cfg["batch_size"])
    model = compile_model(cfg, steps_per_epoch)
    x = tf.constant(data.pop("x_train"))
    y = tf.constant(data.pop("y_train").astype(np.int32))
    x_val, y_val = data.pop("x_val"), data.pop("y_val").astype(np.int32)
    train_chunk, eval_batch = make_steps(model, x, y, cfg)
    stop_if_interrupted()
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
                # The chunk boundary: plain Python between two calls into TensorFlow.
                stop_if_interrupted()
        # Curves (and `dvc metrics show`): the plain cross-entropy of the training batches
        # beside the validation split's loss and accuracy. Accuracy on augmented batches
        # with dropout on is not comparable with validation accuracy: printed, not plotted.
        logs = {"train/loss": loss_sum / n}
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
              + " ".join(f"{k}={v:.4f}" for k, v in (logs | {"train/accuracy": hits / n}).items()),
              flush=True)
        stop_if_interrupted()
    live.end()
    if not len(y_val):
        # No validation split (the mlp recipe): every curve dvc.yaml plots still exists, as
        # an empty series, so `dvc plots show` does not report a missing file.
        for name in ("accuracy", "loss"):
            series = Path(live.plots_dir) / "metrics" / "eval" / f"{name}.tsv"
            series.parent.mkdir(parents=True, exist_ok=True)
            series.write_text(f"step\t{name}\n")
    if best[1] is not None and best[2] != cfg["epochs"]:
        print(f"restoring epoch {best[2]}: best validation accuracy {best[0]:.4f}")
        model.set_weights(best[1])
    return model


def _renumber_shared_ids(config, ids=None):
    """Replace Python object ids (`shared_object_id`, which differ per process) by 1, 2, ...

    They only link objects within one file, so numbering by first appearance keeps the
    meaning and makes the bytes stable.
    """
    ids = {} if ids is None else ids
    if isinstance(config, dict):
        return {k: (ids.setdefault(v, len(ids) + 1) if k == "shared_object_id"
                    else _renumber_shared_ids(v, ids)) for k, v in config.items()}
    if isinstance(config, list):
        return [_renumber_shared_ids(v, ids) for v in config]
    return config


def save_stable(model, path: Path) -> None:
    """Save a .keras file whose bytes depend on the weights only, not on the clock.

    Keras stamps the save time into metadata.json and into every zip entry; we rewrite
    the archive with those fixed, so an unchanged model keeps its DVC hash.
    """
    # Keras insists on the .keras suffix, so the raw save gets a hidden name of its own.
    raw = path.with_name(f".{path.stem}.raw.keras")
    try:
        model.save(raw)
        with atomic_path(path) as tmp:
            with zipfile.ZipFile(raw) as src, zipfile.ZipFile(tmp, "w") as dst:
                for info in src.infolist():
                    data = src.read(info.filename)
                    if info.filename == "metadata.json":
                        meta = json.loads(data)
                        meta["date_saved"] = "1980-01-01@00:00:00"
                        data = json.dumps(meta, sort_keys=True).encode()
                    elif info.filename == "config.json":
                        data = json.dumps(_renumber_shared_ids(json.loads(data))).encode()
                    fixed = zipfile.ZipInfo(info.filename, date_time=FIXED_ZIP_TIME)
                    fixed.compress_type = info.compress_type
                    fixed.external_attr = 0o644 << 16
                    dst.writestr(fixed, data)
    finally:
        raw.unlink(missing_ok=True)


def train_and_save(args) -> None:
    """The stage's work; stop_if_interrupted() marks where Ctrl-C may end it."""
    cfg = params.load()["train"]
    data = load_processed(args.data, only=("x_train", "y_train"))
    train_idx, val_idx = split(len(data["y_train"]), cfg["val_fraction"], cfg["seed"])
    x, y = data.pop("x_train"), data.pop("y_train")
    data = {"x_train": x[train_idx], "y_train": y[train_idx],
            "x_val": x[val_idx], "y_val": y[val_idx]}
    del x, y
    print(f"train: {cfg['model']} on {len(train_idx)} images, {len(val_idx)} held out "
          "for validation", flush=True)
    stop_if_interrupted()

    from stages.keras_env import configure

    configure(cfg["seed"], cfg["intra_op_threads"], cfg["inter_op_threads"])
    stop_if_interrupted()
    started = time.perf_counter()
    # Curves and model are built aside and swapped in only when training completed, so an
    # interrupted run leaves the previous model and its own curves in place.
    with atomic_dir(args.curves) as curves:
        model = fit(cfg, data, curves)
        seconds = time.perf_counter() - started
        with atomic_dir(args.model_dir) as tmp:
            save_stable(model, tmp / "model.keras")
            (tmp / "run_info.json").write_text(
                json.dumps(run_info(cfg), indent=2, sort_keys=True) + "\n")
            # The last stopping point: past it, the complete outputs are being moved in
            # (two renames), and a late Ctrl-C lets the run finish rather than lie.
            stop_if_interrupted()
    print(f"train: {cfg['model']} for {cfg['epochs']} epochs in {seconds:.1f}s "
          f"-> {args.model_dir}")


def main(argv=None) -> None:
    """`python -m stages.train --data ... --model-dir ... --curves ...`.

    From main()'s first line, Ctrl-C (or SIGTERM) only takes note, and the run stops at the
    next stop_if_interrupted() in its own code: an interrupt never lands inside TensorFlow
    (where it used to surface as a TypeError traceback). It ends the run with `error:
    interrupted; no output was replaced`, exit 130 (143 for SIGTERM). Worst-case delay: the
    longest stretch between two stopping points, i.e. importing TensorFlow (~4 s on 2
    cores), the first chunk (which also traces the graph: a few seconds), one chunk of
    steps_per_execution batches (~1.5 s for the default cnn, longer under load), one epoch's
    validation pass, or saving. A second Ctrl-C stops at once, with the same line (see
    errors.deferred_interrupts). Before main() (Python's start and this module's imports,
    a fraction of a second, no TensorFlow) Python's default Ctrl-C still applies.
    """
    with deferred_interrupts():
        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--data", required=True, help="normalize's scaled arrays (.npz)")
        parser.add_argument("--model-dir", required=True, type=Path, help="the trained model")
        parser.add_argument("--curves", required=True, type=Path, help="dvclive's curves")
        train_and_save(parser.parse_args(argv))


if __name__ == "__main__":
    run(main)
