"""The benchmarks' arithmetic: the train stage's epoch lines read back, the frontier's
rows, costs and plots (benchmarks/frontier.py); the C cnn's layer lines against the
measured peak (benchmarks/frameworks.py, benchmarks/fma_peak.c built and run for real);
and each benchmark module's command line, its own flags only."""

from __future__ import annotations

import functools
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from benchmarks import committees, frontier
from benchmarks.common import ROOT
from benchmarks.frameworks import (
    CNN_MACS,
    dense_flops_per_image,
    fma_peak,
    layer_times,
    layers_table,
)
from benchmarks.frontier import epoch_log, recipe_changes, seeds_for, variant

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


def run(seed, seconds, errors, **extra):
    return {"seed": seed, "epochs": 3, "images": 57_000, "train_seconds": seconds,
            "test_errors": errors, "test_accuracy": 1 - errors / 10_000, **extra}


def test_a_measured_point_has_the_mean_spread_median_time_and_cost():
    verdicts = {"label_errors": 4, "ambiguous": 10, "model_errors": 16}
    row = frontier.measured_row("cnn", [run(42, 180.0, 30, **verdicts),
                                        run(1, 200.0, 36, **verdicts)], 4_900_000)
    assert (row["errors"], row["min"], row["max"], row["seconds"]) == (33, 30, 36, 190.0)
    assert row["cost"] == 4_900_000 * 57_000 * 3
    assert row["verdicts"] == (4, 10, 16)
    line = frontier.table([row]).splitlines()[2]
    assert line == ("| cnn, seeds 42, 1 | yes | 33.0 (30–36) | 99.67% | 4.0 / 10.0 / 16.0 | "
                    "4.9e6 | 3 | 8.4e11 | 190 |")
    # A committee of 5 costs five members, in multiply-adds and in seconds.
    five = frontier.measured_row("cnn, committee of 5", [run("1+2+3+4+5", 200.0, 28)],
                                 4_900_000, members=5)
    assert five["cost"] == 5 * row["cost"] and five["seconds"] == 1000.0
    assert "| 3 × 5 nets |" in frontier.table([five])


def test_published_points_keep_their_sources_numbers_and_sort_by_cost():
    rows = frontier.published_rows()
    an = next(r for r in rows if r["point"].startswith("An et al."))
    assert (an["min"], an["max"]) == pytest.approx((30.0, 31.0))
    assert an["cost"] == (140e6 * 60_000 * 150, 170e6 * 60_000 * 150)
    assert not any(r["measured"] for r in rows)
    lines = frontier.table(rows).splitlines()[2:]
    assert lines[0].startswith("| Deotte (Kaggle), single")
    assert lines[-1].startswith("| Byerly")  # no stated cost: last
    assert all("| no: " in line for line in lines)


def test_the_cnns_multiply_adds_are_counted_from_the_keras_model():
    assert frontier.preset_macs("cnn") == sum(CNN_MACS.values())
    assert frontier.preset_macs("mlp") == 784 * 128 + 128 * 10
    assert frontier.preset_macs("fast") < frontier.preset_macs("cnn") / 3


def test_a_committee_is_scored_on_its_mean_probabilities():
    y = np.array([0, 1, 2])
    a = np.eye(3, 10, dtype=np.float32)[[0, 1, 1]] * 0.6 + 0.04
    b = np.eye(3, 10, dtype=np.float32)[[0, 2, 2]] * 0.9 + 0.01
    assert committees.errors_of(y, [a]) == 1
    assert committees.errors_of(y, [a, b]) == 1  # image 1 now wrong, image 2 right


def test_every_committee_of_k_is_counted():
    y = np.zeros(4, dtype=np.int64)
    right, wrong = np.eye(10, dtype=np.float32)[0], np.eye(10, dtype=np.float32)[1]
    members = [np.stack([right, right, wrong, wrong]), np.stack([right, wrong, wrong, right]),
               np.stack([wrong, right, right, right])]
    assert [committees.errors_of(y, [m]) for m in members] == [2, 2, 1]
    # Pairs tie on images both disagree on; the mean's argmax takes the lower class (0).
    assert committees.subsets(y, members, 2) == {"k": 2, "committees": 3,
                                                  "mean_errors": pytest.approx(1 / 3),
                                                  "min": 0, "max": 1}
    assert committees.subsets(y, members, 3)["mean_errors"] == 1  # image 2: two of three wrong


