"""Run the pipeline: real `dvc repro` in a throwaway git repo, on the committed MNIST fixture.

The checks that only read results share the session's `trained_project` (one training for
the whole session). Whatever edits, reruns or commits works on a private copy of it
(`trained_copy`): rerun scoping, determinism, model choice, `dvc exp run`. Only the
bad-param test starts from an untrained project, as a first-time user would.

Paths come from dvc.yaml's `vars` (its one home for paths), params from the project's own
params.yaml: nothing here restates them.
"""

from __future__ import annotations

import csv
import json
import math
import time
import zipfile

import numpy as np
import pytest
import yaml
from PIL import Image

from testbed.pipeline import paths as dvc_vars
from tests.paths import FIXTURE
from tests.projects import (
    copy_project,
    dvc,
    edit_module,
    make_project,
    out_hashes,
    ran_training,
    set_params,
    shipped_params,
    stages_run,
    status,
)

pytestmark = pytest.mark.slow

ALL_STAGES = ["download", "normalize", "train", "evaluate", "render-errors", "audit-labels"]
PATHS = dvc_vars()
# The settings of the original script, which train.mlp reproduces (docs/params.md).
ORIGINAL_RECIPE = {"epochs": 5, "batch_size": 32, "learning_rate": 0.001, "val_fraction": 0.0}


# --- reading a project ----------------------------------------------------------------


def path(repo, key: str):
    return repo / PATHS[key]


def params_of(repo) -> dict:
    return yaml.safe_load((repo / "params.yaml").read_text())


def read_csv(file, delimiter: str = ",") -> list[dict[str, str]]:
    with open(file, newline="") as f:
        return list(csv.DictReader(f, delimiter=delimiter))


def header_of(file) -> list[str]:
    with open(file, newline="") as f:
        return next(csv.reader(f))


# --- one training, read by many -------------------------------------------------------


def test_first_repro_runs_every_stage_in_order(trained_project):
    out = trained_project.repro.stdout
    assert stages_run(out) == ALL_STAGES
    # The original script's printouts.
    names = params_of(trained_project.repo)["dataset"]["classes"]
    first_label = int(np.load(FIXTURE)["y_train"][0])
    assert f"label of training sample 0: {names[first_label]}" in out
    assert "pixel min 0, max 255" in out
    n_test = len(np.load(FIXTURE)["y_test"])
    assert f"{n_test} samples, " in out and " wrong" in out


def test_download_and_normalize_outputs_are_sound(trained_project):
    repo = trained_project.repo
    fixture = dict(np.load(FIXTURE))
    raw = dict(np.load(path(repo, "raw")))
    assert set(raw) == set(fixture)
    for key in fixture:
        assert np.array_equal(raw[key], fixture[key]), key

    processed = dict(np.load(path(repo, "processed")))
    assert set(processed) == {"x_train", "y_train", "x_test", "y_test"}
    for split in ("train", "test"):
        x = processed[f"x_{split}"]
        assert x.dtype == np.float32 and 0.0 <= x.min() and x.max() <= 1.0
        assert np.array_equal(x, raw[f"x_{split}"].astype(np.float32) / np.float32(255))
        assert np.array_equal(processed[f"y_{split}"], raw[f"y_{split}"])

    report = json.loads(path(repo, "data_report").read_text())
    for split in ("train", "test"):
        y = raw[f"y_{split}"]
        assert report[split]["count"] == len(y)
        assert report[split]["class_counts"] == {str(c): int((y == c).sum()) for c in range(10)}

    index = params_of(repo)["normalize"]["sample_index"]
    sample = Image.open(path(repo, "sample"))
    assert sample.mode == "L" and sample.size == (28, 28)
    assert np.array_equal(np.asarray(sample), raw["x_train"][index])


