"""Compare runs: two commits with different params, diffed by real `dvc params/metrics/plots diff`.

HEAD~1 is the session's trained project (its params and results, committed); HEAD changes
the chosen model's recipe (one more epoch, twice the learning rate) and commits the results
of its own `dvc repro`: one training for the whole file. Every assertion reads DVC's --json
output or the files `dvc plots diff -o` writes, and checks them against the files each
commit produced.
"""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
import yaml

from testbed.pipeline import paths as dvc_vars
from testbed.processes import sh
from tests.paths import FIXTURE
from tests.projects import copy_project, dvc, set_params

pytestmark = pytest.mark.slow

PATHS = dvc_vars()
METRICS = PATHS["metrics"]
TRAIN_METRICS = f"{PATHS['curves']}/metrics.json"
VAL_ACCURACY = "Validation accuracy"
LOSS = "Loss (plain cross-entropy, no label smoothing)"
CONFUSION = "Confusion matrix"
CLASSES = "Error rate by true class"
PAIRS = "Most frequent confusions"


def read_json(repo, rel):
    return json.loads((repo / rel).read_text())


def snapshot(repo) -> dict:
    """What one commit produced: the metrics, the tables the plots show, the raw texts."""
    return {
        "metrics": read_json(repo, METRICS),
        "curves": read_json(repo, TRAIN_METRICS),
        "tables": {key: (repo / PATHS[key]).read_text()
                   for key in ("confusion", "classes", "pairs")},
        "texts": {rel: (repo / rel).read_text() for rel in (METRICS, TRAIN_METRICS)},
    }


@pytest.fixture(scope="module")
def history(trained_project, tmp_path_factory):
    """HEAD~1 = the trained project (OLD recipe), HEAD = the NEW recipe and its results."""
    repo = copy_project(trained_project.repo, tmp_path_factory.mktemp("compare") / "project")
    train = yaml.safe_load((repo / "params.yaml").read_text())["train"]
    model, recipe = train["model"], train[train["model"]]
    old = {"epochs": recipe["epochs"], "learning_rate": recipe["learning_rate"]}
    # One epoch fewer (the cheaper training), or one more where there is only one.
    epochs = old["epochs"] - 1 if old["epochs"] > 1 else 2
    new = {"epochs": epochs, "learning_rate": old["learning_rate"] * 2}
    runs = {"old": snapshot(repo)}
    set_params(repo, train={model: new})
    dvc(repo, "repro")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", f"train.{model} {new}")
    runs["new"] = snapshot(repo)
    return repo, runs, model, {"old": old, "new": new}


def test_params_diff_shows_exactly_the_changed_params(history):
    repo, _, model, recipes = history
    old, new = recipes["old"], recipes["new"]
    diff = json.loads(dvc(repo, "params", "diff", "HEAD~1", "HEAD", "--json").stdout)
    assert diff == {"params.yaml": {
        f"train.{model}.epochs": {"old": old["epochs"], "new": new["epochs"],
                                  "diff": new["epochs"] - old["epochs"]},
        f"train.{model}.learning_rate": {"old": old["learning_rate"],
                                         "new": new["learning_rate"],
                                         "diff": pytest.approx(old["learning_rate"])},
    }}


def test_metrics_diff_shows_the_headline_and_the_last_epoch(history):
    repo, runs, _, recipes = history
    diff = json.loads(dvc(repo, "metrics", "diff", "HEAD~1", "HEAD", "--all", "--json").stdout)
    old, new = runs["old"]["metrics"], runs["new"]["metrics"]
    scored = diff[METRICS]
    assert set(scored) == {"accuracy", "errors", "loss", "label_errors", "ambiguous",
                           "model_errors", "temperature"}
    for key in scored:
        assert scored[key]["old"] == old[key] and scored[key]["new"] == new[key], key
    assert scored["errors"]["diff"] == new["errors"] - old["errors"]
    assert scored["accuracy"]["diff"] == pytest.approx(new["accuracy"] - old["accuracy"])
    assert old != new  # the two recipes really gave different results

    # The last training epoch is a DVC metric too: plain loss, validation loss and accuracy.
    curves = diff[TRAIN_METRICS]
    assert set(curves) == {"step", "train.loss", "eval.loss", "eval.accuracy"}
    assert curves["step"] == {"old": recipes["old"]["epochs"],  # the epochs trained
                              "new": recipes["new"]["epochs"],
                              "diff": recipes["new"]["epochs"] - recipes["old"]["epochs"]}
    assert curves["eval.accuracy"]["new"] == runs["new"]["curves"]["eval"]["accuracy"]


