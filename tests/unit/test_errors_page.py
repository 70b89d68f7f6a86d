"""stages/errors_page.py: reports/errors.html is self-contained, shows class names escaped,
and renders in a real headless Chromium.

The browser checks load a test copy of the page with a small harness script injected at
the top of <head> (the page itself has no script). The harness records JavaScript errors,
failed resource loads, Content-Security-Policy violations and console errors, and on the
load event writes a JSON verdict (images found, images not rendered: naturalWidth 0) into
the DOM, which `chromium --dump-dom` prints. Chromium's own log (--enable-logging=stderr)
is read too: any CONSOLE line from the page fails the test.

Chromium is Debian's `chromium` package; `make test` installs it when it is missing (as
root) or says how to. Without it these tests fail: they are never skipped.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from stages import scoring
from stages.errors_page import CSP, render
from stages.render_errors import analyse
from tests.helpers import NAMED_CLASSES, centroid_probabilities, fixture_data

DIGITS = [str(c) for c in range(10)]

HARNESS = """<script>
(function () {
  var problems = [];
  window.addEventListener('error', function (e) {
    var t = e.target;
    if (t && t !== window && t.tagName) {
      problems.push('failed to load <' + t.tagName.toLowerCase() + '> ' +
                    String(t.src || t.href || '').slice(0, 80));
    } else {
      problems.push('error: ' + e.message);
    }
  }, true);
  window.addEventListener('unhandledrejection', function (e) {
    problems.push('unhandled rejection: ' + e.reason);
  });
  document.addEventListener('securitypolicyviolation', function (e) {
    problems.push('CSP violation: ' + e.violatedDirective + ' ' + e.blockedURI);
  });
  ['error', 'warn'].forEach(function (level) {
    var original = console[level];
    console[level] = function () {
      problems.push('console.' + level + ': ' + Array.prototype.join.call(arguments, ' '));
      return original.apply(console, arguments);
    };
  });
  window.addEventListener('load', function () {
    var images = Array.prototype.slice.call(document.images);
    var broken = images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
    var out = document.createElement('pre');
    out.id = 'harness-result';
    out.textContent = JSON.stringify({
      images: images.length,
      broken: broken.map(function (i) { return i.alt || String(i.src).slice(0, 60); }),
      problems: problems
    });
    document.body.appendChild(out);
  });
})();
</script>
"""


def find_chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def need_chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.fail("chromium not found: `make test` installs Debian's chromium package")
    return path


def harnessed(page: str) -> str:
    """The test copy: the harness first in <head>, and the CSP allowing inline script."""
    csp = f'content="{CSP}"'
    assert page.count(csp) == 1 and page.count("<head>") == 1
    page = page.replace(csp, f'content="{CSP}; script-src \'unsafe-inline\'"')
    return page.replace("<head>", "<head>\n" + HARNESS, 1)


def load_in_chromium(page: str, tmp_path: Path) -> dict:
    """Open a harnessed copy of `page` from a file: URL; the harness verdict plus the
    CONSOLE lines of Chromium's log."""
    chromium = need_chromium()
    copy = tmp_path / "page-under-test.html"
    copy.write_text(harnessed(page), encoding="utf-8")
    env = dict(os.environ, HOME=str(tmp_path))
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--no-first-run", "--no-default-browser-check",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--dump-dom", copy.as_uri()],
        capture_output=True, text=True, timeout=180, env=env)
    found = re.search(r'<pre id="harness-result">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"no harness result (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    result = json.loads(html.unescape(found.group(1)))
    result["console"] = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return result


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
                    "nav", "a", "table", "tr", "th", "td", "span", "img", "br", "ul", "li",
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
