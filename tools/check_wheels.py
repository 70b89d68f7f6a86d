"""Does every locked package install on every platform and Python the project supports?

Run it whenever a lock changes (`make check-wheels`). For each lock, target platform and
supported Python, uv resolves the lock's exact pins as pip would install them there (the
markers evaluated for that platform, not this machine) with building from source disabled:
a pin that has no wheel for the target fails. A pin whose only distribution is a source
archive passes if that archive is pure Python: it is built here once, and the wheel it gives
must be tagged `none-any` (it runs on any platform). One line per lock, platform and
Python; the exit status is the number of failures.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from uv import find_uv_bin

from tools.pythons import supported

ROOT = Path(__file__).resolve().parent.parent
# uv's target names. macOS 14: PyTorch 2.13's macOS wheels need it (TensorFlow's, 12).
PLATFORMS = {
    "macOS 14+ arm64": ("aarch64-apple-darwin", {"MACOSX_DEPLOYMENT_TARGET": "14.0"}),
    "Linux aarch64": ("aarch64-manylinux_2_28", {}),
    "Linux x86_64": ("x86_64-manylinux_2_28", {}),
}
# Which lock is meant for which platforms: the GPU lock is for Linux x86_64 only.
LOCKS = {
    "requirements.lock": tuple(PLATFORMS),
    "requirements-torch.lock": tuple(PLATFORMS),
    "requirements-gpu.lock": ("Linux x86_64",),
}
SOURCE_ONLY = re.compile(r"Because (\S+)==(\S+) has no usable wheels")
TIMEOUT = 600  # seconds for one resolution or one build: far more than either takes


def resolve(requirements: str, platform: str, python: str, env: dict) -> str:
    """uv's complaint when the pins cannot all be installed from wheels there, else ''."""
    with tempfile.TemporaryDirectory() as tmp:
        pins = Path(tmp) / "pins.txt"
        pins.write_text(requirements)
        proc = subprocess.run(
            [find_uv_bin(), "pip", "compile", "--quiet", "--no-deps", "--no-build",
             "--no-python-downloads", "--python-platform", platform, "--python-version", python,
             "--output-file", os.devnull, str(pins)],
            capture_output=True, text=True, timeout=TIMEOUT, env=env)
    return "" if proc.returncode == 0 else proc.stderr


def is_pure_python(name: str, version: str, env: dict) -> bool:
    """Build the source archive of name==version here; is the wheel platform-independent?"""
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                        "--no-binary", name, "--wheel-dir", out, f"{name}=={version}"],
                       check=True, timeout=TIMEOUT, capture_output=True, env=env)
        return all(wheel.name.endswith("-none-any.whl") for wheel in Path(out).iterdir())


def check(requirements: str, platform: str, python: str, env: dict, pure: dict) -> str:
    """'' if every pin of `requirements` (a lock's text) installs on that platform and
    Python, else why not. `env`: the environment uv and pip run in; `pure` caches which
    source archives are pure Python."""
    for _ in range(requirements.count("==")):  # at most one source-only pin a round
        problem = resolve(requirements, platform, python, env)
        found = SOURCE_ONLY.search(problem)
        if not found:
            lines = problem.strip().splitlines() or [""]
            return next((line.strip() for line in lines if "Because" in line), lines[0])
        name, version = found.groups()
        if (name, version) not in pure:
            pure[name, version] = is_pure_python(name, version, env)
        if not pure[name, version]:
            return f"{name}=={version}: only a source archive, and it is not pure Python"
        requirements = re.sub(rf"(?m)^{re.escape(name)}==.*$", "", requirements)
    return "the lock's pins kept failing"


def main() -> int:
    failures, pure = 0, {}
    for lock, platforms in LOCKS.items():
        for label in platforms:
            platform, target = PLATFORMS[label]
            for python in supported():
                problem = check((ROOT / lock).read_text(), platform, python,
                                os.environ | target, pure)
                failures += bool(problem)
                print(f"{lock:24} {label:16} Python {python}: {problem or 'ok'}", flush=True)
    sources = ", ".join(f"{n}=={v}" for (n, v), ok in pure.items() if ok)
    if sources:
        print(f"pure-Python source archives, built here to check: {sources}")
    return failures


if __name__ == "__main__":
    sys.exit(main())