def test_metrics_files_are_sorted_and_fixed_precision(history):
    """Stable text: sorted keys, 2-space indent, trailing newline, at most 6 decimals."""
    _, runs, _, _ = history

    def floats(value):
        if isinstance(value, float):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from floats(v)
        elif isinstance(value, list):
            for v in value:
                yield from floats(v)

    for run in runs.values():
        for rel, text in run["texts"].items():
            data = json.loads(text)
            assert all(math.isfinite(v) and round(v, 6) == v for v in floats(data)), rel
            if rel != TRAIN_METRICS:  # written by dvclive, in its own layout
                assert text == json.dumps(data, indent=2, sort_keys=True) + "\n", rel


def test_plots_diff_json_has_both_revisions_of_every_plot(history, tmp_path):
    repo, runs, _, recipes = history
    out = tmp_path / "plots"
    result = dvc(repo, "plots", "diff", "HEAD~1", "HEAD", "--json", "-o", str(out))
    plots = json.loads(result.stdout)["data"]
    assert {VAL_ACCURACY, LOSS, CONFUSION, CLASSES, PAIRS} <= set(plots)
    revisions = (("HEAD~1", "old"), ("HEAD", "new"))

    def values(title):
        (plot,) = plots[title]
        assert plot["type"] == "vega" and set(plot["revisions"]) == {"HEAD~1", "HEAD"}
        return plot["content"]["data"]["values"]

    # Curves: one point per epoch for each revision.
    accuracy = values(VAL_ACCURACY)
    loss = values(LOSS)
    for rev, run in revisions:
        epochs = list(range(1, recipes[run]["epochs"] + 1))
        assert [int(r["step"]) for r in accuracy if r["rev"] == rev] == epochs, rev
        for split in ("train", "eval"):
            steps = [int(r["step"]) for r in loss
                     if r["rev"] == rev and r["filename"] == f"{split}/loss.tsv"]
            assert steps == epochs, (rev, split)

    # Tables: every row of each revision's file, as that commit wrote it.
    n_test = len(np.load(FIXTURE)["y_test"])
    for title, key, fields in ((CONFUSION, "confusion", ("actual", "predicted")),
                               (CLASSES, "classes", ("class", "errors", "error_rate")),
                               (PAIRS, "pairs", ("pair", "count"))):
        rows = values(title)
        for rev, run in revisions:
            expected = [tuple(r[f] for f in fields) for r in
                        csv.DictReader(io.StringIO(runs[run]["tables"][key]))]
            got = [tuple(str(r[f]) for f in fields) for r in rows if r["rev"] == rev]
            assert got == expected, (title, rev)
            if key == "confusion":
                assert len(got) == n_test

    # Image plots (the error mosaics and sheets): both revisions' PNGs in the output folder.
    folder = PATHS["error_plots"]
    images = {title: entries for title, entries in plots.items()
              if title.startswith(f"{folder}/")}
    assert len(images) == 20  # test_error_{c}.png and sheet_{c}.png
    for title, entries in images.items():
        assert sorted(e["revisions"][0] for e in entries) == ["HEAD", "HEAD~1"], title
        for entry in entries:
            assert entry["type"] == "image"
            path = out / entry["url"].rsplit("/", 1)[-1]
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


def test_plots_diff_renders_an_html_page(history, tmp_path):
    repo, _, _, _ = history
    out = tmp_path / "html"
    dvc(repo, "plots", "diff", "HEAD~1", "HEAD", "-o", str(out))
    page = (out / "index.html").read_text()
    for title in (VAL_ACCURACY, LOSS, CONFUSION, CLASSES, PAIRS):
        assert title in page, title
    assert page.count('"rev": "HEAD~1"') and page.count('"rev": "HEAD"')
    pngs = {p.name for p in (out / "static").glob("*.png")}
    prefix = PATHS["error_plots"].replace("/", "_")
    for rev in ("HEAD~1", "HEAD"):
        names = {f"{rev}_{prefix}_test_error_{d}.png" for d in range(10)}
        assert names <= pngs
        assert all(f'src="static/{name}"' in page for name in names)
