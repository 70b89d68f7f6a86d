"""stages/audit_labels.py: the folds, the audit of out-of-fold probabilities, and the stage
switched off (the default) and refusing what it cannot do.

The audit with real cross-validated training (C's mlp on the fixture, flipped training
labels found) is tests/integration/test_verdicts.py.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from stages import audit_labels
from stages.analysis import verdicts
from stages.analysis.neighbours import nearest
from stages.normalize import normalize
from stages.runtime.failures import DataError
from stages.runtime.outputs import save_npz
from testbed.pipeline import copy_pipeline, stage_command
from testbed.pipeline import paths as dvc_vars
from tests.digits import fixture_data
from tests.projects import set_params

PATHS = dvc_vars()


@pytest.mark.parametrize("n, k", [(10, 2), (11, 3), (1500, 5), (7, 7)])
def test_folds_are_a_seeded_partition_of_nearly_equal_sorted_parts(n, k):
    parts = audit_labels.folds(n, k, seed=3)
    assert len(parts) == k
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert all(np.all(np.diff(p) > 0) for p in parts)
    again = audit_labels.folds(n, k, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    if n > k:
        other = audit_labels.folds(n, k, seed=4)
        assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


@pytest.mark.parametrize("n, k", [(10, 1), (10, 0), (3, 4)])
def test_folds_refuse_what_cannot_be_split(n, k):
    with pytest.raises(DataError, match=f"audit.folds {k} needs 2..{n} folds"):
        audit_labels.folds(n, k, seed=0)


def confident_model(y: np.ndarray, right: float = 0.95) -> np.ndarray:
    """Probabilities of a model that is sure of the class in y for every image."""
    p = np.full((len(y), 10), (1 - right) / 9, dtype=np.float32)
    p[np.arange(len(y)), y] = right
    return p


def test_audit_calls_flipped_clear_training_labels_label_errors():
    data = fixture_data()
    x, y = data["x_train"], data["y_train"].astype(np.int64)
    found, _ = nearest(x, x, 9, exclude=np.arange(len(y)))
    clear = np.flatnonzero((y[found] == y[:, None]).all(axis=1))
    rng = np.random.default_rng(1)
    flipped = np.sort(rng.choice(clear, 12, replace=False))
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + rng.integers(1, 10, 12)) % 10
    # The out-of-fold model read every image as what it shows (the clean label).
    records, temperature = audit_labels.audit(normalize(data)[0]["x_train"], noisy,
                                              confident_model(y), 9)
    assert [r["index"] for r in sorted(records, key=lambda r: r["index"])] == flipped.tolist()
    assert all(r["verdict"] == verdicts.LABEL_ERROR for r in records)
    assert all(r["true"] == noisy[r["index"]] and r["predicted"] == y[r["index"]]
               for r in records)
    assert all(r["index"] not in r["neighbours"] for r in records)  # never itself
    p = [r["p_predicted"] for r in records]
    assert p == sorted(p, reverse=True)  # most confident first
    assert temperature == pytest.approx(verdicts.fit_temperature(confident_model(y), noisy))


def test_audit_of_a_model_that_agrees_with_every_label_finds_nothing():
    data = fixture_data()
    y = data["y_train"].astype(np.int64)
    records, _ = audit_labels.audit(normalize(data)[0]["x_train"], y, confident_model(y), 9)
    assert records == []


def stage_project(tmp_path, **sections):
    repo = copy_pipeline(tmp_path / "p")
    set_params(repo, **sections)
    (repo / PATHS["processed"]).parent.mkdir(parents=True)
    save_npz(repo / PATHS["processed"], **normalize(fixture_data())[0])
    return repo


def argv(repo) -> list[str]:
    args = stage_command("audit-labels", repo)[3:]
    return [a if a.startswith("--") else str(repo / a) for a in args]


def test_switched_off_it_trains_nothing_and_says_so(tmp_path, monkeypatch, capsys):
    repo = stage_project(tmp_path)  # the shipped params: audit.folds 0
    monkeypatch.chdir(repo)
    audit_labels.main(argv(repo))
    out = repo / PATHS["label_audit"]
    with open(out / "label_issues.csv", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == verdicts.MISCLASSIFIED_HEADER and list(reader) == []
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == {"folds": 0, "audited": 0, "errors": 0, "label_errors": 0,
                       "ambiguous": 0, "model_errors": 0, "temperature": None}
    assert Image.open(out / "suspects.png").size == (audit_labels.PER_ROW * 28, 28)
    assert "audit-labels: off (audit.folds: 0); nothing trained" in capsys.readouterr().out


def test_it_refuses_data_parallel_training_before_writing_anything(tmp_path, monkeypatch):
    repo = stage_project(tmp_path, audit={"folds": 3, "framework": "torch", "model": "cnn"},
                         train={"torch": {"workers": 2}})
    monkeypatch.chdir(repo)
    with pytest.raises(DataError, match="audit-labels trains in this one process"):
        audit_labels.main(argv(repo))
    assert not (repo / PATHS["label_audit"]).exists()
