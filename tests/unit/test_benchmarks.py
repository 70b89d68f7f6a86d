"""benchmarks/run.py's frontier arithmetic: the train stage's epoch lines read back, the
time to a validation accuracy, and one table row per preset."""

from __future__ import annotations

import pytest

from benchmarks.run import epoch_log, frontier_table, recipe_changes, time_to, variant

STDOUT = """train: cnn in keras on 57000 images, 3000 held out for validation
epoch 1/3 63.1s train/loss=0.2867 eval/loss=0.3092 eval/accuracy=0.9713 train/accuracy=0.9417
epoch 2/3 62.4s train/loss=0.1691 eval/loss=0.1300 eval/accuracy=0.9910 train/accuracy=0.9835
epoch 3/3 60.0s train/loss=0.1538 eval/loss=0.1570 eval/accuracy=0.9953 train/accuracy=0.9874
train: cnn for 3 epochs in 185.5s -> data/model
"""


def test_epoch_lines_give_each_epochs_time_and_validation_accuracy():
    assert epoch_log(STDOUT) == [(63.1, 0.9713), (62.4, 0.9910), (60.0, 0.9953)]
    no_validation = "epoch 1/5 1.2s train/loss=0.3 train/accuracy=0.91\n"
    assert epoch_log(no_validation) == [(1.2, None)]


def test_time_to_an_accuracy_is_the_training_time_until_the_first_epoch_there():
    log = epoch_log(STDOUT)
    assert time_to(log, 0.990) == 63.1 + 62.4
    assert time_to(log, 0.995) == 63.1 + 62.4 + 60.0
    assert time_to(log, 0.999) is None
    assert time_to([(1.2, None)], 0.5) is None


def test_the_frontier_has_one_row_per_preset_with_mean_spread_and_medians():
    runs = [{"model": "cnn", "seed": s, "epochs": 3, "train_seconds": t,
             "images_per_second": 900.0, "to_99_0": r, "to_99_5": None, "test_errors": e,
             "test_accuracy": 1 - e / 10000}
            for s, t, r, e in ((42, 180.0, 120.0, 30), (1, 200.0, None, 36))]
    rows = frontier_table(runs).splitlines()
    assert rows[2] == ("| cnn | 3 | 42, 1 | 33.0 (30–36) | 99.67% | 190 | 900 | 120 (1/2) "
                       "| – (0/2) |")
    assert len([r for r in rows if r.startswith("| cnn")]) == 1


def test_a_recipe_variant_is_read_as_yaml_and_names_its_row():
    changes = recipe_changes(["ema=0.999", "elastic=0", "lr_schedule=cosine"])
    assert changes == {"ema": 0.999, "elastic": 0, "lr_schedule": "cosine"}
    assert variant("cnn", changes) == "cnn (ema=0.999, elastic=0, lr_schedule=cosine)"
    assert variant("cnn", {}) == "cnn"
    with pytest.raises(SystemExit, match="expected KEY=VALUE"):
        recipe_changes(["ema"])
