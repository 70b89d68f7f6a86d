"""`mnist-committee`: a queue of real experiments (`dvc exp run --queue`, `dvc queue start`)
combined into one committee, read through DVC; each member's probabilities checked against
the file `dvc exp apply` puts in the workspace; one-line refusals for an unknown experiment
and for experiments evaluated on different test data.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from testbed.pipeline import paths as dvc_vars
from testbed.processes import sh
from tests.browser import load_in_chromium
from tests.integration.test_experiments import exp_show
from tests.paths import FIXTURE
from tests.projects import copy_project, dvc, run_queue

pytestmark = pytest.mark.slow

COMMAND = str(Path(sys.executable).parent / "mnist-committee")
PATHS = dvc_vars()
MEMBERS = {"seed-1": 1, "seed-2": 2, "seed-3": 3}


def committee(repo: Path, *args, check: bool = True):
    return sh(repo, COMMAND, *map(str, args), check=check)


@pytest.fixture(scope="module")
def queued(reader_project, tmp_path_factory):
    """A copy of the reader project (the C mlp on the fixture, committed) with three seeds
    run through the real queue (each holding out a validation split), and one experiment
    evaluated on other test data, queued with them."""
    root = tmp_path_factory.mktemp("committee")
    repo = copy_project(reader_project, root / "project")
    for name, seed in MEMBERS.items():
        # A validation split, so that evaluate fits each member's temperature on its own.
        dvc(repo, "exp", "run", "--queue", "-n", name, "-S", f"train.seed={seed}",
            "-S", "train.mlp.val_fraction=0.1")
    # Other test data: the fixture with its test set's first image dropped, as a source of
    # its own (its own hash, at an absolute path the queue's copy reaches too).
    data = dict(np.load(FIXTURE))
    data["x_test"], data["y_test"] = data["x_test"][1:], data["y_test"][1:]
    other = root / "other.npz"
    np.savez_compressed(other, **data)
    digest = hashlib.sha256(other.read_bytes()).hexdigest()
    dvc(repo, "exp", "run", "--queue", "-n", "other-data", "-S",
        f"download.url={other.as_uri()}", "-S", f"download.sha256={digest}")
    status = run_queue(repo, root / "queue-start.log")
    for name in [*MEMBERS, "other-data"]:
        line = next((line for line in status.splitlines() if f" {name} " in line), "")
        assert line.split()[-1:] == ["Success"], status
    return repo


def members_files(repo: Path, names) -> dict[str, dict]:
    """Each experiment's predictions and metrics as `dvc exp apply` checks them out."""
    found = {}
    for name in names:
        dvc(repo, "exp", "apply", name)
        with np.load(repo / PATHS["predictions"]) as f:
            found[name] = {"probabilities": f["probabilities"],
                           "metrics": json.loads((repo / PATHS["metrics"]).read_text())}
    sh(repo, "git", "checkout", "--", ".")
    dvc(repo, "checkout", "--force", "--with-deps", "evaluate")
    return found


