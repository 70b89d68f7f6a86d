"""Training in Keras: compiled loops over chunks of batches, Keras' Adam, seeded augmentation.

`fit(cfg, data, curves_dir)` trains the network `cfg.model` names with its recipe and
returns the Keras model, trained on the device `cfg.device` names. The stage
(stages/train.py) has already split the data, seeded everything and pinned the threads
(env.py). The loop comes first; the compiled steps, the loss and the optimizer below it;
the augmentation's resampling is resample.py, the weight average (`ema`) average.py.
"""

from __future__ import annotations

import contextlib
import sys
import time

import numpy as np

from stages.frameworks.keras.average import Average
from stages.frameworks.keras.env import keras, tf, use_device
from stages.frameworks.keras.model import build
from stages.frameworks.keras.resample import augment
from stages.runtime.failures import stop_if_interrupted
from stages.runtime.params import TrainConfig
from stages.training.epochs import BestEpoch, Curves, batch_order


def fit(cfg: TrainConfig, data: dict, curves_dir):
    """Train for cfg.epochs, logging curves with dvclive into curves_dir; returns the model.

    data holds x_train, y_train and x_val, y_val (possibly empty); it is emptied as the
    arrays move into TensorFlow, so the NumPy copies are freed (peak memory).
    Under deferred_interrupts, Ctrl-C stops it between two compiled chunks, never inside one.
    """
    # train.keras.device: configure() hid every GPU; a run on `gpu` shows them again, or
    # ends in one line where TensorFlow sees none. First: before TensorFlow's first op.
    use_device(cfg.device)
    keras.utils.set_random_seed(cfg.seed)  # initial weights and dropout
    n = len(data["y_train"])
    steps_per_epoch = -(-n // cfg.batch_size)
    model = compile_model(cfg, steps_per_epoch)
    x = tf.constant(data.pop("x_train"))
    y = tf.constant(data.pop("y_train").astype(np.int32))
    x_val, y_val = data.pop("x_val"), data.pop("y_val").astype(np.int32)
    average = Average(model, cfg.ema) if cfg.ema else None
    train_chunk, eval_batch = make_steps(model, x, y, cfg, average)
    stop_if_interrupted()
    rng = np.random.default_rng(cfg.seed)  # batch order: the same rule as PyTorch's
    chunk = cfg.steps_per_execution
    best = BestEpoch(cfg.restore_best)
    curves = Curves(curves_dir, cfg.epochs)
    tty = sys.stdout.isatty()
    for epoch in range(1, cfg.epochs + 1):
        started = time.perf_counter()
        bar = keras.utils.Progbar(steps_per_epoch, verbose=1) if tty else None
        loss_sum = hits = 0.0
        done = 0
        for part in batch_order(n, cfg.batch_size, rng):
            for start in range(0, len(part), chunk):
                batches = part[start:start + chunk]
                step_losses, step_hits = (t.numpy() for t in
                                          train_chunk(tf.constant(batches, tf.int32)))
                # Summed step by step, in float64: the epoch's numbers do not depend on
                # how the steps were cut into chunks (steps_per_execution is speed only).
                for step_loss, step_hit in zip(step_losses, step_hits):
                    loss_sum, hits = loss_sum + float(step_loss), hits + float(step_hit)
                done += len(batches)
                if bar:
                    bar.update(done, [("loss", float(step_losses.sum()) / batches.size)])
                # The chunk boundary: plain Python between two calls into TensorFlow.
                stop_if_interrupted()
        logs = {"train/loss": loss_sum / n}
        if len(y_val):
            # The validation split steers training; the test set is never seen here. With
            # `ema`, the average is what is validated (and what would be saved).
            with average.swapped_in() if average else contextlib.nullcontext():
                val = evaluate_split(eval_batch, x_val, y_val)
                best.offer(epoch, val["accuracy"], model.get_weights)
            logs |= {"eval/loss": val["loss"], "eval/accuracy": val["accuracy"]}
        curves.epoch(epoch, time.perf_counter() - started, logs, hits / n)
        stop_if_interrupted()
    curves.close(validated=bool(len(y_val)))
    if average:
        average.put_in()
    best.restore(cfg.epochs, model.set_weights)
    return model


def compile_model(cfg: TrainConfig, steps_per_epoch: int):
    model = build(cfg.model)
    lr = cfg.learning_rate
    if cfg.lr_schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(lr, cfg.epochs * steps_per_epoch)
    # Compiled so that the saved model can be evaluated or fine-tuned as it is loaded.
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def training_loss(label_smoothing: float):
    """Cross-entropy of integer labels against softmax outputs, with smoothed targets.

    Targets are 1 - s + s/10 for the true digit and s/10 for the others: the net is not
    pushed towards infinite confidence, which generalises better on clean data.
    """
    if not label_smoothing:
        return keras.losses.SparseCategoricalCrossentropy()
    smoothed = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
    return lambda labels, probs: smoothed(tf.one_hot(labels, 10), probs)


def make_steps(model, x, y, cfg: TrainConfig, average: Average | None = None):
    """Compiled train and eval loops that run many batches per call.

    For a network as small as the original one, time goes to per-batch overhead, not
    arithmetic: Keras' fit() pays for a data pipeline, metric objects and a Python call per
    few batches. Here the data sits in memory as tensors and one call of train_chunk runs a
    whole chunk of batches in graph: same network, same batches, same Adam updates. Each
    step is the same graph whatever the chunk's length, so the chunk length
    (speed.keras_steps_per_execution) changes no bit of the result.
    """
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    train_loss = training_loss(cfg.label_smoothing)
    optimizer = model.optimizer
    weights = model.trainable_variables
    seed = tf.constant(cfg.seed, tf.int64)
    shape_changes = (cfg.rotation, cfg.shift, cfg.zoom, cfg.elastic,
                     cfg.elastic_sigma)

    # One trace for every chunk shape (the last chunk and the last batch are shorter):
    # tracing the model, loss and optimizer into a graph is the slowest part of a call.
    @tf.function(input_signature=[tf.TensorSpec([None, None], tf.int32)])
    def train_chunk(batches):
        def step(i, losses, hits):
            # Each step's augmentation draws depend on (seed, step) only: reproducible.
            step_seed = tf.stack([seed, tf.cast(optimizer.iterations, tf.int64)])
            xb = augment(tf.gather(x, batches[i]), step_seed, *shape_changes)
            yb = tf.gather(y, batches[i])
            with tf.GradientTape() as tape:
                probs = model(xb, training=True)
                objective = train_loss(yb, probs)
            optimizer.apply(tape.gradient(objective, weights), weights)
            if average:
                average.update(optimizer.iterations == 1)
            # Logged: plain cross-entropy, the same quantity as the validation loss (the
            # smoothed objective has a floor above 0 and would show a gap that is not there).
            # Without smoothing the objective is that loss already: not computed twice.
            loss = loss_fn(yb, probs) if cfg.label_smoothing else objective
            n = tf.cast(tf.size(yb), tf.float32)
            hit = tf.reduce_sum(tf.cast(tf.argmax(probs, 1, output_type=tf.int32) == yb,
                                        tf.float32))
            return i + 1, losses.write(i, loss * n), hits.write(i, hit)

        steps = tf.shape(batches)[0]
        _, losses, hits = tf.while_loop(
            lambda i, *_: i < steps, step,
            (0, tf.TensorArray(tf.float32, size=steps), tf.TensorArray(tf.float32, size=steps)))
        return losses.stack(), hits.stack()  # per step: summed outside, in a fixed order

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
