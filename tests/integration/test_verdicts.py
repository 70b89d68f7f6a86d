"""Whose mistake is each error, proven on labels the test itself made wrong.

Synthetic label noise: the labels of clear, correctly classified test images (the fixture
model's confidence >= 0.99) are flipped to another class in a modified test set written here,
which the pipeline downloads as its data. The model and the training images are unchanged,
so each flipped image is now an error whose label is wrong: the pipeline must call it a
label-error, and few of the errors it had anyway. Then the page shows every verdict with its
images in a real headless Chromium, and `dvc metrics diff` the counts per verdict.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re

import numpy as np
import pytest

from stages.analysis.verdicts import LABEL_ERROR, VERDICTS
from testbed.pipeline import paths as dvc_vars
from testbed.processes import sh
from tests.browser import load_in_chromium
from tests.digits import fixture_data
from tests.projects import copy_project, dvc, set_params

pytestmark = pytest.mark.slow

PATHS = dvc_vars()
FLIPS = 20


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def flipped_test_set(predictions: np.ndarray, path, seed: int = 0) -> np.ndarray:
    """The fixture with FLIPS clear test images relabelled (each to a random other class),
    written to path; returns their indices."""
    data = fixture_data()
    y = data["y_test"]
    clear = np.flatnonzero((predictions.argmax(1) == y) & (predictions.max(1) >= 0.99))
    assert len(clear) >= 3 * FLIPS, f"only {len(clear)} clear test images"
    rng = np.random.default_rng(seed)
    flipped = np.sort(rng.choice(clear, FLIPS, replace=False))
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + rng.integers(1, 10, FLIPS)) % 10
    assert (noisy[flipped] != y[flipped]).all()
    np.savez(path, **(data | {"y_test": noisy}))
    return flipped


def test_flipped_test_labels_are_called_label_errors_on_the_page_and_in_the_metrics(
        reader_project, tmp_path):
    repo = copy_project(reader_project, tmp_path / "project")
    with np.load(repo / PATHS["predictions"]) as f:
        before = f["probabilities"]
    noisy = tmp_path / "noisy.npz"
    flipped = set(flipped_test_set(before, noisy).tolist())
    set_params(repo, download={"url": noisy.as_uri(), "format": "npz", "mirrors": [],
                               "sha256": hashlib.sha256(noisy.read_bytes()).hexdigest()})
    dvc(repo, "repro")

    with np.load(repo / PATHS["predictions"]) as f:
        assert np.array_equal(f["probabilities"], before)  # same model, same images
    errors = read_csv(repo / PATHS["misclassified"])
    assert flipped <= {int(r["index"]) for r in errors}
    called = {int(r["index"]) for r in errors if r["verdict"] == LABEL_ERROR}
    recall = len(called & flipped) / len(flipped)
    precision = len(called & flipped) / max(1, len(called))
    unflipped = len(errors) - len(flipped)
    print(f"synthetic label noise: recall {recall:.2f}, precision {precision:.2f}, "
          f"{len(called - flipped)} of {unflipped} unflipped errors called label-error")
    assert recall >= 0.8
    assert len(called - flipped) <= 0.15 * unflipped
    for r in errors:  # the evidence behind each flipped image's verdict
        if int(r["index"]) in flipped and r["verdict"] == LABEL_ERROR:
            assert r["confident_learning"] == "yes"
            assert 2 * int(r["votes_predicted"]) > len(r["neighbour_labels"].split())

    metrics = json.loads((repo / PATHS["metrics"]).read_text())
    assert metrics["label_errors"] == len(called)
    assert sum(metrics[k] for k in ("label_errors", "ambiguous", "model_errors")) == len(errors)
    # dvc metrics diff: the committed clean run against the noisy workspace, per verdict.
    diff = json.loads(dvc(repo, "metrics", "diff", "--json").stdout)[PATHS["metrics"]]
    assert diff["label_errors"]["new"] == metrics["label_errors"]
    assert diff["label_errors"]["diff"] >= 0.8 * FLIPS
    assert diff["errors"]["diff"] == FLIPS
    shown = dvc(repo, "metrics", "diff", "--all").stdout
    for key in ("label_errors", "ambiguous", "model_errors"):
        assert key in shown

    # The page: every verdict's group with one image per error, all of them loading.
    page = (repo / PATHS["page"]).read_text()
    for verdict in VERDICTS:
        n = sum(r["verdict"] == verdict for r in errors)
        group = re.search(rf'<h3 id="{verdict}">[^<]*: (\d+)</h3>\n(.*?)(?=<h3|<h2)', page, re.S)
        assert group and int(group.group(1)) == n, verdict
        assert group.group(2).count("<img ") == n
        assert group.group(2).count("nearest training images") == n  # the evidence
    result = load_in_chromium(page, tmp_path)
    assert result["broken"] == [] and result["problems"] == []
    assert result["images"] == page.count("<img ")
    sh(repo, "git", "status", "--short")  # the copy is a working repository still


def test_the_opt_in_training_audit_finds_flipped_training_labels(tmp_path):
    """audit.folds 3 with the shipped auditor, the C mlp (30 epochs: seconds a fold): training
    images whose 9 nearest other
    training images all share their label (clear ones) get another label; the audit's
    cross-validated verdicts must call them label errors, in its table, mosaic and metrics."""
    from PIL import Image

    from stages.analysis.neighbours import nearest
    from tests.conftest import READER_TRAIN
    from tests.projects import make_project

    data = fixture_data()
    x, y = data["x_train"], data["y_train"]
    found, _ = nearest(x, x, 9, exclude=np.arange(len(y)))
    clear = np.flatnonzero((y[found] == y[:, None]).all(axis=1))
    rng = np.random.default_rng(0)
    flipped = np.sort(rng.choice(clear, FLIPS, replace=False))
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + rng.integers(1, 10, FLIPS)) % 10
    path = tmp_path / "noisy.npz"
    np.savez(path, **(data | {"y_train": noisy}))
    repo = make_project(tmp_path / "project", train={"mlp": READER_TRAIN["mlp"]},
                        audit={"folds": 3},
                        download={"url": path.as_uri(),
                                  "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    proc = dvc(repo, "repro", "audit-labels")

    out = repo / PATHS["label_audit"]
    rows = read_csv(out / "label_issues.csv")
    called = [int(r["index"]) for r in rows if r["verdict"] == LABEL_ERROR]
    recall = len(set(called) & set(flipped.tolist())) / FLIPS
    print(f"training audit: recall {recall:.2f}, {len(called)} suspects, {len(rows)} "
          "out-of-fold errors")
    assert recall >= 0.8
    for r in rows:  # the given (noisy) label, and never the image itself as a neighbour
        assert int(r["true"]) == noisy[int(r["index"])]
        assert int(r["index"]) not in map(int, r["neighbours"].split())
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["folds"], metrics["audited"]) == (3, len(y))
    assert metrics["label_errors"] == len(called) and metrics["errors"] == len(rows)
    width, height = Image.open(out / "suspects.png").size
    assert (width, height) == (10 * 28, -(-len(called) // 10) * 28)
    assert f"{len(called)} suspected label errors" in proc.stdout
    assert proc.stdout.count("audit: fold ") == 3
