"""stages/training/epochs.py: the batch order and the epoch report every framework shares."""

from __future__ import annotations

import json

import numpy as np
import pytest

from stages.training import epochs as training


@pytest.mark.parametrize("n,batch", [(10, 3), (12, 4), (5, 8)])
def test_batch_order_covers_every_image_once_with_one_short_last_batch(n, batch):
    parts = training.batch_order(n, batch, np.random.default_rng(0))
    flat = np.concatenate([p.ravel() for p in parts])
    assert np.array_equal(np.sort(flat), np.arange(n))
    assert all(p.shape[1] == batch for p in parts[:1] if n >= batch)
    assert sum(p.size for p in parts) == n
    if n % batch:
        assert parts[-1].shape == (1, n % batch)
    else:
        assert len(parts) == 1 and parts[0].shape == (n // batch, batch)
    # batches(): the same indices, one array per batch, in the same order
    again = list(training.batches(n, batch, np.random.default_rng(0)))
    assert np.array_equal(np.concatenate(again), flat)
    assert [len(b) for b in again] == [batch] * (n // batch) + ([n % batch] if n % batch else [])


def test_batch_order_is_a_fresh_seeded_shuffle_each_epoch():
    rng = np.random.default_rng(5)
    first, second = (np.concatenate([p.ravel() for p in training.batch_order(50, 8, rng)])
                     for _ in range(2))
    assert not np.array_equal(first, second)
    again = np.random.default_rng(5)
    assert np.array_equal(
        np.concatenate([p.ravel() for p in training.batch_order(50, 8, again)]), first)


def test_curves_log_each_epoch_print_one_line_and_leave_empty_validation_series(
        tmp_path, capsys):
    curves = training.Curves(tmp_path / "curves", epochs=2)
    curves.epoch(1, 1.25, {"train/loss": 0.5}, 0.8)
    curves.epoch(2, 1.0, {"train/loss": 0.25}, 0.9)
    curves.close(validated=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["epoch 1/2 1.2s train/loss=0.5000 train/accuracy=0.8000",
                     "epoch 2/2 1.0s train/loss=0.2500 train/accuracy=0.9000"]
    series = (tmp_path / "curves/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert series[0] == "step\tloss" and [s.split("\t")[1] for s in series[1:]] == [
        "0.5", "0.25"]
    for name in ("accuracy", "loss"):  # dvc.yaml plots them: present, empty
        assert (tmp_path / f"curves/plots/metrics/eval/{name}.tsv").read_text() == \
            f"step\t{name}\n"
    assert [s.split("\t")[0] for s in series[1:]] == ["1", "2"]  # each epoch's number
    # The summary `dvc metrics` and `dvc exp show` read: the last values, at the last epoch.
    summary = json.loads((tmp_path / "curves/metrics.json").read_text())
    assert summary == {"train": {"loss": 0.25}, "step": 2}


def test_best_epoch_keeps_the_best_and_restores_it_unless_it_was_the_last(capsys):
    copies = []

    def weights():
        copies.append(len(copies))
        return f"weights {len(copies)}"

    best = training.BestEpoch(enabled=True)
    for epoch, accuracy in enumerate([0.5, 0.9, 0.8, 0.9], start=1):
        best.offer(epoch, accuracy, weights)
    assert len(copies) == 2  # copied only when better: epochs 1 and 2
    restored = []
    best.restore(4, restored.append)
    assert restored == ["weights 2"]
    assert capsys.readouterr().out == "restoring epoch 2: best validation accuracy 0.9000\n"
    best.offer(5, 0.95, weights)
    best.restore(5, restored.append)  # the best is the last: nothing to put back
    assert restored == ["weights 2"]
    off = training.BestEpoch(enabled=False)
    off.offer(1, 0.99, weights)
    off.restore(2, restored.append)
    assert len(copies) == 3 and restored == ["weights 2"]
