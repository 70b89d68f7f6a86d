"""tests/conftest.py holds the `slow` mark to the truth: a test not marked slow that starts a
process fails, naming it (what `make test-fast` relies on)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.paths import ROOT

CASES = '''
import subprocess
import pytest

def test_pure():
    assert sum(range(4)) == 6

def test_starts_a_process_unmarked():
    subprocess.run(["true"], check=True)

@pytest.mark.slow
def test_starts_a_process_marked():
    subprocess.run(["true"], check=True)

@pytest.fixture
def server():
    subprocess.run(["true"], check=True)

def test_through_a_fixture(server):
    pass
'''


@pytest.mark.slow
def test_a_test_not_marked_slow_that_starts_a_process_fails_naming_it(tmp_path):
    (tmp_path / "test_cases.py").write_text(CASES)
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.conftest", "-p", "no:cacheprovider",
         "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path), "-o", "addopts=",
         "-rA", str(tmp_path / "test_cases.py")],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = run.stdout
    assert run.returncode == 1, out
    assert "4 passed, 2 errors" in out, out
    for name in ("test_starts_a_process_unmarked", "test_through_a_fixture"):
        assert (f"test_cases.py::{name} is not marked slow but started 1 process(es), first: "
                "subprocess.Popen ('true', ['true'])") in out, out
    errors = {line.split()[1].rsplit("::", 1)[1] for line in out.splitlines()
              if line.startswith("ERROR ")}
    assert errors == {"test_starts_a_process_unmarked", "test_through_a_fixture"}, out