def test_the_plots_are_svg_with_a_mark_per_point_and_a_line_per_run():
    rows = [frontier.measured_row("fast", [run(1, 50.0, 47)], 1_350_000),
            frontier.measured_row("cnn", [run(1, 400.0, 35)], 4_900_000)]
    rows += frontier.published_rows()
    svg = ET.fromstring(frontier.frontier_svg(rows))
    circles = svg.findall("{http://www.w3.org/2000/svg}circle")
    assert len(circles) == len([r for r in rows if r["cost"] is not None]) == 5
    curves = ET.fromstring(frontier.curves_svg(
        {"fast": [[(10.0, 0.99), (10.0, 0.995)]] * 2, "cnn": [[(30.0, 0.99)] * 3]}, 3000))
    assert len(curves.findall("{http://www.w3.org/2000/svg}polyline")) == 3


def test_seeds_for_a_preset_are_read_and_checked():
    assert seeds_for(["cnn=42", "fast=1,2"]) == {"cnn": [42], "fast": [1, 2]}
    for bad in ("cnn", "resnet=1", "cnn=one"):
        with pytest.raises(SystemExit, match="expected MODEL=SEED"):
            seeds_for([bad])


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


@pytest.mark.slow
def test_the_fma_probe_measures_every_thread_count_asked():
    peaks = fma_peak((1, os.cpu_count()))
    assert set(peaks) == {1, os.cpu_count()}
    assert all(g > 1.0 for g in peaks.values())  # a real FMA loop, not an empty one


# Each benchmark module's flags (`python -m benchmarks.NAME --help`): its own, no other's.
FLAGS = {
    "run": {"--data"},
    "train": {"--data", "--repeats"},
    "mosaics": {"--data"},
    "frameworks": {"--data", "--models", "--epochs"},
    "workers": {"--data", "--models", "--epochs"},
    "predict": {"--data"},
    "frontier": {"--data", "--models", "--seeds", "--epochs", "--set", "--committees",
                 "--peer-seeds", "--seeds-for", "--plot", "--keep"},
    "cnn": {"--data", "--model", "--framework", "--seeds"},
    "hosts": {"--data", "--epochs"},
}


@functools.cache
def help_text(name: str) -> str:
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_every_benchmark_with_a_command_line_is_checked():
    commands = {p.stem for p in (ROOT / "benchmarks").glob("*.py")
                if "argument_parser(" in p.read_text()} - {"common"}
    assert commands == set(FLAGS)


@pytest.mark.slow
@pytest.mark.parametrize("name", FLAGS)
def test_each_benchmark_runs_alone_and_its_help_lists_its_own_flags(name):
    shown = help_text(name)
    assert shown.startswith(f"usage: python -m benchmarks.{name} ")
    assert set(re.findall(r"--[a-z][\w-]*", shown)) == FLAGS[name] | {"--help"}


@pytest.mark.slow
def test_a_flag_of_one_benchmark_is_in_no_other_benchmarks_help():
    def having(flag):
        return [name for name in FLAGS if re.search(rf"{flag}\b(?!-)", help_text(name))]

    assert having("--committees") == ["frontier"]
    assert having("--repeats") == ["train"]
    assert having("--framework") == ["cnn"]
    assert having("--only") == []


@pytest.mark.slow
def test_a_childs_peak_rss_is_its_own_not_what_this_process_holds(tmp_path):
    """A forked child's ru_maxrss would count this process's memory at the fork: run_child
    reports the command's own peak, whatever this process holds."""
    from benchmarks.common import run_child

    held = bytearray(600 << 20)
    held[::4096] = b"\1" * len(held[::4096])  # touched: resident
    child = run_child([sys.executable, "-c", "import sys; x = bytearray(150 << 20); "
                       "x[::4096] = b'1' * len(x[::4096]); print('ok')"], tmp_path)
    del held
    assert child["stdout"] == "ok\n"
    assert 150 < child["peak_rss_mb"] < 300, child["peak_rss_mb"]
