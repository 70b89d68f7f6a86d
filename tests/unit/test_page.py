"""stages/analysis/page.py: reports/errors.html is self-contained, shows class names escaped,
and renders in a real headless Chromium.

The browser checks (they need Debian's chromium) load a test copy of the page with
the harness of tests/browser.py's load_in_chromium(); without Chromium they fail, never
skip.
"""

from __future__ import annotations

import html
import re

import numpy as np
import pytest

from stages.analysis import scoring
from stages.analysis.page import CSP, render
from stages.render_errors import analyse
from tests.browser import load_in_chromium
from tests.digits import NAMED_CLASSES, centroid_probabilities, fixture_data

DIGITS = [str(c) for c in range(10)]

def page_for(data, probabilities, names, k=3, top_confident=20, top_pairs=10):
    """The page as render-errors builds it: records, then evaluate's tables."""
    records = analyse(data, probabilities, k)
    y, y_pred = data["y_test"], probabilities.argmax(1)
    page = render(records, scoring.class_table(y, y_pred, names),
                  scoring.confusion_pairs(y, y_pred, names), scoring.confusion(y, y_pred),
                  data["x_test"], data["x_train"], names, k, top_confident, top_pairs)
    return page, records


@pytest.fixture(scope="module")
def fixture_page():
    data = fixture_data()
    page, records = page_for(data, centroid_probabilities(data), DIGITS)
    return page, records, data


@pytest.fixture(scope="module")
def named_page():
    data = fixture_data()
    page, records = page_for(data, centroid_probabilities(data), NAMED_CLASSES)
    return page, records, data


# --- static checks --------------------------------------------------------------------


def test_page_is_self_contained(fixture_page):
    page, _, _ = fixture_page
    assert not re.search(r"https?:", page, re.I)
    assert "//" not in re.sub(r"data:[^\"]*", "", page).replace("<!DOCTYPE", "")
    srcs = re.findall(r'\bsrc="([^"]*)"', page)
    assert srcs and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"<(script|link|iframe|object|embed|base)\b", page, re.I)
    assert "url(" not in page and "@import" not in page
    hrefs = re.findall(r'\bhref="([^"]*)"', page)
    assert hrefs and all(h.startswith("#") for h in hrefs)  # in-page links only
    ids = set(re.findall(r'\bid="([^"]*)"', page))
    assert {h[1:] for h in hrefs} <= ids
    assert f'<meta http-equiv="Content-Security-Policy" content="{CSP}">' in page


def test_page_shows_summary_matrix_and_every_error(fixture_page):
    page, records, data = fixture_page
    for anchor in ("rates", "confusion", "pairs", "confident", "reading"):
        assert f'id="{anchor}"' in page
    for d in range(10):
        assert f'<section id="class-{d}">' in page
    assert f"<b>{len(records)}</b> of 500 test images are misclassified" in page
    # Every error has its row, in sheet order (grouped by class, most confident first).
    rows = [int(i) for i in re.findall(r'<td id="e(\d+)">', page)]
    assert rows == [r["index"] for r in records]
    for r in records[:10]:
        assert f"#{r['index']}<br>{r['true']} &rarr; {r['predicted']}<br>" \
               f"conf {r['confidence']:.3f}" in page
        assert f"#{r['true_neighbours'][0]}&nbsp;({r['true_l2'][0]:.2f})" in page
    # The confusion matrix: 10 rows of 10 cells after the header, counts as scoring's.
    matrix = page[page.index('<table class="cm">'):]
    matrix = matrix[: matrix.index("</table>")]
    assert matrix.count("<tr>") == 11
    assert matrix.count('<td class="diag">') == 10
    expected = scoring.confusion(data["y_test"], centroid_probabilities(data).argmax(1))
    diagonal = [int(v) for v in re.findall(r'<td class="diag">(\d+)</td>', matrix)]
    assert diagonal == np.diag(expected).tolist()
    mistakes = [int(v) for v in re.findall(r'">(\d+)</a></td>', matrix)]
    assert sum(mistakes) == len(records) == expected.sum() - np.trace(expected)
    assert "Euclidean (L2)" in page


