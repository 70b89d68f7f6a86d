"""A page in a real headless Chromium (the error page, mnist-errors-diff's page).

A test copy of the page gets a small harness script (tests/data/harness.js) at the top of
<head> (the page itself has no script). It records JavaScript errors, failed resource loads,
Content-Security-Policy violations and console errors, and on the load event writes a JSON
verdict (images found, images not rendered: naturalWidth 0) into the DOM, which
`chromium --dump-dom` prints. Chromium's own log (--enable-logging=stderr) is read too: any
CONSOLE line from the page fails the test. Chromium is Debian's `chromium` package
(`make system-deps`); without it these tests fail, never skip.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

HARNESS = ("<script>\n"
           + (Path(__file__).resolve().parent / "data" / "harness.js").read_text(encoding="utf-8")
           + "</script>\n")


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
    from stages.analysis.page import CSP

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
