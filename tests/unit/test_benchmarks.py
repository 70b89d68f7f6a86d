"""benchmarks/run.py's arithmetic: the train stage's epoch lines read back, the time to a
validation accuracy, one frontier row per preset; the C cnn's layer lines against the
measured peak (benchmarks/fma_peak.c, built and run for real)."""

from __future__ import annotations

import os

import pytest

from benchmarks.run import (
    dense_flops_per_image,
    epoch_log,
    fma_peak,
    frontier_table,
    layer_times,
    layers_table,
    recipe_changes,
    time_to,
    variant,
)

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


LAYERS = "\n".join([
    "epoch 1/1 14.7s loss=0.17 accuracy=0.98",
    *(f"layer {name} forward_gflop={f} forward_seconds={f_s} backward_gflop={b} "
      f"backward_seconds={b_s}" for name, f, f_s, b, b_s in (
          ("conv1", "105.062", "1.656", "105.062", "1.997"),
          ("conv2", "747.110", "6.903", "1494.221", "11.233"),
          ("conv3", "268.960", "2.479", "537.919", "3.551"),
          ("dense", "4.669", "0.213", "9.339", "0.959"))),
    "train: images=57000 epochs=2 seconds=29.671 executed_gflop=3333.166"])


def test_the_c_cnn_layers_are_read_back_and_set_against_the_peak():
    layers = layer_times(LAYERS)
    assert list(layers) == ["conv1", "conv2", "conv3", "dense"]
    assert layers["conv2"] == (747.110, 6.903, 1494.221, 11.233)
    table = layers_table({"peak_gflops": 200.0, "layers": layers}).splitlines()
    assert table[3] == "| conv2 | 108.2 (54%) | 133.0 (67%) | 63% |"
    assert table[-1] == "| all | | 112.9 (56%) over both | 100% |"
    # The program counts what the benchmark's dense formula counts, per training image.
    flops = sum(f + b for f, _, b, _ in layers.values()) * 1e9
    assert flops / (57000 * 2) == pytest.approx(dense_flops_per_image("cnn"), rel=1e-5)


def test_the_fma_probe_measures_every_thread_count_asked():
    peaks = fma_peak((1, os.cpu_count()))
    assert set(peaks) == {1, os.cpu_count()}
    assert all(g > 1.0 for g in peaks.values())  # a real FMA loop, not an empty one
