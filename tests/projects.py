"""Projects under test and their runners: a fresh git + DVC project holding this repo's
pipeline fed by the fixture, copies of one, params.yaml read and changed (train's settings as
the stage gets them included), `dvc` and its queue run as a user runs them, what a run's
output says (the stages it ran, its outputs' hashes), a fresh clone's files for `make`, and
one of the README's experiments applied to a copy of the project that ran them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

from testbed.pipeline import copy_pipeline
from testbed.processes import run_env, sh
from tests.paths import FIXTURE, FIXTURE_SHA256, ROOT

# What `make` reads in a fresh clone: its recipes, the project, the locks.
MAKE_FILES = ("Makefile", "pyproject.toml", "requirements.lock", "requirements-torch.lock",
              "requirements-gpu.lock")

# Small enough to train in seconds on the fixture, yet every code path of the default runs.
FAST_TRAIN = {"cnn": {"epochs": 2, "batch_size": 64}}
# One thread per pool (Keras, PyTorch, the C programs): `make test` keeps every core busy
# with workers, and a process whose threads wait on each other at every op, while other
# workers hold the other cores, crawls.
ONE_THREAD = {"intra_op_threads": 1, "inter_op_threads": 1}
SINGLE_THREADED = {"train": {"keras": ONE_THREAD, "torch": ONE_THREAD},
                   "speed": {"c_threads": 1}}
# The cheapest training that still runs every stage: the original network, one epoch.
TINY_TRAIN = {"model": "mlp", "mlp": {"epochs": 1, "batch_size": 64}}


def make_files(dest: Path) -> Path:
    """A fresh clone's files for `make` (no .venv yet), copied into dest."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in MAKE_FILES:
        shutil.copy2(ROOT / name, dest / name)
    return dest


def dvc(repo: Path, *args, check: bool = True, timeout: float = 900, env: dict | None = None):
    return sh(repo, sys.executable, "-m", "dvc", *args, check=check, timeout=timeout, env=env)


def run_queue(repo: Path, log: Path, jobs: int = 2, timeout: float = 300) -> str:
    """`dvc queue start -j jobs`, then poll `dvc queue status` until nothing is queued or
    running, then stop the workers; the last status table.

    `dvc queue start` returns at once, but leaves a detached process behind that keeps the
    stdout and stderr it inherited while its workers live (one may idle on after "shutting
    down due to empty queue"): into the file `log`, not a pipe a test would wait on until
    its timeout."""
    with open(log, "w") as out:
        subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", str(jobs)],
                       cwd=repo, env=run_env(), stdout=out, stderr=subprocess.STDOUT,
                       check=True, timeout=120)
    deadline = time.monotonic() + timeout
    try:
        while True:
            status = dvc(repo, "queue", "status").stdout
            rows = [line.split() for line in status.splitlines()[1:] if line.strip()]
            if not any(len(r) > 1 and r[-1] in ("Queued", "Running") for r in rows):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"queue still busy after {timeout}s:\n{status}")
            time.sleep(2)
    finally:
        stop_queue(repo)


def stop_queue(repo: Path, timeout: float = 60) -> None:
    """`dvc queue stop`, then wait until the queue's processes have exited: a worker idles on
    after the queue empties, writing and deleting its mailbox's messages under .dvc/tmp, and a
    test that copies the project (copy_project) or ends meanwhile would race it. Those still
    running after `timeout` seconds are killed."""
    dvc(repo, "queue", "stop", check=False, timeout=60)
    _, alive = psutil.wait_procs(queue_processes(repo), timeout=timeout)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:  # it ended in between
            pass
    psutil.wait_procs(alive, timeout=10)


def queue_processes(repo: Path) -> list[psutil.Process]:
    """The DVC processes working in `repo` besides this one: a queue's workers and the
    process that spawned them."""
    folder, found = os.path.realpath(repo), []
    for process in psutil.process_iter(["pid", "cwd", "cmdline"]):
        info = process.info
        if (info["pid"] != os.getpid() and info["cwd"] and os.path.realpath(info["cwd"]) == folder
                and any("dvc" in part for part in info["cmdline"] or ())):
            found.append(process)
    return found


def merge(base: dict, changes: dict) -> dict:
    """base updated by changes, nested mappings merged key by key (a copy)."""
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def shipped_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def train_cfg(framework: str = "keras", **recipe) -> dict:
    """train's checked settings as the stage gets them: the shipped shared keys on one
    thread per pool, the mlp with `recipe` changed."""
    from stages.runtime import params

    shipped = merge(shipped_params(), SINGLE_THREADED)
    section = merge(shipped["train"], {"framework": framework, "model": "mlp", "mlp": recipe})
    return params.train(section, params.speed(shipped["speed"]))