def test_the_committee_is_the_mean_of_its_members(queued, tmp_path):
    repo = copy_project(queued, tmp_path / "project")
    names = list(MEMBERS)
    out = tmp_path / "committee"
    printed = committee(repo, *names, "--out", out).stdout
    members = members_files(repo, names)
    y = np.load(FIXTURE)["y_test"].astype(np.int64)

    with np.load(out / "predictions.npz") as f:
        combined = f["probabilities"]
    stacked = np.stack([members[n]["probabilities"] for n in names]).astype(np.float64)
    assert len({m["probabilities"].tobytes() for m in members.values()}) == 3  # three models
    np.testing.assert_array_equal(combined, stacked.mean(axis=0).astype(np.float32))

    metrics = json.loads((out / "metrics.json").read_text())
    wrong = np.flatnonzero(combined.argmax(axis=1) != y)
    assert metrics["errors"] == len(wrong)
    assert metrics["accuracy"] == round(1 - len(wrong) / len(y), 6)
    assert metrics["label_errors"] + metrics["ambiguous"] + metrics["model_errors"] == len(wrong)
    # Each member's own headline is the one its evaluate stage wrote.
    for row, name in zip(metrics["members"], names):
        assert row["revision"] == name
        own = members[name]["metrics"]
        assert (row["errors"], row["accuracy"]) == (own["errors"], own["accuracy"])
    assert metrics["member_mean_errors"] == round(
        np.mean([members[n]["metrics"]["errors"] for n in names]), 6)
    # Its verdicts' calibration: the members' own temperatures, geometrically averaged.
    temperatures = [members[n]["metrics"]["temperature"] for n in names]
    assert len(set(temperatures)) > 1
    assert metrics["temperature"] == pytest.approx(np.exp(np.mean(np.log(temperatures))),
                                                   abs=1e-6)

    # Every committee error in misclassified.csv, with a verdict; the table says the same.
    rows = (out / "misclassified.csv").read_text().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == wrong.tolist()
    assert re.search(rf"^committee of 3 +{metrics['errors']} ", printed, re.M)
    for name in names:
        assert re.search(rf"^{name} +{members[name]['metrics']['errors']} ", printed, re.M)


def test_the_errors_diff_against_a_member(queued, tmp_path):
    repo = copy_project(queued, tmp_path / "project")
    out = tmp_path / "committee"
    printed = committee(repo, "seed-1", "seed-2", "seed-3", "--against", "seed-2",
                        "--out", out).stdout
    member = members_files(repo, ["seed-2"])["seed-2"]["probabilities"]
    with np.load(out / "predictions.npz") as f:
        combined = f["probabilities"]
    y = np.load(FIXTURE)["y_test"]
    member_wrong = set(np.flatnonzero(member.argmax(axis=1) != y).tolist())
    committee_wrong = set(np.flatnonzero(combined.argmax(axis=1) != y).tolist())
    fixed, broken = member_wrong - committee_wrong, committee_wrong - member_wrong
    assert (f"seed-2: {len(member_wrong)} errors, committee: {len(committee_wrong)} errors "
            f"(of {len(y)} test images)") in printed
    assert f"fixed {len(fixed)} (" in printed and f"newly wrong {len(broken)}," in printed
    page = (out / "errors_diff.html").read_text()
    assert "<script" not in page and "http://" not in page
    result = load_in_chromium(page, tmp_path)
    assert result["images"] == len(member_wrong | committee_wrong)
    assert result["broken"] == [] and result["problems"] == []


def test_the_default_folder_is_ignored_by_git_and_dvc(queued, tmp_path):
    repo = copy_project(queued, tmp_path / "project")
    committee(repo, "seed-1", "seed-3")
    assert (repo / "reports/committee/metrics.json").is_file()
    # No output of the pipeline: git ignores the folder, DVC does not track it.
    assert sh(repo, "git", "status", "--porcelain", "--ignored", "reports/committee").stdout \
        == "!! reports/committee/\n"
    assert "reports/committee" not in dvc(repo, "status").stdout


@pytest.mark.parametrize("args, message", [
    (["seed-1", "no-such-exp"], "no-such-exp"),
    (["seed-1", "other-data"], "evaluated different test data"),
    (["seed-1"], "a committee needs 2 to 100 different members, got 1"),
    (["seed-1", "seed-1"], "a committee needs 2 to 100 different members, got 1"),
    (["seed-1", "seed-2", "--against", "seed-3"], "--against seed-3: not a member"),
])
def test_refusals_are_one_line_and_write_nothing(queued, tmp_path, args, message):
    out = tmp_path / "committee"
    run = committee(queued, *args, "--out", out, check=False)
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and message in run.stderr, run.stderr
    assert run.stderr.startswith("error: ")
    assert not out.exists()


def test_members_are_the_experiments_dvc_shows(queued):
    shown = exp_show(queued)
    assert set(MEMBERS) | {"other-data"} <= set(shown)
    for name, seed in MEMBERS.items():
        assert shown[name]["params"]["train"]["seed"] == seed
    assert yaml.safe_load((queued / "params.yaml").read_text())["train"]["seed"] == 42