def test_training_outputs_are_sound(trained_project):
    repo = trained_project.repo
    train = params_of(repo)["train"]
    recipe = train[train["model"]]
    model_dir = path(repo, "model_dir")
    with zipfile.ZipFile(model_dir / "model.keras") as archive:
        assert {"config.json", "metadata.json", "model.weights.h5"} <= set(archive.namelist())
    info = json.loads((model_dir / "run_info.json").read_text())
    assert {"tensorflow", "keras", "numpy", "cpu", "intra_op_threads", "seed"} <= set(info)
    assert info["model"] == train["model"] and info["seed"] == train["seed"]

    # dvclive's curves: one row per epoch of the plain training loss and of the
    # validation split's loss and accuracy; no training accuracy (augmented, dropout on).
    plots = path(repo, "curves") / "plots" / "metrics"
    tsvs = sorted(p.relative_to(plots).as_posix() for p in plots.rglob("*.tsv"))
    assert tsvs == ["eval/accuracy.tsv", "eval/loss.tsv", "train/loss.tsv"]
    last = {}
    for name in tsvs:
        rows = read_csv(plots / name, delimiter="\t")
        assert [int(r["step"]) for r in rows] == list(range(1, recipe["epochs"] + 1)), name
        last[name] = float(rows[-1][name.split("/")[1].removesuffix(".tsv")])
    summary = json.loads((path(repo, "curves") / "metrics.json").read_text())
    assert summary == {"step": recipe["epochs"],
                       "train": {"loss": last["train/loss.tsv"]},
                       "eval": {"loss": last["eval/loss.tsv"],
                                "accuracy": last["eval/accuracy.tsv"]}}


def test_evaluate_outputs_agree_with_each_other(trained_project):
    repo = trained_project.repo
    names = params_of(repo)["dataset"]["classes"]
    y_test = np.load(FIXTURE)["y_test"].astype(np.int64)
    probabilities = np.load(path(repo, "predictions"))["probabilities"]
    assert probabilities.shape == (len(y_test), 10) and probabilities.dtype == np.float32
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)
    y_pred = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(y_pred != y_test)

    # The headline: accuracy, errors and loss, recomputed from the predictions; the errors
    # per verdict, and the calibration's temperature.
    metrics = json.loads(path(repo, "metrics").read_text())
    assert set(metrics) == {"accuracy", "errors", "loss", "label_errors", "ambiguous",
                            "model_errors", "temperature"}
    assert metrics["label_errors"] + metrics["ambiguous"] + metrics["model_errors"] == len(wrong)
    assert metrics["errors"] == len(wrong)
    assert metrics["accuracy"] == round(1 - len(wrong) / len(y_test), 6)
    picked = np.clip(probabilities[np.arange(len(y_test)), y_test], 1e-7, 1 - 1e-7)
    assert metrics["loss"] == pytest.approx(float(-np.log(picked.astype(np.float64)).mean()),
                                            abs=2e-6)

    confusion = read_csv(path(repo, "confusion"))
    assert confusion == [{"actual": names[t], "predicted": names[p]}
                         for t, p in zip(y_test.tolist(), y_pred.tolist())]

    classes = read_csv(path(repo, "classes"))
    assert header_of(path(repo, "classes")) == [
        "class", "label", "samples", "errors", "error_rate", "precision", "recall"]
    assert [r["class"] for r in classes] == names
    for c, row in enumerate(classes):
        samples, hits = int((y_test == c).sum()), int(((y_test == c) & (y_pred == c)).sum())
        predicted = int((y_pred == c).sum())
        assert int(row["label"]) == c and int(row["samples"]) == samples
        assert int(row["errors"]) == samples - hits
        assert float(row["error_rate"]) == pytest.approx((samples - hits) / samples, abs=1e-6)
        assert float(row["recall"]) == pytest.approx(hits / samples, abs=1e-6)
        assert float(row["precision"]) == pytest.approx(hits / predicted if predicted else 0.0,
                                                        abs=1e-6)
    assert sum(int(r["errors"]) for r in classes) == metrics["errors"]

    pairs = read_csv(path(repo, "pairs"))
    counts = [int(r["count"]) for r in pairs]
    assert counts == sorted(counts, reverse=True) and sum(counts) == metrics["errors"]
    for row in pairs:
        t, p = int(row["true"]), int(row["predicted"])
        assert t != p and row["pair"] == f"{names[t]}->{names[p]}"
        assert int(row["count"]) == int(((y_test == t) & (y_pred == p)).sum())
        assert float(row["share"]) == pytest.approx(int(row["count"]) / len(wrong), abs=1e-6)

    listed = read_csv(path(repo, "misclassified"))
    assert [int(r["index"]) for r in listed] == wrong.tolist()
    for row in listed:
        i = int(row["index"])
        assert (row["true"], row["predicted"]) == (names[y_test[i]], names[y_pred[i]])
        assert float(row["confidence"]) == pytest.approx(float(probabilities[i].max()),
                                                         abs=1e-6)
        assert row["verdict"] in ("label-error", "ambiguous", "model-error")
    assert sum(r["verdict"] == "label-error" for r in listed) == metrics["label_errors"]


