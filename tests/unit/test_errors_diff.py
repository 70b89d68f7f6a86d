"""mnist_cli/errors_diff.py's pure parts: the three groups, their order, the table and the page.

The command itself, between real revisions, is tests/integration/test_errors_diff.py.
"""

from __future__ import annotations

import numpy as np

from mnist_cli.errors_diff import attach_verdicts, compare, page, summary, text_table
from tests.digits import NAMED_CLASSES, probabilities_for

DIGITS = [str(d) for d in range(10)]


def sides():
    """Six test images: (true, old prediction, old confidence) and the new side's."""
    old = [(1, 7, 0.9), (2, 2, 0.8), (3, 5, 0.6), (4, 4, 0.99), (5, 3, 0.7), (6, 8, 0.95)]
    new = [(1, 1, 0.7), (2, 8, 0.6), (3, 5, 0.9), (4, 4, 0.98), (5, 5, 0.8), (6, 0, 0.55)]
    y, p_old = probabilities_for(old)
    _, p_new = probabilities_for(new)
    return y.astype(np.int64), p_old, p_new


def test_each_image_wrong_on_either_side_is_in_exactly_one_group():
    groups = compare(*sides())
    assert [r["index"] for r in groups["fixed"]] == [0, 4]  # most confidently wrong first
    assert [r["index"] for r in groups["newly_wrong"]] == [1]
    assert [r["index"] for r in groups["still_wrong"]] == [2, 5]
    fixed = groups["fixed"][0]
    assert (fixed["true"], fixed["old"], fixed["new"]) == (1, 7, 1)
    assert np.isclose(fixed["old_confidence"], 0.9) and np.isclose(fixed["new_p_true"], 0.7)
    assert np.isclose(fixed["old_p_true"], 0.1 / 9)
    moved = groups["still_wrong"][1]  # wrong both times, as another class the second
    assert (moved["old"], moved["new"]) == (8, 0)


def test_no_errors_on_either_side_is_three_empty_groups():
    y = np.arange(10)
    p = np.eye(10, dtype=np.float32)
    assert compare(y, p, p) == {"fixed": [], "newly_wrong": [], "still_wrong": []}
    assert text_table(compare(y, p, p), DIGITS, "a", "b") == (
        "no test image is misclassified on either side")


def test_summary_and_table_count_what_the_groups_hold():
    groups = compare(*sides())
    assert summary(groups, "HEAD", "workspace", 6).splitlines() == [
        "HEAD: 4 errors, workspace: 3 errors (of 6 test images)",
        ("fixed 2 (0 of them only agree with a suspected wrong label), newly wrong 1, "
         "still wrong 2 (1 of them now predicted as another wrong class)")]
    lines = text_table(groups, DIGITS, "HEAD", "workspace").splitlines()
    assert lines[0].split() == ["index", "true", "HEAD", "workspace", "verdict"]
    assert [line.split()[0] for line in lines[1:]] == ["fixed", "fixed", "newly", "still",
                                                       "still"]
    assert lines[1].split() == ["fixed", "0", "1", "7", "(0.900)", "1", "(0.700)", "-"]


def test_each_image_gets_the_verdict_of_the_side_that_got_it_wrong():
    groups = compare(*sides())
    # Each side's misclassified.csv judges only its own errors.
    old = {0: "label-error", 2: "ambiguous", 4: "model-error", 5: "ambiguous"}
    new = {1: "model-error", 2: "label-error", 5: "model-error"}
    attach_verdicts(groups, old, new)
    got = {r["index"]: (r["old_verdict"], r["new_verdict"], r["verdict"])
           for records in groups.values() for r in records}
    assert got == {0: ("label-error", None, "label-error"),  # fixed: the old side's
                   4: ("model-error", None, "model-error"),
                   1: (None, "model-error", "model-error"),  # newly wrong: the new side's
                   2: ("ambiguous", "label-error", "label-error"),  # still wrong: the new's
                   5: ("ambiguous", "model-error", "model-error")}
    assert "fixed 2 (1 of them only agree with a suspected wrong label)" in summary(
        groups, "a", "b", 6)
    lines = text_table(groups, DIGITS, "a", "b").splitlines()
    assert lines[1].split()[-1] == "label-error" and lines[2].split()[-1] == "model-error"
    text = page(groups, np.zeros((6, 28, 28), np.uint8), DIGITS, "a", "b")
    assert "1 of these a called" in text and "b now agrees with a label" in text
    assert text.count('<span class="verdict label-error">') == 3  # two rows and the note
    # A side from before the verdicts has none: nothing is claimed.
    attach_verdicts(groups, {}, {})
    assert {r["verdict"] for records in groups.values() for r in records} == {None}


def test_the_page_shows_every_image_and_escapes_names_and_revisions():
    y, p_old, p_new = sides()
    groups = compare(y, p_old, p_new)
    x = np.zeros((6, 28, 28), np.uint8)
    text = page(groups, x, NAMED_CLASSES, "<main>", "exp & co")
    assert text.count("<img ") == 5
    assert "&lt;main&gt; &rarr; exp &amp; co" in text and "<main>" not in text
    assert "&lt;Shirt&gt; &amp; co" in text and "<Shirt>" not in text
    assert 'http-equiv="Content-Security-Policy"' in text and "<script" not in text
    assert text == page(groups, x, NAMED_CLASSES, "<main>", "exp & co")  # byte-stable
