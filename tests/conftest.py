"""pytest fixtures shared by every test file; plain functions live in the other modules of
tests/ (tests/README.md, Layout)."""

from __future__ import annotations

import platform
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from testbed.processes import sh
from tests.paths import FIXTURE
from tests.projects import copy_project, dvc, make_project, out_hashes


def pytest_configure(config):
    """Ctrl-C reaches the processes the tests start as it does under a terminal, even when
    the suite itself was started with SIGINT ignored (a background job of a script, nohup):
    an ignored signal stays ignored across exec, a handled one starts at its default."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


# --- the `slow` mark tells the truth -----------------------------------------------------
# A test not marked slow starts no process: `make test-fast` runs those only. Python's audit
# events name every way a process starts (subprocess, os.fork/exec/spawn/system/posix_spawn);
# a hook notes each one started while a test not marked slow is set up, runs or is torn
# down, and such a test then fails at teardown, naming what it started.
PROCESS_EVENTS = frozenset({"subprocess.Popen", "os.fork", "os.forkpty", "os.exec", "os.spawn",
                            "os.system", "os.posix_spawn"})
STARTED = pytest.StashKey[list]()
_watched: list | None = None  # the list of the test being watched, if any


def _note_processes(event: str, args: tuple) -> None:
    if _watched is not None and event in PROCESS_EVENTS:
        _watched.append(f"{event} {str(args[:2])[:120]}")


sys.addaudithook(_note_processes)
# platform.processor() runs `uname -p` once per process and keeps the answer; TensorFlow's
# import asks for it. Asked here, before any test, so that no test is charged for it.
platform.processor()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    global _watched
    if item.get_closest_marker("slow"):
        return (yield)
    _watched = item.stash.setdefault(STARTED, [])
    try:
        return (yield)
    finally:
        _watched = None


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    started = item.stash.get(STARTED, [])
    if report.when == "teardown" and started and report.passed:
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} is not marked slow but started {len(started)} "
                           f"process(es), first: {started[0]} (mark it @pytest.mark.slow)")
    return report


@pytest.fixture(scope="session")
def fixture_path() -> Path:
    return FIXTURE


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory):
    """The fixture project after one full `dvc repro` (fast training), results committed.

    Trained once per session and shared: READ it, never change it. A test that edits,
    reruns or commits works on its own copy (`trained_copy`, or `copy_project`). That the
    shared one stayed untouched is checked when the session ends.

    Yields .repo (the project dir) and .repro (the CompletedProcess of its first repro).
    """
    repo = make_project(tmp_path_factory.mktemp("trained") / "project")
    first = dvc(repo, "repro")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "results of the fixture params")
    hashes = out_hashes(repo)
    yield SimpleNamespace(repo=repo, repro=first)
    assert out_hashes(repo) == hashes, "a test changed the shared trained_project's outputs"


@pytest.fixture
def trained_copy(trained_project, tmp_path) -> Path:
    """A private copy of trained_project (git history and DVC cache included) to change."""
    return copy_project(trained_project.repo, tmp_path / "project")


# The original network trained long enough on the fixture (30 epochs: ~92% test accuracy)
# to read digits drawn in a test, in plain C (seconds). Its recipe is the shipped mlp's.
READER_TRAIN = {"framework": "c", "model": "mlp", "mlp": {"epochs": 30}}


@pytest.fixture(scope="session")
def reader_project(tmp_path_factory):
    """A fixture project trained by READER_TRAIN through evaluate, results committed: the
    model the commands that use a model (mnist-predict, mnist-errors-diff) are tested with.
    READ it; change a copy (copy_project)."""
    repo = make_project(tmp_path_factory.mktemp("reader") / "project", train=READER_TRAIN)
    dvc(repo, "repro", "evaluate")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "results of the reader params")
    hashes = out_hashes(repo)
    yield repo
    assert out_hashes(repo) == hashes, "a test changed the shared reader_project's outputs"
