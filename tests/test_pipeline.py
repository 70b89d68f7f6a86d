"""End to end: real `dvc repro` in a throwaway git repo, on the committed MNIST fixture."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
from PIL import Image

from conftest import dvc, make_project, set_params, stages_run

pytestmark = pytest.mark.slow

ALL_STAGES = ["download", "normalize", "train", "evaluate", "render-errors"]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    repo = make_project(tmp_path_factory.mktemp("e2e") / "project")
    first = dvc(repo, "repro")
    return repo, first


def test_first_repro_runs_every_stage_in_order(project):
    _, first = project
    assert stages_run(first.stdout) == ALL_STAGES
    # The original script's printouts.
    assert "label of training sample 0: 5" in first.stdout
    assert "pixel min 0, max 255" in first.stdout
    assert "500 samples, " in first.stdout and " wrong" in first.stdout


def test_every_output_is_there_and_sound(project):
    repo, _ = project
    raw = np.load(repo / "data/raw/mnist.npz")
    assert raw["x_train"].shape == (1500, 28, 28)

    processed = np.load(repo / "data/processed/mnist.npz")
    assert processed["x_train"].dtype == np.float32
    assert 0.0 <= processed["x_train"].min() and processed["x_train"].max() <= 1.0
    assert len(processed["x_train"]) + len(processed["x_val"]) == 1500
    assert len(processed["x_val"]) == 75  # val_fraction 0.05

    report = json.loads((repo / "reports/data.json").read_text())
    assert report["test"]["count"] == 500
    assert sum(report["train"]["class_counts"].values()) == 1425

    sample = Image.open(repo / "reports/sample.bmp")
    assert sample.mode == "L" and sample.size == (28, 28)
    assert np.array_equal(np.asarray(sample), raw["x_train"][0])

    import keras

    model = keras.models.load_model(repo / "data/model/model.keras")
    assert model.output_shape == (None, 10)
    info = json.loads((repo / "data/model/run_info.json").read_text())
    assert {"tensorflow", "keras", "numpy", "cpu", "intra_op_threads", "seed"} <= set(info)

    for split in ("train", "eval"):
        for metric in ("loss", "accuracy"):
            rows = list(csv.DictReader(
                open(repo / f"reports/train/plots/metrics/{split}/{metric}.tsv"),
                delimiter="\t"))
            assert len(rows) == 2  # one row per epoch

    metrics = json.loads((repo / "reports/metrics.json").read_text())
    assert set(metrics) >= {"loss", "accuracy", "errors", "samples", "per_class"}
    assert metrics["samples"] == 500
    assert metrics["errors"] == round((1 - metrics["accuracy"]) * 500)
    assert set(metrics["per_class"]) == {str(d) for d in range(10)}

    confusion = list(csv.DictReader(open(repo / "reports/plots/confusion.csv")))
    assert len(confusion) == 500
    assert [int(r["actual"]) for r in confusion] == raw["y_test"].tolist()
    wrong = [r for r in confusion if r["actual"] != r["predicted"]]

    listed = list(csv.DictReader(open(repo / "reports/misclassified.csv")))
    assert len(listed) == len(wrong) == metrics["errors"]
    indices = [int(r["index"]) for r in listed]
    assert indices == sorted(indices)
    for row in listed:
        assert 0.0 < float(row["confidence"]) <= 1.0
        assert int(row["true"]) == raw["y_test"][int(row["index"])]

    mosaics = repo / "reports/mosaics"
    assert len(list(mosaics.glob("*.bmp"))) == 30
    predicted = {int(r["index"]): int(r["predicted"]) for r in listed}
    for d in range(10):
        n_train = int((raw["y_train"] == d).sum())
        n_wrong = sum(1 for r in listed if int(r["true"]) == d)
        n_right = int((raw["y_test"] == d).sum()) - n_wrong
        for name, n, per_row in ((f"train_{d}", n_train, 50), (f"test_{d}", n_right, 50),
                                 (f"test_error_{d}", n_wrong, 10)):
            image = Image.open(mosaics / f"{name}.bmp")
            assert image.format == "BMP" and image.mode == "L"
            assert image.size == (per_row * 28, max(1, math.ceil(n / per_row)) * 28), name
        png = Image.open(repo / f"reports/plots/errors/test_error_{d}.png")
        assert png.format == "PNG"
        assert np.array_equal(np.asarray(png), np.asarray(Image.open(mosaics / f"test_error_{d}.bmp")))
    assert predicted is not None

    # The error analysis agrees with evaluate and is one self-contained page.
    summary = json.loads((repo / "reports/errors_summary.json").read_text())
    assert summary["errors"] == metrics["errors"]
    page = (repo / "reports/errors.html").read_text()
    assert "http://" not in page and "https://" not in page
    assert page.count("data:image/png;base64,") >= metrics["errors"]
    assert len(list((repo / "reports/error_neighbours.csv").open())) == metrics["errors"] + 1


def test_second_repro_reruns_nothing(project):
    repo, _ = project
    lock = (repo / "dvc.lock").read_text()
    again = dvc(repo, "repro")
    assert stages_run(again.stdout) == []
    assert (repo / "dvc.lock").read_text() == lock
    status = dvc(repo, "status")
    assert "up to date" in status.stdout


def test_changing_render_param_reruns_only_render_errors(project):
    repo, _ = project
    set_params(repo, render={"per_row": 25})
    rerun = dvc(repo, "repro")
    assert stages_run(rerun.stdout) == ["render-errors"]
    width, _ = Image.open(repo / "reports/mosaics/train_0.bmp").size
    assert width == 25 * 28


def test_forced_rerun_is_bit_identical(project):
    """Same params, same machine, separate processes: dvc.lock (every hash) unchanged."""
    repo, _ = project
    before = (repo / "dvc.lock").read_text()
    forced = dvc(repo, "repro", "--force")
    assert stages_run(forced.stdout) == ALL_STAGES
    assert (repo / "dvc.lock").read_text() == before
