"""Experiments: `dvc exp run -S`, a grid through the real celery queue, `dvc exp show`.

The baseline is a copy of the session's reader project (the original network in plain C: the
queue's workings are the same in every framework, and C trains in seconds), run to the end
of the pipeline and switched to the default params' offline setup: `download.url` cannot be
fetched and the data comes from the mirror `../shared/data/mnist.npz`, a path relative to
the project, beside which the test puts a copy of the fixture. Only download reruns for that
(same bytes: nothing after it does). Queued experiments run in a temporary copy under
.dvc/tmp/exps/, where that relative path leads nowhere: they work because download's result
is already in the cache (dvc.lock committed with the baseline), so no queued experiment runs
download at all. The test checks exactly that.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import time

import numpy as np
import pytest
import yaml

from testbed.pipeline import paths as dvc_vars
from testbed.processes import sh
from tests.paths import FIXTURE, FIXTURE_SHA256
from tests.projects import copy_project, dvc, ran_training, run_queue, set_params, stages_run

pytestmark = pytest.mark.slow

PATHS = dvc_vars()
METRICS = PATHS["metrics"]
TRAIN_METRICS = f"{PATHS['curves']}/metrics.json"
# The grid over the chosen model's recipe ("{model}" is filled in): two points, each a
# different (epochs, learning_rate) pair; and one more run in the workspace.
GRID = {"grid-a": {"epochs": 1, "learning_rate": 0.001},
        "grid-b": {"epochs": 2, "learning_rate": 0.004}}
WORKSPACE_EXP = ("ws-run", {"epochs": 2, "learning_rate": 0.001})


def overrides(model: str, recipe: dict) -> list[str]:
    return [arg for key, value in recipe.items()
            for arg in ("-S", f"train.{model}.{key}={value}")]


@pytest.fixture(scope="module")
def lab(reader_project, tmp_path_factory):
    root = tmp_path_factory.mktemp("experiments")
    (root / "shared" / "data").mkdir(parents=True)
    shutil.copy(FIXTURE, root / "shared" / "data" / "mnist.npz")
    repo = copy_project(reader_project, root / "project")
    # The label audit's auditor (off) on C's cnn, so that the grid over the mlp's recipe is
    # train's alone; and the stages after evaluate, which the reader project leaves out.
    set_params(repo, audit={"model": "cnn"})
    dvc(repo, "repro")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "the whole pipeline")
    set_params(repo, download={
        "url": (root / "unreachable" / "mnist.npz").as_uri(),
        "mirrors": [{"url": "../shared/data/mnist.npz", "sha256": FIXTURE_SHA256,
                     "format": "npz"}],
    })
    baseline = dvc(repo, "repro")
    assert "trying the next source" in baseline.stderr  # the mirror is what fed it
    # Same bytes from the mirror: nothing after download reruns.
    assert stages_run(baseline.stdout) == ["download"], baseline.stdout
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "baseline: data from the offline mirror")
    model = yaml.safe_load((repo / "params.yaml").read_text())["train"]["model"]

    for name, recipe in GRID.items():
        dvc(repo, "exp", "run", "--queue", "-n", name, *overrides(model, recipe))
    started = time.monotonic()
    status = run_queue(repo, root / "queue-start.log")
    queue_seconds = time.monotonic() - started
    logs = {name: dvc(repo, "queue", "logs", name, check=False).stdout for name in GRID}

    name, recipe = WORKSPACE_EXP
    workspace = dvc(repo, "exp", "run", "-n", name, *overrides(model, recipe))
    yield {"repo": repo, "model": model, "status": status, "logs": logs,
           "workspace": workspace, "queue_seconds": queue_seconds}


def exp_show(repo) -> dict[str, dict]:
    """Every experiment of the baseline commit by name: its params and metrics."""
    rows = json.loads(dvc(repo, "exp", "show", "--json").stdout)
    found = {}
    for row in rows:
        for exp in row.get("experiments") or []:
            for rev in exp["revs"]:
                data = rev["data"]
                found[rev["name"]] = {
                    "params": data["params"]["params.yaml"]["data"],
                    "metrics": {path: m["data"] for path, m in data["metrics"].items()},
                }
    return found


def test_queued_grid_runs_with_two_workers(lab):
    status = lab["status"]
    for name in GRID:
        line = next((line for line in status.splitlines() if f" {name} " in line), None)
        assert line is not None and line.split()[-1] == "Success", status
    print(f"queue of {len(GRID)} with -j 2: {lab['queue_seconds']:.1f}s")


@pytest.mark.parametrize("name", sorted(GRID))
def test_queued_experiment_trains_but_restores_download_from_cache(lab, name):
    log = lab["logs"][name]
    assert stages_run(log) == ["train", "evaluate", "render-errors"], log
    assert "Stage 'download' didn't change, skipping" in log
    epochs = [line for line in log.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == GRID[name]["epochs"]


def test_exp_run_with_set_params_in_the_workspace(lab):
    repo, out, model = lab["repo"], lab["workspace"].stdout, lab["model"]
    recipe = WORKSPACE_EXP[1]
    assert stages_run(out) == ["train", "evaluate", "render-errors"]
    assert ran_training(out)
    # The workspace now holds the experiment: its params and its curves, one row an epoch.
    train = yaml.safe_load((repo / "params.yaml").read_text())["train"]
    assert {key: train[model][key] for key in recipe} == recipe
    rows = list(csv.DictReader(io.StringIO(
        (repo / PATHS["curves"] / "plots/metrics/train/loss.tsv").read_text()), delimiter="\t"))
    assert len(rows) == recipe["epochs"]


def test_exp_show_lists_every_run_with_params_and_metrics(lab):
    repo, model = lab["repo"], lab["model"]
    n_test = len(np.load(FIXTURE)["y_test"])
    found = exp_show(repo)
    expected = {**GRID, WORKSPACE_EXP[0]: WORKSPACE_EXP[1]}
    assert set(expected) <= set(found), found.keys()
    accuracies = set()
    for name, recipe in expected.items():
        trained = found[name]["params"]["train"][model]
        assert {key: trained[key] for key in recipe} == recipe, name
        metrics = found[name]["metrics"]
        scored = metrics[METRICS]
        assert {"accuracy", "errors", "loss", "label_errors", "model_errors"} <= set(scored)
        assert scored["errors"] == round((1 - scored["accuracy"]) * n_test)
        assert metrics[TRAIN_METRICS]["step"] == recipe["epochs"]  # the epochs trained
        accuracies.add(scored["accuracy"])
    assert len(accuracies) > 1  # different params, different results

    # The same table as CSV, for a spreadsheet: one row per experiment.
    table = list(csv.DictReader(io.StringIO(dvc(repo, "exp", "show", "--csv").stdout)))
    by_name = {row["Experiment"]: row for row in table if row["Experiment"]}
    for name, recipe in expected.items():
        row = by_name[name]
        assert float(row[f"train.{model}.learning_rate"]) == recipe["learning_rate"]
        assert float(row["accuracy"]) == found[name]["metrics"][METRICS]["accuracy"]


def test_applying_a_queued_experiment_restores_its_results_without_training(lab):
    repo = lab["repo"]
    shown = exp_show(repo)["grid-b"]["metrics"][METRICS]
    dvc(repo, "exp", "apply", "grid-b")
    assert json.loads((repo / METRICS).read_text()) == shown
    again = dvc(repo, "repro")
    assert stages_run(again.stdout) == [] and not ran_training(again.stdout)
    assert json.loads(dvc(repo, "status", "--json").stdout) == {}
