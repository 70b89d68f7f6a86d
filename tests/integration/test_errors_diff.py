"""`mnist-errors-diff`: which test images a change fixed, broke or left wrong, between two
revisions of a real project, read through DVC (the cache, or the remote once the cache is
gone), checked against each revision's own reports/misclassified.csv; its page opened in a
real headless Chromium.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import pytest
import yaml

from testbed.processes import sh
from tests.browser import load_in_chromium
from tests.projects import copy_project, dvc, reseeded_on_a_remote, set_params

pytestmark = pytest.mark.slow

COMMAND = str(Path(sys.executable).parent / "mnist-errors-diff")
MISCLASSIFIED = "reports/misclassified.csv"


def errors_diff(repo: Path, *args, check: bool = True):
    return sh(repo, COMMAND, *map(str, args), check=check)


def wrong(text: str) -> dict[int, str]:
    """index -> predicted class, from a misclassified.csv's text."""
    return {int(row["index"]): row["predicted"] for row in csv.DictReader(io.StringIO(text))}


def verdicts_of(text: str) -> dict[int, str]:
    """index -> verdict, from a misclassified.csv's text."""
    return {int(row["index"]): row["verdict"] for row in csv.DictReader(io.StringIO(text))}


@pytest.fixture(scope="module")
def changed(reader_project, tmp_path_factory):
    """A copy of the reader project whose workspace retrained with another seed (HEAD is
    the reader's results), and each side's misclassified list as evaluate wrote it."""
    repo = copy_project(reader_project, tmp_path_factory.mktemp("diff") / "project")
    old = wrong((repo / MISCLASSIFIED).read_text())
    old_verdicts = verdicts_of((repo / MISCLASSIFIED).read_text())
    set_params(repo, train={"seed": 11})
    dvc(repo, "repro", "evaluate")
    new = wrong((repo / MISCLASSIFIED).read_text())
    new_verdicts = verdicts_of((repo / MISCLASSIFIED).read_text())
    assert old != new
    return repo, old, new, old_verdicts, new_verdicts


def test_the_groups_are_the_two_error_lists_compared(changed, tmp_path):
    repo, old, new, old_verdicts, new_verdicts = changed
    page = tmp_path / "diff.html"
    result = json.loads(errors_diff(repo, "--json", "--page", page).stdout)
    assert (result["old"], result["new"], result["samples"]) == ("HEAD", "workspace", 500)
    indices = {key: {r["index"] for r in result[key]}
               for key in ("fixed", "newly_wrong", "still_wrong")}
    assert indices["fixed"] == old.keys() - new.keys()
    assert indices["newly_wrong"] == new.keys() - old.keys()
    assert indices["still_wrong"] == old.keys() & new.keys()
    for key in ("fixed", "newly_wrong", "still_wrong"):
        for r in result[key]:
            i = r["index"]
            assert (str(r["old"]) == old[i]) if i in old else (r["old"] == r["true"])
            assert (str(r["new"]) == new[i]) if i in new else (r["new"] == r["true"])
            # Each side's verdict, from its own misclassified.csv; the row's is the side's
            # that got it wrong (the new one when both did).
            assert r["old_verdict"] == old_verdicts.get(i)
            assert r["new_verdict"] == new_verdicts.get(i)
            assert r["verdict"] == (old_verdicts[i] if key == "fixed" else new_verdicts[i])
    # The table says the same, one row per image, and the counts first.
    table = errors_diff(repo, "--page", page).stdout.splitlines()
    assert table[0] == (f"HEAD: {len(old)} errors, workspace: {len(new)} errors "
                        "(of 500 test images)")
    suspect = sum(old_verdicts[r["index"]] == "label-error" for r in result["fixed"])
    assert table[1].startswith(f"fixed {len(indices['fixed'])} ({suspect} of them only agree "
                               "with a suspected wrong label), newly wrong "
                               f"{len(indices['newly_wrong'])}, still wrong "
                               f"{len(indices['still_wrong'])} (")
    rows = [line.split() for line in table[4:] if line and not line.startswith("page ->")]
    assert sorted(int(row[2] if row[0] != "fixed" else row[1]) for row in rows) == sorted(
        old.keys() | new.keys())
    assert {row[-1] for row in rows} <= {"label-error", "ambiguous", "model-error"}


def test_the_page_is_self_contained_and_renders_in_chromium(changed, tmp_path):
    repo, old, new, _, _ = changed
    errors_diff(repo)  # the default page: reports/errors_diff.html
    page = (repo / "reports" / "errors_diff.html").read_text()
    assert "http://" not in page and "https://" not in page and "<script" not in page
    shown = len(old.keys() | new.keys())
    assert page.count("<img ") == shown
    result = load_in_chromium(page, tmp_path)
    assert result["images"] == shown and result["broken"] == []
    assert result["problems"] == [] and result["console"] == []
    # The page is no output of the pipeline: git ignores it, DVC does not track it.
    assert sh(repo, "git", "status", "--porcelain", "reports/errors_diff.html").stdout == ""


def test_two_commits_compared_from_the_remote_after_the_cache_is_gone(reader_project,
                                                                     changed, tmp_path):
    repo, _ = reseeded_on_a_remote(reader_project, tmp_path / "project", seed=11)
    sh(repo, "rm", "-rf", ".dvc/cache", "data")
    after = json.loads(errors_diff(repo, "HEAD~1", "HEAD", "--json", "--page",
                                   tmp_path / "b.html").stdout)
    before = json.loads(errors_diff(changed[0], "--json", "--page", tmp_path / "a.html").stdout)
    assert (after["old"], after["new"]) == ("HEAD~1", "HEAD")
    assert {k: after[k] for k in ("fixed", "newly_wrong", "still_wrong")} == \
        {k: before[k] for k in ("fixed", "newly_wrong", "still_wrong")}
    assert not (repo / "data").exists()  # read through DVC, nothing checked out


def test_revisions_that_tested_other_data_or_do_not_exist_get_one_line(changed, tmp_path):
    repo = copy_project(changed[0], tmp_path / "project")
    run = errors_diff(repo, "no-such-rev", check=False)
    assert run.returncode == 1 and run.stdout == "" and run.stderr.count("\n") == 1
    assert run.stderr.startswith("error: ")
    # The workspace's evaluate read other test data than HEAD's (as after a change of
    # download params): no comparison.
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    for dep in lock["stages"]["evaluate"]["deps"]:
        if dep["path"] == "data/processed/mnist.npz":
            dep["md5"] = "0" * 32
    (repo / "dvc.lock").write_text(yaml.safe_dump(lock, sort_keys=False))
    run = errors_diff(repo, check=False)
    assert run.returncode == 1 and run.stderr.count("\n") == 1
    assert "evaluated different test data" in run.stderr
