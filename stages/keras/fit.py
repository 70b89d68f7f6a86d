"""Training in Keras: compiled loops over chunks of batches, Keras' Adam, seeded augmentation.

`fit(cfg, data, curves_dir)` trains the network `cfg["model"]` names with its recipe and
returns the Keras model. The stage (stages/train.py) has already split the data, seeded
everything and pinned the threads (stages/keras/env.py).
"""

from __future__ import annotations

import contextlib
import sys
import time

import numpy as np

from stages.augment import DRAWS, affine_rows, displacements, gaussian, is_off
from stages.errors import stop_if_interrupted
from stages.keras.env import keras, tf
from stages.keras.model import build
from stages.training import BestEpoch, Curves, batch_order


def compile_model(cfg: dict, steps_per_epoch: int):
    model = build(cfg["model"])
    lr = cfg["learning_rate"]
    if cfg["lr_schedule"] == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(lr, cfg["epochs"] * steps_per_epoch)
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


def warp(images, transforms):
    """Resample each image [n, side, side] through its row of 8 projective `transforms`
    (bilinear, black outside the image)."""
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=images[..., None], transforms=transforms,
        output_shape=tf.shape(images)[1:3], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="CONSTANT")
    return out[..., 0]


def sample(images, xs, ys):
    """Bilinear samples of images [n, side, side] at columns xs and rows ys (each [n, side,
    side], in pixels), black outside the image, as warp() samples."""
    side = images.shape[1]
    wide = side + 2  # with the black border outside
    pixels = tf.reshape(tf.pad(images, [[0, 0], [1, 1], [1, 1]]), [-1])
    first = tf.range(tf.shape(images)[0])[:, None, None] * wide * wide
    x0, y0 = tf.floor(xs), tf.floor(ys)
    wx, wy = xs - x0, ys - y0

    def at(rows, cols):
        # A flat index: gather_nd's batch_dims logs a oneDNN fallback line on stderr.
        rows, cols = (tf.cast(tf.clip_by_value(v, -1.0, float(side)), tf.int32) + 1
                      for v in (rows, cols))
        return tf.gather(pixels, first + rows * wide + cols)

    return ((1 - wy) * ((1 - wx) * at(y0, x0) + wx * at(y0, x0 + 1))
            + wy * ((1 - wx) * at(y0 + 1, x0) + wx * at(y0 + 1, x0 + 1)))


def augment(images, seed, rotation: float, shift: float, zoom: float,
            elastic: float = 0.0, elastic_sigma: float = 4.0):
    """Images [n, side, side] in [0, 1] -> the same shape, each randomly rotated, zoomed,
    shifted and (elastic > 0) elastically distorted; `seed` is a shape-[2] int tensor (run
    seed and step number): the draws of a step depend on nothing else."""
    if is_off(rotation, shift, zoom, elastic):
        return images
    n, side = tf.shape(images)[0], images.shape[1]
    u = tf.random.stateless_uniform((DRAWS, n), seed, -1.0, 1.0)
    rows = affine_rows(u, side, rotation, shift, zoom, tf.cos, tf.sin)
    if not elastic:  # an affine map only: TensorFlow's own resampling op
        zero = tf.zeros_like(rows[0])
        return warp(images, tf.stack([*rows, zero, zero], axis=1))
    noise = tf.random.stateless_uniform(
        (2, n, side, side), tf.random.experimental.stateless_fold_in(seed, 1), -1.0, 1.0)
    dx, dy = displacements(noise, tf.constant(gaussian(side, elastic_sigma)), elastic)
    a0, a1, a2, b0, b1, b2 = (r[:, None, None] for r in rows)
    pixels = tf.range(side, dtype=tf.float32)
    cols, lines = pixels[None, None, :], pixels[None, :, None]
    return sample(images, a0 * cols + a1 * lines + a2 + dx, b0 * cols + b1 * lines + b2 + dy)


class Average:
    """`ema`: an exponential moving average of every weight of the model, BatchNorm's
    moving statistics included, updated after each step.

    Not the optimizer's `use_ema`: Keras averages the trainable variables only, so the
    averaged kernels would run with the statistics of the current ones, and while the
    learning rate is high they differ (validation accuracy 89% against 99% here at epoch
    3). Averaging the statistics with the kernels is what TensorFlow's EfficientNet
    training does (huggingface/pytorch-image-models#102) and what PyTorch's AveragedModel
    does with use_buffers; see stages/torch/fit.py.
    """

    def __init__(self, model, decay: float):
        self.weights, self.decay = model.weights, decay
        self.values = [tf.Variable(w, trainable=False) for w in self.weights]

    def update(self, first):
        """In the compiled step: the first step copies the weights (as Keras' own does)."""
        decay = tf.where(first, 0.0, self.decay)
        for average, weight in zip(self.values, self.weights):
            average.assign(decay * average + (1 - decay) * weight)

    @contextlib.contextmanager
    def swapped_in(self):
        """Inside: the model holds the average; after: its trained weights again."""
        trained = [w.numpy() for w in self.weights]
        self.put_in()
        try:
            yield
        finally:
            for weight, value in zip(self.weights, trained):
                weight.assign(value)

    def put_in(self):
        for weight, average in zip(self.weights, self.values):
            weight.assign(average)


def make_steps(model, x, y, cfg: dict, average: Average | None = None):
    """Compiled train and eval loops that run many batches per call.

    For a network as small as the original one, time goes to per-batch overhead, not
    arithmetic: Keras' fit() pays for a data pipeline, metric objects and a Python call per
    few batches. Here the data sits in memory as tensors and one call of train_chunk runs a
    whole chunk of batches in graph: same network, same batches, same Adam updates.
    """
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    train_loss = training_loss(cfg["label_smoothing"])
    optimizer = model.optimizer
    weights = model.trainable_variables
    seed = tf.constant(cfg["seed"], tf.int64)
    shape_changes = (cfg["rotation"], cfg["shift"], cfg["zoom"], cfg["elastic"],
                     cfg["elastic_sigma"])

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
            if average:
                average.update(optimizer.iterations == 1)
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
    keras.utils.set_random_seed(cfg["seed"])  # initial weights and dropout
    n = len(data["y_train"])
    steps_per_epoch = -(-n // cfg["batch_size"])
    model = compile_model(cfg, steps_per_epoch)
    x = tf.constant(data.pop("x_train"))
    y = tf.constant(data.pop("y_train").astype(np.int32))
    x_val, y_val = data.pop("x_val"), data.pop("y_val").astype(np.int32)
    average = Average(model, cfg["ema"]) if cfg["ema"] else None
    train_chunk, eval_batch = make_steps(model, x, y, cfg, average)
    stop_if_interrupted()
    rng = np.random.default_rng(cfg["seed"])  # batch order: the same rule in every framework
    chunk = cfg["steps_per_execution"]
    best = BestEpoch(cfg["restore_best"])
    curves = Curves(curves_dir, cfg["epochs"])
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
    best.restore(cfg["epochs"], model.set_weights)
    return model
