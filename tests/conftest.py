"""pytest fixtures shared by every test file; plain functions live in the other modules of
tests/ (tests/README.md, Layout)."""

from __future__ import annotations

import fcntl
import os
import platform
import re
import shutil
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from testbed.processes import sh
from tests.docs import block, run_sh
from tests.paths import FIXTURE
from tests.projects import copy_project, dvc, make_project, out_hashes


def pytest_configure(config):
    """Ctrl-C reaches the processes the tests start as it does under a terminal, even when
    the suite itself was started with SIGINT ignored (a background job of a script, nohup):
    an ignored signal stays ignored across exec, a handled one starts at its default.

    And OpenMP's idle threads sleep instead of spinning, in this process and every one it
    starts (the C programs, PyTorch): under `make test` each core already runs a worker, so
    a thread that spins while it waits for its team burns the time the other worker needs
    (a 2-thread C run beside a busy core: twice the CPU time). How threads wait changes no
    result; the benchmarks keep OpenMP's default."""
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


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


def built_once(tmp_path_factory, name: str, build) -> Path:
    """The folder `name`, filled by `build(folder)` once for the whole run: under `make test`
    pytest-xdist's workers share it (the first to ask builds it while the others wait on a
    lock, then all read it), so a session's project is built once, not once per worker."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's own folder, above each worker's
    folder, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)  # a build that failed part way
            folder.mkdir()
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def trained_project(tmp_path_factory):
    """The fixture project after one full `dvc repro` (fast training), results committed.

    Trained once per run and shared: READ it, never change it. A test that edits, reruns
    or commits works on its own copy (`trained_copy`, or `copy_project`). That the shared
    one stayed untouched is checked when the session ends.

    Yields .repo (the project dir) and .repro (its first repro's output: .stdout, .stderr).
    """
    def build(folder: Path) -> None:
        repo = make_project(folder / "project")
        first = dvc(repo, "repro")
        (folder / "repro.stdout").write_text(first.stdout)
        (folder / "repro.stderr").write_text(first.stderr)
        sh(repo, "git", "add", "-A")
        sh(repo, "git", "commit", "-qm", "results of the fixture params")

    folder = built_once(tmp_path_factory, "trained", build)
    repo = folder / "project"
    hashes = out_hashes(repo)
    first = SimpleNamespace(stdout=(folder / "repro.stdout").read_text(),
                            stderr=(folder / "repro.stderr").read_text())
    yield SimpleNamespace(repo=repo, repro=first)
    assert out_hashes(repo) == hashes, "a test changed the shared trained_project's outputs"


# The README's block that switches framework and model, one `dvc exp run -S` a line.
SWITCH_BLOCK = ("README.md", "dvc exp show --only-changed")


@pytest.fixture(scope="session")
def switched(trained_project, tmp_path_factory):
    """A copy of the trained project in which the README's one-`-S` block ran: Keras' mlp,
    PyTorch's cnn, C's cnn and C's mlp, each an experiment; the workspace holds the last
    (C's mlp). Built once per run (built_once): READ it; change a copy.

    .repo, .output (the block's), and by (framework, model): .runs, each experiment's part
    of that output, and .exps, its name (`dvc exp apply NAME` brings it back)."""
    def build(folder: Path) -> None:
        repo = copy_project(trained_project.repo, folder / "project")
        (folder / "output").write_text(run_sh(block(*SWITCH_BLOCK), repo))

    folder = built_once(tmp_path_factory, "switched", build)
    repo, output = folder / "project", (folder / "output").read_text()
    runs, exps = {}, {}
    parts = output.split("Ran experiment(s): ")  # each run's output ends with its name
    for run, after in zip(parts, parts[1:]):
        model, framework = re.search(r"^train: (\w+) in (\w+) on ", run, re.M).groups()
        runs[framework, model], exps[framework, model] = run, after.split()[0]
    hashes = out_hashes(repo)
    yield SimpleNamespace(repo=repo, output=output, runs=runs, exps=exps)
    assert out_hashes(repo) == hashes, "a test changed the shared switched project's outputs"


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
    def build(folder: Path) -> None:
        repo = make_project(folder / "project", train=READER_TRAIN)
        dvc(repo, "repro", "evaluate")
        sh(repo, "git", "add", "-A")
        sh(repo, "git", "commit", "-qm", "results of the reader params")

    repo = built_once(tmp_path_factory, "reader", build) / "project"
    hashes = out_hashes(repo)
    yield repo
    assert out_hashes(repo) == hashes, "a test changed the shared reader_project's outputs"