def test_render_errors_outputs_are_sound(trained_project):
    repo = trained_project.repo
    cfg = params_of(repo)["render"]
    names = params_of(repo)["dataset"]["classes"]
    raw = np.load(FIXTURE)
    y_test = raw["y_test"]
    listed = read_csv(path(repo, "misclassified"))
    errors = len(listed)

    mosaics = path(repo, "mosaics")
    assert len(list(mosaics.glob("*.bmp"))) == 30
    for d in range(10):
        n_wrong = sum(1 for r in listed if r["true"] == names[d])
        n_right = int((y_test == d).sum()) - n_wrong
        for name, n, per_row in ((f"train_{d}", int((raw["y_train"] == d).sum()),
                                  cfg["per_row"]),
                                 (f"test_{d}", n_right, cfg["per_row"]),
                                 (f"test_error_{d}", n_wrong, cfg["errors_per_row"])):
            image = Image.open(mosaics / f"{name}.bmp")
            assert image.format == "BMP" and image.mode == "L"
            assert image.size == (per_row * 28, max(1, math.ceil(n / per_row)) * 28), name
        png = Image.open(path(repo, "error_plots") / f"test_error_{d}.png")
        assert png.format == "PNG"
        assert np.array_equal(np.asarray(png),
                              np.asarray(Image.open(mosaics / f"test_error_{d}.bmp")))
        assert Image.open(path(repo, "error_plots") / f"sheet_{d}.png").format == "PNG"

    confident = read_csv(path(repo, "confident"))
    assert len(confident) == min(cfg["top_confident"], errors)
    sure = [float(r["confidence"]) for r in confident]
    assert sure == sorted(sure, reverse=True)
    neighbours = read_csv(path(repo, "neighbours"))
    assert sorted(int(r["index"]) for r in neighbours) == [int(r["index"]) for r in listed]
    for row in neighbours:
        assert len(row["true_neighbours"].split()) == cfg["neighbours_k"]

    # One self-contained page: nothing fetched from the network, every error shown.
    page = path(repo, "page").read_text()
    assert "http://" not in page and "https://" not in page
    assert page.count("data:image/png;base64,") >= errors


def test_metrics_show_fits_a_wide_terminal_and_lists_the_headline(trained_project):
    """The headline (accuracy, errors, loss, the errors per verdict, the calibration's
    temperature) and the last epoch in one table of at most 170 columns."""
    repo = trained_project.repo
    shown = dvc(repo, "metrics", "show").stdout
    lines = shown.splitlines()
    too_wide = [line for line in lines if len(line) > 170]
    assert not too_wide, shown
    assert {"accuracy", "errors", "loss", "label_errors", "ambiguous", "model_errors",
            "temperature"} <= set(lines[0].split()), shown
    metrics = json.loads(path(repo, "metrics").read_text())
    (row,) = [line.split() for line in lines if line.startswith(PATHS["metrics"])]
    assert str(metrics["errors"]) in row, shown