def set_params(repo: Path, **sections) -> None:
    """Change params.yaml in repo: set_params(repo, train={"cnn": {"epochs": 1}})."""
    path = repo / "params.yaml"
    path.write_text(yaml.safe_dump(merge(yaml.safe_load(path.read_text()), sections),
                                   sort_keys=False))


def fixture_params(**sections) -> dict:
    """The sections make_project changes: the fixture as the only source, fast training."""
    defaults = {
        "download": {"url": FIXTURE.as_uri(), "sha256": FIXTURE_SHA256, "format": "npz",
                     "mirrors": [], "retries": 0},
        "train": FAST_TRAIN,
    }
    return merge(merge(defaults, SINGLE_THREADED), sections)


def make_project(dest: Path, **sections) -> Path:
    """A fresh git + DVC project holding this repo's pipeline, fed by the fixture."""
    copy_pipeline(dest)
    sh(dest, "git", "init", "-q", "-b", "main")
    dvc(dest, "init", "-q")
    dvc(dest, "config", "core.analytics", "false")
    set_params(dest, **fixture_params(**sections))
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-qm", "project under test")
    return dest


def copy_project(src: Path, dest: Path) -> Path:
    """A copy of a whole project (work tree, .git, .dvc and its cache) at dest.

    DVC's cache keeps copies, not links, so the copy shares nothing with src: a test can
    change a trained project for the price of a file copy instead of a training.
    """
    shutil.copytree(src, dest, symlinks=True)
    return dest


def status(repo: Path) -> dict:
    """`dvc status --json`: the stages whose deps or params changed, by name."""
    import json

    return json.loads(dvc(repo, "status", "--json").stdout)


def edit_module(repo: Path, name: str) -> None:
    """Append a comment to stages/<name>.py (name: "train", "frameworks/keras/fit"...): its
    hash changes, its behaviour does not."""
    with open(repo / "stages" / f"{name}.py", "a") as f:
        f.write("# edited by a test: a comment changes no result\n")


def stages_run(output: str) -> list[str]:
    """Names of the stages `dvc repro` actually ran, in order."""
    return [line.split("'")[1] for line in output.splitlines()
            if line.startswith("Running stage '")]


def ran_training(output: str) -> bool:
    """Did the train stage run (its per-epoch lines) in this dvc output?"""
    return "Running stage 'train'" in output or any(
        line.lower().startswith("epoch ") for line in output.splitlines())


def out_hashes(repo: Path) -> dict[str, str]:
    """sha256 of every file of every stage output in dvc.lock, by path under repo."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    paths = sorted({out["path"] for stage in lock["stages"].values()
                    for out in stage.get("outs", [])})
    files = []
    for rel in paths:
        path = repo / rel
        assert path.exists(), f"output {rel} is missing in {repo}"
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {p.relative_to(repo).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def reseeded_on_a_remote(src: Path, dest: Path, seed: int) -> tuple[Path, Path]:
    """A copy of the trained project src at dest with a local default remote (dest's
    sibling "remote"): HEAD~1 holds src's results, HEAD the results of `seed` (retrained
    through evaluate), each commit's pushed when it was made: `dvc push --all-commits`
    pushes only HEAD's outputs in DVC 3 (treeverse/dvc#10617). The repo and the remote."""
    repo = copy_project(src, dest)
    remote = dest.parent / "remote"
    dvc(repo, "remote", "add", "-d", "store", str(remote))
    sh(repo, "git", "commit", "-qam", "a remote")
    dvc(repo, "push")
    set_params(repo, train={"seed": seed})
    dvc(repo, "repro", "evaluate")
    sh(repo, "git", "commit", "-qam", f"seed {seed}")
    dvc(repo, "push")
    return repo, remote


def applied(switched, run: tuple[str, str], dest: Path) -> tuple[Path, str]:
    """A copy of the switched project (tests/conftest.py) with the README's `dvc exp run` of
    `run` (framework, model) applied: its params, dvc.lock and outputs in the workspace, as
    right after that run on the trained project; and what the run printed."""
    repo = copy_project(switched.repo, dest / "project")
    dvc(repo, "exp", "apply", switched.exps[run])
    return repo, switched.runs[run]
