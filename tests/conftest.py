"""Shared test fixtures: a small real-MNIST file and throwaway git+DVC project copies."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "data" / "mnist_small.npz"
# sha256 of tests/data/mnist_small.npz: the first 1500 training and 500 test images of
# MNIST, derived from the shared full dataset.
FIXTURE_SHA256 = "910df9240d706b7262f7813a543ad99e800ac000fff7f4c69b7f59534782e2f9"
PROJECT_FILES = ("stages", "dvc.yaml", "params.yaml", ".dvcignore", ".gitignore")

# Small enough to train in seconds on the fixture, yet every code path of the default runs.
FAST_TRAIN = {"epochs": 2, "batch_size": 64}


def run_env() -> dict:
    """The environment stages run in: this interpreter's bin dir first, quiet telemetry."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["DVC_NO_ANALYTICS"] = "1"
    env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = "test"
    env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = "test@example.invalid"
    return env


def sh(cwd, *args, check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=run_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


def set_params(repo: Path, **sections) -> None:
    path = repo / "params.yaml"
    params = yaml.safe_load(path.read_text())
    for section, values in sections.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def make_project(dest: Path, **sections) -> Path:
    """A fresh git + DVC project holding this repo's pipeline, fed by the fixture."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    sh(dest, "git", "init", "-q", "-b", "main")
    sh(dest, sys.executable, "-m", "dvc", "init", "-q")
    sh(dest, sys.executable, "-m", "dvc", "config", "core.analytics", "false")
    defaults = {
        "download": {"url": FIXTURE.as_uri(), "sha256": FIXTURE_SHA256,
                     "mirrors": [], "retries": 0},
        "train": dict(FAST_TRAIN),
    }
    for section, values in sections.items():
        defaults.setdefault(section, {}).update(values)
    set_params(dest, **defaults)
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-qm", "project under test")
    return dest


def dvc(repo: Path, *args, check: bool = True, timeout: float = 900):
    return sh(repo, sys.executable, "-m", "dvc", *args, check=check, timeout=timeout)


def stages_run(output: str) -> list[str]:
    """Names of the stages `dvc repro` actually ran, in order."""
    return [line.split("'")[1] for line in output.splitlines()
            if line.startswith("Running stage '")]


@pytest.fixture(scope="session")
def fixture_path() -> Path:
    return FIXTURE


# --- team workflows (tests/test_compare.py, test_experiments.py, test_remotes.py) ----

# The cheapest training that still runs every stage: the original network, one epoch.
TINY_TRAIN = {"model": "mlp", "epochs": 1, "batch_size": 64}


def dvc_env(repo: Path, *args, env: dict, check: bool = True, timeout: float = 900):
    """`dvc ARGS` in repo with an explicit environment (e.g. HOME holding known_hosts)."""
    cmd = (sys.executable, "-m", "dvc", *args)
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


def out_hashes(repo: Path) -> dict[str, str]:
    """sha256 of every file of every stage output in dvc.lock, by path under repo."""
    import hashlib

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


def ran_training(output: str) -> bool:
    """Did the train stage run (its per-epoch lines) in this dvc output?"""
    return "Running stage 'train'" in output or any(
        line.lower().startswith("epoch ") for line in output.splitlines())
