"""What the tests share: the fixture, project copies under git + DVC, and runners.

Import from here (`from tests.helpers import ...`); pytest fixtures live in conftest.py.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "data" / "mnist_small.npz"
# sha256 of tests/data/mnist_small.npz: the first 1500 training and 500 test images of
# MNIST, derived from the shared full dataset.
FIXTURE_SHA256 = "910df9240d706b7262f7813a543ad99e800ac000fff7f4c69b7f59534782e2f9"
PROJECT_FILES = ("stages", "dvc.yaml", "params.yaml", ".dvcignore", ".gitignore")

# Small enough to train in seconds on the fixture, yet every code path of the default runs.
FAST_TRAIN = {"cnn": {"epochs": 2, "batch_size": 64}}
# The cheapest training that still runs every stage: the original network, one epoch.
TINY_TRAIN = {"model": "mlp", "mlp": {"epochs": 1, "batch_size": 64}}


def run_env() -> dict:
    """The environment stages run in: this interpreter's bin dir first, quiet telemetry."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["DVC_NO_ANALYTICS"] = "1"
    env["GIT_AUTHOR_NAME"] = env["GIT_COMMITTER_NAME"] = "test"
    env["GIT_AUTHOR_EMAIL"] = env["GIT_COMMITTER_EMAIL"] = "test@example.invalid"
    return env


def sh(cwd, *args, check: bool = True, timeout: float = 600,
       env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=cwd, env=env or run_env(), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
        )
    return proc


def dvc(repo: Path, *args, check: bool = True, timeout: float = 900, env: dict | None = None):
    return sh(repo, sys.executable, "-m", "dvc", *args, check=check, timeout=timeout, env=env)


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
    return merge(defaults, sections)


def copy_pipeline(dest: Path) -> Path:
    """The pipeline's files (code, dvc.yaml, params.yaml) copied into dest."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in PROJECT_FILES:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


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


def stages_run(output: str) -> list[str]:
    """Names of the stages `dvc repro` actually ran, in order."""
    return [line.split("'")[1] for line in output.splitlines()
            if line.startswith("Running stage '")]


def ran_training(output: str) -> bool:
    """Did the train stage run (its per-epoch lines) in this dvc output?"""
    return "Running stage 'train'" in output or any(
        line.lower().startswith("epoch ") for line in output.splitlines())


def dvc_vars(repo: Path = ROOT) -> dict[str, str]:
    """The paths dvc.yaml names in its `vars` (its one home for paths)."""
    spec = yaml.safe_load((repo / "dvc.yaml").read_text())
    out = {}
    for entry in spec["vars"]:
        out.update(entry)
    return out


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


def small_mnist(n_train: int = 12, n_test: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny random dataset in Keras' MNIST layout (uint8 images, labels 0..9)."""
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def gz_idx(array: np.ndarray) -> bytes:
    """A gzip-compressed idx file holding array, as MNIST's originals are served."""
    import gzip

    from stages import idx

    return gzip.compress(idx.encode(array), mtime=0)
