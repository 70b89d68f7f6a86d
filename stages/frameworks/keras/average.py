"""`ema` in Keras: an exponential moving average of every weight, kept beside the model."""

from __future__ import annotations

import contextlib

from stages.frameworks.keras.env import tf


class Average:
    """`ema`: an exponential moving average of every weight of the model, BatchNorm's
    moving statistics included, updated after each step.

    Not the optimizer's `use_ema`: Keras averages the trainable variables only, so the
    averaged kernels would run with the statistics of the current ones, and while the
    learning rate is high they differ (benchmarks/RESULTS.md measures what that costs).
    Averaging the statistics with the kernels is what TensorFlow's EfficientNet
    training does (huggingface/pytorch-image-models#102) and what PyTorch's AveragedModel
    does with use_buffers (stages/frameworks/torch/fit.py).
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