def test_plots_show_lists_every_plot_of_dvc_yaml(trained_project, tmp_path):
    repo = trained_project.repo
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())["plots"]
    titles = {next(iter(entry)) for entry in spec if isinstance(entry, dict)}
    assert titles == {"Validation accuracy", "Loss (plain cross-entropy, no label smoothing)",
                      "Confusion matrix", "Error rate by true class",
                      "Most frequent confusions"}
    shown = json.loads(dvc(repo, "plots", "show", "--json", "-o", str(tmp_path)).stdout)["data"]
    assert titles <= set(shown)
    images = {title for title in shown if title not in titles}
    folder = PATHS["error_plots"]
    assert images == {f"{folder}/{p.name}" for p in path(repo, "error_plots").glob("*.png")}
    for title in titles:
        (plot,) = shown[title]
        assert plot["type"] == "vega" and plot["content"]["data"]["values"], title
    classes = shown["Error rate by true class"][0]["content"]["data"]["values"]
    assert [r["error_rate"] for r in classes] == [
        r["error_rate"] for r in read_csv(path(repo, "classes"))]


# --- what reruns, on a private copy ---------------------------------------------------


def test_second_repro_reruns_nothing_and_a_render_param_reruns_only_render_errors(trained_copy):
    repo = trained_copy
    lock = (repo / "dvc.lock").read_text()
    again = dvc(repo, "repro")
    assert stages_run(again.stdout) == [] and not ran_training(again.stdout)
    assert (repo / "dvc.lock").read_text() == lock
    assert status(repo) == {}

    per_row = params_of(repo)["render"]["per_row"] // 2
    set_params(repo, render={"per_row": per_row})
    rerun = dvc(repo, "repro")
    assert stages_run(rerun.stdout) == ["render-errors"]
    width, _ = Image.open(path(repo, "mosaics") / "train_0.bmp").size
    assert width == per_row * 28


@pytest.mark.parametrize("module, stages", [
    ("analysis/page", ["render-errors"]),                # imported by render-errors only
    ("analysis/scoring", ["evaluate", "render-errors"]),  # evaluate writes its tables
])
def test_editing_a_module_reruns_only_the_stages_that_import_it(trained_copy, module, stages):
    repo = trained_copy
    before = out_hashes(repo)
    edit_module(repo, module)
    assert sorted(status(repo)) == sorted(stages)
    rerun = dvc(repo, "repro")
    assert stages_run(rerun.stdout) == stages and not ran_training(rerun.stdout)
    assert out_hashes(repo) == before  # a comment changes no result, byte for byte


def test_a_thread_count_reruns_the_chosen_framework_only(trained_copy):
    """Thread counts change Keras' and PyTorch's last bits: the chosen framework's are
    params of train and evaluate; another framework's are not."""
    repo = trained_copy
    set_params(repo, train={"torch": {"intra_op_threads": 2}})  # the fixture's: one
    assert status(repo) == {}
    set_params(repo, train={"keras": {"intra_op_threads": 2}})
    assert sorted(status(repo)) == ["evaluate", "train"]


def test_speed_knobs_rerun_nothing_and_editing_params_module_reruns_all_to_the_same_bits(
        trained_copy):
    """speed.* is no stage's dependency because it cannot change a result. And
    stages/runtime/params.py is every stage's dependency (each checks the whole
    params.yaml), so editing it reruns everything: expected, and documented here.

    That full rerun doubles as the determinism check: same params, same machine, new
    processes, and every output file (model, curves, tables, images) has the same bytes,
    with other speed knobs than the first run's: Keras' chunk length (3 batches per call
    against the shipped 100) and the C programs' two threads (against the fixture's one)
    train the same bits; the workers' peer_timeout changes nothing either.
    """
    repo = trained_copy
    before = out_hashes(repo)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    set_params(repo, speed={"keras_steps_per_execution": 3, "c_threads": 2,
                            "peer_timeout": 30})
    assert status(repo) == {}
    edit_module(repo, "runtime/params")
    assert sorted(status(repo)) == sorted(ALL_STAGES)
    rerun = dvc(repo, "repro")
    assert stages_run(rerun.stdout) == ALL_STAGES and ran_training(rerun.stdout)
    assert out_hashes(repo) == before
    after = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert {s: after[s]["outs"] for s in after} == {s: lock[s]["outs"] for s in lock}


