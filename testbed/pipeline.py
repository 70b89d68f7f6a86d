"""The pipeline as dvc.yaml defines it: its paths and its stage commands.

Benchmarks and tests start stages exactly as `dvc repro` would, from this one reading of
dvc.yaml, in copies of the pipeline's files.
"""

from __future__ import annotations

import re
import shlex
import shutil
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PROJECT_FILES = ("stages", "dvc.yaml", "params.yaml", ".dvcignore", ".gitignore")


def _spec(repo: Path) -> dict:
    return yaml.safe_load((repo / "dvc.yaml").read_text())


def _vars(spec: dict) -> dict[str, str]:
    out = {}
    for entry in spec["vars"]:
        out.update(entry)
    return out


def paths(repo: Path = ROOT) -> dict[str, str]:
    """dvc.yaml's vars: every path of the pipeline, by name."""
    return _vars(_spec(repo))


def stage_command(stage: str, repo: Path = ROOT) -> list[str]:
    """A stage's command from dvc.yaml with its ${...} paths filled in, run by this Python."""
    spec = _spec(repo)
    named = _vars(spec)
    cmd = re.sub(r"\$\{(\w+)\}", lambda m: named[m[1]], spec["stages"][stage]["cmd"])
    argv = shlex.split(cmd)
    return [sys.executable, *argv[1:]] if argv[0] == "python" else argv


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
