"""The pipeline as dvc.yaml defines it, for benchmarks: its paths and its stage commands."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def paths() -> dict[str, str]:
    """dvc.yaml's vars: every path of the pipeline, by name."""
    out = {}
    for entry in yaml.safe_load((ROOT / "dvc.yaml").read_text())["vars"]:
        out.update(entry)
    return out


def stage_command(stage: str) -> list[str]:
    """A stage's command from dvc.yaml with its ${...} paths filled in, run by this Python."""
    cmd = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"][stage]["cmd"]
    argv = shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: paths()[m[1]], cmd))
    return [sys.executable, *argv[1:]] if argv[0] == "python" else argv