def test_only_the_chosen_models_recipe_is_a_dependency(trained_copy):
    """Another model's recipe reruns nothing; choosing another model makes train stale, and
    evaluate, which calibrates on the validation split of that model's recipe (what then
    reruns, train and every stage after it, is checked by the exp run test)."""
    repo = trained_copy
    train = params_of(repo)["train"]
    other = next(name for name in ("cnn_large", "cnn", "mlp") if name != train["model"])
    lock = (repo / "dvc.lock").read_text()
    set_params(repo, train={other: {"epochs": train[other]["epochs"] + 1}})
    assert status(repo) == {}
    again = dvc(repo, "repro")
    assert stages_run(again.stdout) == [] and (repo / "dvc.lock").read_text() == lock

    set_params(repo, train={"model": other})
    assert sorted(status(repo)) == ["evaluate", "train"]


def test_exp_run_with_one_set_trains_the_original_network_with_its_recipe(switched, tmp_path):
    """`dvc exp run -S train.model=mlp` alone: the mlp recipe comes with it, nothing else
    to set. The run trains the original network with the original script's settings. (The
    run: the README's first line, on the trained project, in conftest.py's `switched`;
    applied here to a copy, as right after it.)"""
    repo = copy_project(switched.repo, tmp_path / "project")
    dvc(repo, "exp", "apply", switched.exps["keras", "mlp"])
    out = switched.runs["keras", "mlp"]
    assert stages_run(out) == ["train", "evaluate", "render-errors"], out

    recipe = shipped_params()["train"]["mlp"]
    assert {key: recipe[key] for key in ORIGINAL_RECIPE} == ORIGINAL_RECIPE
    locked = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["train"]
    trained_with = locked["params"]["params.yaml"]
    assert trained_with["train.model"] == "mlp"
    assert trained_with["train.mlp"] == recipe
    assert not any(key.startswith(("train.cnn", "train.cnn_large")) for key in trained_with)

    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == recipe["epochs"], out
    assert json.loads((path(repo, "model_dir") / "run_info.json").read_text())["model"] == "mlp"
    curves = json.loads((path(repo, "curves") / "metrics.json").read_text())
    assert curves["step"] == recipe["epochs"]
    assert "eval" not in curves  # val_fraction 0: no validation split, no validation metrics
    eval_curves = path(repo, "curves") / "plots" / "metrics" / "eval"
    assert {p.read_text() for p in eval_curves.iterdir()} == {"step\taccuracy\n", "step\tloss\n"}
    # Every plot dvc.yaml declares loads, the validation ones as empty series.
    plots = json.loads(dvc(repo, "plots", "show", "--json").stdout)
    assert not plots.get("errors"), plots.get("errors")
    n_train = len(np.load(FIXTURE)["y_train"])
    assert f"train: mlp in keras on {n_train} images, 0 held out" in out


def test_a_bad_param_fails_the_first_stage_in_seconds(tmp_path):
    """render.per_row is read by the last stage only, yet the first stage refuses it: every
    stage checks the whole params.yaml first, so nothing downloads, let alone trains."""
    repo = make_project(tmp_path / "project", render={"per_row": 0})
    started = time.monotonic()
    failed = dvc(repo, "repro", check=False)
    seconds = time.monotonic() - started
    assert failed.returncode != 0
    errors = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: render.per_row: "), failed.stderr
    assert "Traceback" not in failed.stderr
    assert stages_run(failed.stdout) == ["download"] and not ran_training(failed.stdout)
    assert not path(repo, "raw").exists() and not (repo / "dvc.lock").exists()
    assert seconds < 60, f"the bad param took {seconds:.0f}s to report"
