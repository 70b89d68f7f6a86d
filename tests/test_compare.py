"""Compare runs: two commits with different params, diffed by real `dvc params/metrics/plots diff`.

One throwaway project, two commits (train.epochs 1 -> 2, train.learning_rate 0.002 ->
0.004), each with its own `dvc repro`; every assertion reads DVC's --json output or the
files `dvc plots diff -o` writes, and checks them against the metrics each commit produced.
"""

from __future__ import annotations

import csv
import io
import json
import math

import pytest

from conftest import TINY_TRAIN, dvc, make_project, set_params, sh

pytestmark = pytest.mark.slow

METRICS = "reports/metrics.json"
SUMMARY = "reports/errors_summary.json"
TRAIN_METRICS = "reports/train/metrics.json"
OLD = {"epochs": 1, "learning_rate": 0.002}
NEW = {"epochs": 2, "learning_rate": 0.004}


def read_json(repo, rel):
    return json.loads((repo / rel).read_text())


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """Commit HEAD~1 = OLD params and their results, HEAD = NEW params and theirs."""
    repo = make_project(tmp_path_factory.mktemp("compare") / "project",
                        train={**TINY_TRAIN, **OLD})
    runs = {}
    for name, params in (("old", OLD), ("new", NEW)):
        set_params(repo, train=params)
        dvc(repo, "repro")
        sh(repo, "git", "add", "-A")
        sh(repo, "git", "commit", "-qm", f"train {params}")
        runs[name] = {
            "metrics": read_json(repo, METRICS),
            "summary": read_json(repo, SUMMARY),
            "confusion": (repo / "reports/plots/confusion.csv").read_text(),
            "texts": {rel: (repo / rel).read_text() for rel in (METRICS, SUMMARY, TRAIN_METRICS)},
        }
    return repo, runs


def test_params_diff_shows_exactly_the_changed_params(history):
    repo, _ = history
    diff = json.loads(dvc(repo, "params", "diff", "HEAD~1", "HEAD", "--json").stdout)
    assert diff == {"params.yaml": {
        "train.epochs": {"old": 1, "new": 2, "diff": 1},
        "train.learning_rate": {"old": 0.002, "new": 0.004, "diff": pytest.approx(0.002)},
    }}


def test_metrics_diff_shows_accuracy_errors_and_per_class_numbers(history):
    repo, runs = history
    diff = json.loads(dvc(repo, "metrics", "diff", "HEAD~1", "HEAD", "--all", "--json").stdout)
    old, new = runs["old"]["metrics"], runs["new"]["metrics"]
    scored = diff[METRICS]
    for key in ("accuracy", "errors", "loss", "samples"):
        assert scored[key]["old"] == old[key] and scored[key]["new"] == new[key], key
    for d in range(10):
        for key in ("precision", "recall", "errors"):
            entry = scored[f"per_class.{d}.{key}"]
            assert entry["old"] == old["per_class"][str(d)][key]
            assert entry["new"] == new["per_class"][str(d)][key]
    assert scored["samples"]["diff"] == 0
    assert scored["accuracy"]["diff"] == pytest.approx(new["accuracy"] - old["accuracy"])
    assert old != new  # the two param sets really gave different results

    # The error analysis and the last training epoch are DVC metrics too.
    summary = diff[SUMMARY]
    assert summary["errors"] == {"old": runs["old"]["summary"]["errors"],
                                 "new": runs["new"]["summary"]["errors"],
                                 "diff": runs["new"]["summary"]["errors"]
                                 - runs["old"]["summary"]["errors"]}
    assert diff[TRAIN_METRICS]["step"] == {"old": 0, "new": 1, "diff": 1}
    assert {"train.accuracy", "train.loss", "eval.accuracy", "eval.loss"} <= set(
        diff[TRAIN_METRICS])


def test_metrics_files_are_sorted_and_fixed_precision(history):
    """Stable text: sorted keys, 2-space indent, trailing newline, at most 6 decimals."""
    _, runs = history

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


def test_plots_diff_json_has_both_revisions_of_curves_and_confusion(history, tmp_path):
    repo, runs = history
    out = tmp_path / "plots"
    result = dvc(repo, "plots", "diff", "HEAD~1", "HEAD", "--json", "-o", str(out))
    plots = json.loads(result.stdout)["data"]
    assert {"Training curves", "Training loss", "Confusion matrix",
            "Error rate by true digit", "Most frequent confusions"} <= set(plots)

    def values(title):
        (plot,) = plots[title]
        assert plot["type"] == "vega" and set(plot["revisions"]) == {"HEAD~1", "HEAD"}
        return plot["content"]["data"]["values"]

    # Training curves: one point per epoch for each revision, train and validation.
    for title, field in (("Training curves", "accuracy"), ("Training loss", "loss")):
        rows = values(title)
        for rev, epochs in (("HEAD~1", OLD["epochs"]), ("HEAD", NEW["epochs"])):
            for split in ("train", "eval"):
                steps = [int(r["step"]) for r in rows
                         if r["rev"] == rev and r["filename"] == f"{split}/{field}.tsv"]
                assert steps == list(range(epochs)), (title, rev, split)

    # Confusion matrix: every test image of each revision, as each commit predicted it.
    rows = values("Confusion matrix")
    for rev, run in (("HEAD~1", runs["old"]), ("HEAD", runs["new"])):
        expected = [(r["actual"], r["predicted"])
                    for r in csv.DictReader(io.StringIO(run["confusion"]))]
        got = [(str(r["actual"]), str(r["predicted"])) for r in rows if r["rev"] == rev]
        assert got == expected and len(got) == 500, rev

    # Image plots (the error mosaics): both revisions' PNGs written to the output folder.
    images = {title: entries for title, entries in plots.items()
              if title.startswith("reports/plots/errors/")}
    assert len(images) == 20  # test_error_{d}.png and sheet_{d}.png
    for title, entries in images.items():
        assert sorted(e["revisions"][0] for e in entries) == ["HEAD", "HEAD~1"], title
        for entry in entries:
            assert entry["type"] == "image"
            path = out / entry["url"].rsplit("/", 1)[-1]
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path


def test_plots_diff_renders_an_html_page(history, tmp_path):
    repo, _ = history
    out = tmp_path / "html"
    dvc(repo, "plots", "diff", "HEAD~1", "HEAD", "-o", str(out))
    page = (out / "index.html").read_text()
    for title in ("Training curves", "Training loss", "Confusion matrix"):
        assert title in page
    assert page.count('"rev": "HEAD~1"') and page.count('"rev": "HEAD"')
    pngs = {p.name for p in (out / "static").glob("*.png")}
    for rev in ("HEAD~1", "HEAD"):
        names = {f"{rev}_reports_plots_errors_test_error_{d}.png" for d in range(10)}
        assert names <= pngs
        assert all(f'src="static/{name}"' in page for name in names)
