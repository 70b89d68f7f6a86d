"""What the frameworks' training loops share: the batch order and the choice of the best
epoch (Keras' and PyTorch's loops; the C programs draw their own batches and choose their
best epoch themselves), and the per-epoch report (all three).

The same seed gives the same batches in the same order under Keras and PyTorch, and every
framework reports each epoch the same way: one line on stdout (what `dvc repro` shows) and
dvclive curves (what `dvc plots` and `dvc metrics` show).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def batch_order(n: int, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """A fresh shuffle each epoch, cut into full batches plus the last, shorter one.

    Returns one [batches, batch_size] array of indices, and a [1, rest] one if n is not a
    multiple of batch_size.
    """
    order = rng.permutation(n)
    full = n // batch_size * batch_size
    parts = [order[:full].reshape(-1, batch_size)]
    if full < n:
        parts.append(order[full:].reshape(1, -1))
    return parts


def batches(n: int, batch_size: int, rng: np.random.Generator):
    """The batches of one epoch, one index array each, in batch_order's order."""
    for part in batch_order(n, batch_size, rng):
        yield from part


class Curves:
    """The epoch report: dvclive curves in `curves_dir` and one line per epoch.

    Curves: the plain cross-entropy of the training batches beside the validation
    split's loss and accuracy. Accuracy on augmented batches with dropout on is not
    comparable with validation accuracy: it is printed, not plotted.
    """

    def __init__(self, curves_dir, epochs: int):
        from dvclive import Live

        self.epochs = epochs
        self.live = Live(dir=str(curves_dir), dvcyaml=None, save_dvc_exp=False, report=None)

    def epoch(self, epoch: int, seconds: float, logs: dict, train_accuracy: float) -> None:
        # dvclive's step is the epoch's number, from 1: the curves' x axis, and the summary's
        # `step` (what `dvc metrics` and `dvc exp show` list) is the epochs trained.
        self.live.step = epoch
        for name, value in logs.items():
            self.live.log_metric(name, round(value, 6))
        self.live.next_step()
        shown = logs | {"train/accuracy": train_accuracy}
        print(f"epoch {epoch}/{self.epochs} {seconds:.1f}s "
              + " ".join(f"{k}={v:.4f}" for k, v in shown.items()), flush=True)

    def close(self, validated: bool) -> None:
        self.live.end()
        if not validated:
            # No validation split (the mlp recipe): every curve dvc.yaml plots still
            # exists, as an empty series, so `dvc plots show` reports no missing file.
            for name in ("accuracy", "loss"):
                series = Path(self.live.plots_dir) / "metrics" / "eval" / f"{name}.tsv"
                series.parent.mkdir(parents=True, exist_ok=True)
                series.write_text(f"step\t{name}\n")


class BestEpoch:
    """`restore_best`: keep the weights of the epoch with the best validation accuracy, and
    put them back at the end if it was not the last one."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.accuracy, self.weights, self.epoch = -1.0, None, 0

    def offer(self, epoch: int, accuracy: float, weights) -> None:
        """weights: a function returning a copy of the current weights, called only when
        this epoch is the best so far."""
        if self.enabled and accuracy > self.accuracy:
            self.accuracy, self.weights, self.epoch = accuracy, weights(), epoch

    def restore(self, last_epoch: int, set_weights) -> None:
        if self.weights is not None and self.epoch != last_epoch:
            print(f"restoring epoch {self.epoch}: best validation accuracy "
                  f"{self.accuracy:.4f}")
            set_weights(self.weights)
