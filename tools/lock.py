"""`make lock`: every lock file, resolved once for every supported Python and platform.

uv's universal resolution writes one lock per file whose lines carry environment markers
(`tensorflow-cpu` on Linux x86_64, `tensorflow` elsewhere; numpy or scipy may fork by
Python), so the same file installs exactly on Linux and macOS, x86_64 and ARM, Python 3.11
to 3.13. Each lock is resolved with the previous one as preferences, so a package moves
only when pyproject.toml (or requirements-gpu.in) asks it to.

- requirements.lock: the project and its dev tools (`make repro`, `make test`).
- requirements-torch.lock: the same versions plus PyTorch (`make torch`). PyTorch's CUDA
  runtime (nvidia-*, cuda-*, triton) is left out: PyPI's Linux build of torch pins it
  exactly in its own metadata, a CPU build needs none of it, and listed here it would be
  installed beside a CPU build too (several GB for nothing).
- requirements-gpu.lock: GPU TensorFlow and the CUDA build of PyTorch, CUDA runtime
  included (`make gpu`, Linux x86_64 only).

`make lock` runs it in the project's venv: uv comes with the dev tools.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from uv import find_uv_bin

from tools.pythons import supported

ROOT = Path(__file__).resolve().parent.parent
# What only a CUDA build of PyTorch needs: kept out of the CPU lock (see above), unless the
# main lock pins it for another reason (nvidia-ml-py, for dvclive).
CUDA_RUNTIME = re.compile(r"(nvidia-|cuda-|triton\b)")


def compile_lock(output: str, *inputs: str) -> None:
    """uv pip compile, universal, into `output` (whose current pins are preferred)."""
    # --python-version: the lowest supported; a universal resolution covers every later one.
    subprocess.run([find_uv_bin(), "pip", "compile", "--quiet", "--universal",
                    "--no-python-downloads", "--python-version", supported()[0],
                    "--custom-compile-command", "make lock", "--output-file", output, *inputs],
                   cwd=ROOT, check=True)


def pinned(lock: str) -> set[str]:
    """The names a lock pins."""
    return {line.split("==")[0] for line in lock.splitlines() if "==" in line
            and not line.startswith((" ", "#"))}


def without(lock: str, names: re.Pattern, keep: set[str]) -> str:
    """The lock's text less every requirement (and its `# via` lines) whose name matches
    `names` and is not in `keep`."""
    kept, dropping = [], False
    for line in lock.splitlines(keepends=True):
        if not line.startswith((" ", "#")):
            name = line.split("==")[0]
            dropping = bool(names.match(name)) and name not in keep
        if not dropping:
            kept.append(line)
    return "".join(kept)


def main() -> None:
    compile_lock("requirements.lock", "--extra", "dev", "pyproject.toml")
    compile_lock("requirements-torch.lock", "--extra", "dev", "--extra", "torch",
                 "--constraint", "requirements.lock", "pyproject.toml")
    torch_lock = ROOT / "requirements-torch.lock"
    main_pins = pinned((ROOT / "requirements.lock").read_text())
    torch_lock.write_text(without(torch_lock.read_text(), CUDA_RUNTIME, keep=main_pins))
    compile_lock("requirements-gpu.lock", "requirements-gpu.in")


if __name__ == "__main__":
    sys.exit(main())