def test_page_shows_class_names_escaped_everywhere(named_page):
    page, records, _ = named_page
    for name in NAMED_CLASSES:
        escaped = html.escape(name)
        assert f'<a href="#class-{NAMED_CLASSES.index(name)}">{escaped}</a>' in page  # nav
        assert f"<th>{escaped}</th>" in page  # confusion matrix
        assert f"<h2>True class {escaped}: " in page
    # Markup in a name is text, never a tag; the raw name appears nowhere.
    assert "<Shirt>" not in page and "&lt;Shirt&gt; &amp; co" in page
    shirt = NAMED_CLASSES.index("<Shirt> & co")
    rec = next(r for r in records if r["true"] == shirt)
    assert (f"#{rec['index']}<br>&lt;Shirt&gt; &amp; co &rarr; "
            f"{html.escape(NAMED_CLASSES[rec['predicted']])}<br>") in page
    assert "Coat, long" in page
    # Tag names in the page: only the page's own, whatever the class names hold.
    tags = set(re.findall(r"<([a-zA-Z][a-zA-Z0-9]*)", page))
    assert tags <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "b",
                    "h3", "nav", "a", "table", "tr", "th", "td", "span", "img", "br", "ul", "li",
                    "section"}


def test_page_is_deterministic(fixture_page):
    page, _, data = fixture_page
    again, _ = page_for(data, centroid_probabilities(data), DIGITS)
    assert again == page


def test_top_pairs_and_top_confident_limit_their_tables(fixture_page):
    _, _, data = fixture_page
    page, records = page_for(data, centroid_probabilities(data), DIGITS, top_confident=2,
                             top_pairs=3)
    pairs = page[page.index('id="pairs"'):page.index('id="confident"')]
    confident = page[page.index('id="confident"'):page.index('id="reading"')]
    assert pairs.count("<tr>") == 1 + 3 and "(top 3)" in pairs
    assert confident.count("<tr>") == 1 + 2 and "(top 2)" in confident
    assert len(records) > 3


# --- in a real browser ----------------------------------------------------------------


@pytest.mark.slow
def test_page_renders_in_chromium_without_errors(named_page, tmp_path):
    page, records, _ = named_page
    result = load_in_chromium(page, tmp_path)
    expected = page.count("<img ")
    assert result["images"] == expected > 3 * len(records)
    assert result["broken"] == []
    assert result["problems"] == []
    assert result["console"] == []


@pytest.mark.slow
def test_page_without_any_error_renders_too(tmp_path):
    data = fixture_data()
    y = data["y_test"]
    page = render([], scoring.class_table(y, y, DIGITS), [], scoring.confusion(y, y),
                  data["x_test"], data["x_train"], DIGITS, 3, 20, 10)
    assert "<b>0</b> of 500" in page and page.count("<p>No errors.</p>") == 12
    result = load_in_chromium(page, tmp_path)
    assert result["images"] == 0 and result["problems"] == [] and result["console"] == []


@pytest.mark.slow
def test_harness_catches_broken_images_script_errors_and_network(tmp_path):
    """The browser check itself: a page with each kind of fault must fail it."""
    bad = ("<!DOCTYPE html>\n<html><head>\n"
           f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n</head><body>\n'
           '<img src="data:image/png;base64,AAAA" alt="corrupt">\n'
           '<img src="missing.png" alt="relative">\n'
           '<img src="http://127.0.0.1:9/x.png" alt="network">\n'
           "<script>console.error('boom')</script>\n"
           "</body></html>\n")
    result = load_in_chromium(bad, tmp_path)
    assert sorted(result["broken"]) == ["corrupt", "network", "relative"]
    assert any("CSP violation" in p for p in result["problems"])
    assert any("failed to load <img>" in p for p in result["problems"])
    assert result["console"]  # Chromium logged the violations
