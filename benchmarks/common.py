"""What several benchmarks share: where full MNIST lies, the machine they run on, a child
process timed (wall time, peak RSS), a scratch copy of the pipeline with its data ready,
the train and evaluate stages run in it, and the train stage's report read back.

Each benchmark is a module of its own (`python -m benchmarks.NAME --help`); `make bench`
runs the default set of them side by side (benchmarks/run.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from testbed.pipeline import paths, stage_command

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mnist.npz"


def argument_parser(module: str, doc: str, data: Path = DEFAULT_DATA
                    ) -> argparse.ArgumentParser:
    """A benchmark's command line, `python -m MODULE`: its docstring's first paragraph, and
    --data (default: `data`)."""
    parser = argparse.ArgumentParser(prog=f"python -m {module}",
                                     description=doc.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=data,
                        help=f"full MNIST in the Keras .npz layout (default: {data})")
    return parser


def check_data(data: Path) -> None:
    if not data.is_file():
        sys.exit(f"error: {data} not found; pass --data PATH to a full mnist.npz")


def machine() -> str:
    import numpy as np
    import torch

    from stages.frameworks.keras.env import keras, tf
    from stages.runtime.machine import cpu_model

    return (f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} "
            f"cores, {platform.platform()}, Python {platform.python_version()}, TensorFlow "
            f"{tf.__version__}, Keras {keras.__version__}, PyTorch {torch.__version__}, "
            f"NumPy {np.__version__}")


def header() -> None:
    """The lines every benchmark's output starts with: the machine and the date."""
    print(f"machine: {machine()}")
    print(f"date: {time.strftime('%Y-%m-%d')}", flush=True)


def deep_update(base: dict, changes: dict) -> None:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value


# What run_child runs the command under: a small interpreter that forks and execs it, waits,
# and prints the command's own peak RSS on its last stderr line. A child's ru_maxrss counts
# what its forked copy of the parent held before exec (measured: a benchmark process holding
# 1 GB made a 100 MB child read as 968 MB); forked from this small process, it counts the
# command alone.
TIMER = """
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(f"\\npeak_rss_kb={usage.ru_maxrss}", file=sys.stderr)
sys.exit(os.waitstatus_to_exitcode(status) % 256)
"""


def run_child(args: list[str], cwd: Path) -> dict:
    """Run a child under /usr/bin/time-like accounting: wall time and its own peak RSS (MB)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", TIMER, *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    out = proc.stdout.read().decode()
    err = proc.stderr.read().decode()
    proc.wait()
    err, _, peak = err.rstrip("\n").rpartition("\npeak_rss_kb=")
    if proc.returncode or not peak.isdigit():
        sys.exit(f"benchmark child failed: {' '.join(map(str, args))}\n{err[-3000:]}")
    return {"stdout": out, "wall": time.perf_counter() - started,
            "peak_rss_mb": int(peak) / 1024}


def prepare_project(data: Path, preset: dict) -> Path:
    """A scratch copy of the pipeline with `preset` over params.yaml, data ready to train."""
    tmp = Path(tempfile.mkdtemp(prefix="mnist-bench-"))
    shutil.copytree(ROOT / "stages", tmp / "stages",
                    ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["download"].update(url=str(data.resolve()), sha256=None, format="npz", mirrors=[])
    deep_update(params, preset)
    (tmp / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("download", "normalize"):
        run_child(stage_command(stage), tmp)
    return tmp


def train_and_evaluate(project: Path, seed: int) -> tuple[dict, dict]:
    """The project's train stage run with `seed`, then evaluate: the train child (output,
    time, peak RSS) and the test metrics."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["seed"] = seed
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    child = run_child(stage_command("train"), project)
    run_child(stage_command("evaluate"), project)
    return child, json.loads((project / paths()["metrics"]).read_text())


def train_seconds(stdout: str) -> float:
    """The training time the train stage reports on its last line."""
    return float(re.search(r"epochs in ([\d.]+)s", stdout).group(1))


def trained_images(stdout: str) -> int:
    """How many images the train stage fitted on (the training set less validation)."""
    return int(re.search(r" on (\d+) images", stdout).group(1))
