"""The pages' fenced blocks, and running them as a reader would: tests/integration/test_docs.py
says the rules. Tests elsewhere that run a page's block (on test hosts, say) claim it here
too (`@claims`); CLAIMING_MODULES lists them, so the check that every block is run sees
their claims wherever it runs.
"""

from __future__ import annotations

import functools
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from testbed.processes import run_env
from tests.paths import ROOT

# Test modules, besides test_docs.py, that run blocks of the pages.
CLAIMING_MODULES = ("tests.integration.test_object_store", "tests.integration.test_two_hosts")

PAGES = ("README.md", *(f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md"))))
EXCERPT = "# excerpt"


# --- the pages' blocks ---------------------------------------------------------------------


@dataclass(frozen=True)
class Block:
    page: str
    line: int   # the opening fence's line, 1-based
    lang: str
    text: str

    @property
    def first(self) -> str:
        return next((line.strip() for line in self.text.splitlines() if line.strip()), "")

    @property
    def excerpt(self) -> bool:
        return self.first.startswith(EXCERPT)

    def __str__(self) -> str:
        return f"{self.page}:{self.line} ({self.first!r})"


@functools.cache
def blocks(page: str) -> tuple[Block, ...]:
    """Every fenced block of a page (``` or ~~~ fences, indented or not)."""
    lines = (ROOT / page).read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        opening = re.match(r"^(\s*)(`{3,}|~{3,})(.*)$", lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, lang = opening.group(1), opening.group(2), opening.group(3).strip()
        body, j = [], i + 1
        while j < len(lines) and not re.match(rf"^\s*{re.escape(fence)}\s*$", lines[j]):
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j])
            j += 1
        assert j < len(lines), f"{page}:{i + 1}: a fence that never closes"
        found.append(Block(page, i + 1, lang, "\n".join(body) + "\n"))
        i = j + 1
    return tuple(found)


CLAIMS: dict[tuple[str, str], str] = {}


def prose(page: str) -> str:
    """A page without its fenced blocks."""
    return re.sub(r"^\s*```.*?^\s*```", "", (ROOT / page).read_text(), flags=re.S | re.M)


def claims(*pairs: tuple[str, str]):
    """Mark a test as the one that runs the blocks (page, a piece of the block's text)."""
    def mark(test):
        for pair in pairs:
            assert pair not in CLAIMS, f"{pair} claimed twice"
            CLAIMS[pair] = test.__name__
        return test
    return mark


def block(page: str, piece: str) -> Block:
    found = [b for b in blocks(page) if piece in b.text]
    assert len(found) == 1, f"{page}: {len(found)} blocks hold {piece!r}: {found}"
    assert not found[0].excerpt, f"{found[0]} is an excerpt: it cannot be run"
    return found[0]


# --- running them --------------------------------------------------------------------------


def env(**extra) -> dict:
    """The stages' environment (the venv's bin first), unbuffered so that stdout and
    stderr interleave as on a terminal, and no bytecode written into the projects; without
    what `make test` leaves for its sub-makes (a user's `make` prints no "Entering
    directory" lines)."""
    user = {k: v for k, v in run_env().items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    return user | {"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"} | extra


def bash(script: str, cwd: Path, timeout: float = 600, host=None,
         extra: dict | None = None) -> SimpleNamespace:
    """Run a script in bash, stdout and stderr into one file (not a pipe: `dvc exp run
    --run-all` leaves workers behind that would hold a pipe open); on a test host
    (testbed/hosts.py) when one is given, with `extra` in the environment."""
    command = ["bash", "-c", script]
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.run(host.command(command) if host else command, cwd=cwd,
                              env=env(**(extra or {})), stdout=out,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                              timeout=timeout)
        out.seek(0)
        return SimpleNamespace(returncode=proc.returncode, output=out.read())


def run_sh(b: Block, cwd: Path, replace: dict | None = None, host=None,
           extra: dict | None = None) -> str:
    """A shell block run as one script that stops at the first failing command."""
    text = b.text
    for old, new in (replace or {}).items():
        text = text.replace(old, new)
    run = bash("set -eo pipefail\n" + text, cwd, host=host, extra=extra)
    assert run.returncode == 0, f"{b} exited {run.returncode} in {cwd}:\n{run.output[-6000:]}"
    return run.output


def run_python(b: Block, cwd: Path, check: str = "") -> str:
    """A Python block run with `python -c` in cwd, followed by the test's own asserts."""
    proc = subprocess.run([sys.executable, "-c", b.text + "\n" + check], cwd=cwd, env=env(),
                          capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"{b} failed in {cwd}:\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-6000:]}"
    return proc.stdout


NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
STEP = "@@test_docs step@@"


def shape(line: str) -> str:
    """A line with every number a wildcard and every run of whitespace one space."""
    return " ".join(NUMBER.sub("#", line).split())


def matches(shown: list[str], real: list[str]) -> bool:
    """Do the real lines have the shown ones' shape, a `...` line standing for any lines?"""
    shown = [shape(line) for line in shown if line.strip()]
    real = [shape(line) for line in real if line.strip()]
    reach = [True] + [False] * len(real)  # reach[j]: the shown lines so far match real[:j]
    for line in shown:
        if line == "...":
            reach = [any(reach[:j + 1]) for j in range(len(real) + 1)]
        else:
            reach = [False] + [reach[j] and real[j] == line for j in range(len(real))]
    return reach[-1]


def steps(b: Block) -> list[tuple[str, list[str]]]:
    """A session block's commands (`$ ` lines, `\\` continuations joined) and the output
    shown after each."""
    out, lines, i = [], b.text.splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("$ "):
            command = line[2:]
            while command.endswith("\\") and i + 1 < len(lines):
                i += 1
                command += "\n" + lines[i]
            out.append((command, []))
        else:
            assert out, f"{b}: output before the first `$ ` line"
            out[-1][1].append(line)
        i += 1
    assert out, f"{b}: no `$ ` line"
    return out


def run_session(b: Block, cwd: Path, replace: dict | None = None, host=None,
                extra: dict | None = None) -> list[SimpleNamespace]:
    """Run a session block's commands in one bash, in order (so `echo $?` sees the command
    before it), and check each one's output against the page's. Each step's command, real
    output and exit status, for the test's own asserts."""
    commands = steps(b)
    script = []
    for command, _ in commands:
        for old, new in (replace or {}).items():
            command = command.replace(old, new)
        script.append(f"{command}\n__rc=$?; echo; echo '{STEP}' $__rc; (exit $__rc)\n")
    run = bash("".join(script), cwd, host=host, extra=extra)
    parts, current = [], []
    for line in run.output.splitlines():
        if line.startswith(STEP):
            parts.append((current, int(line.split()[-1])))
            current = []
        else:
            current.append(line)
    assert len(parts) == len(commands), f"{b}: the session stopped early:\n{run.output}"
    results = []
    for (command, shown), (real, code) in zip(commands, parts):
        assert matches(shown, real), (
            f"{b}: `{command}` printed lines of another shape than the page shows.\n"
            "shown:\n  " + "\n  ".join(shape(s) for s in shown if s.strip())
            + "\nreal:\n  " + "\n  ".join(shape(s) for s in real if s.strip()))
        results.append(SimpleNamespace(command=command, output="\n".join(real), rc=code))
    return results
