"""The C framework's environment: a C compiler, the flags the program is built with, and
the thread count it runs on.

The programs (stages/frameworks/c/mnist_mlp.c, mnist_cnn.c) are C11 and need libc and libm
only; OpenMP, when the compiler has it, spreads each step over `speed.c_threads` threads
without changing a bit (each program's header comment says why). `-march=native` lets the
compiler use every vector instruction of this CPU: the bits are those of this machine, like
every framework's.
"""

from __future__ import annotations

import os
import shutil
import subprocess

from stages.runtime.failures import PipelineError

INSTALL = "make c-compiler"  # installs Debian's gcc when no compiler is found (as root)
COMPILERS = ("cc", "gcc", "clang")
# -ffp-contract=fast: ISO C mode (-std=c11) makes GCC keep a*b+c as two roundings; this
# lets it fuse them into one multiply-add instruction (one rounding, twice the throughput).
# It reorders nothing: each sum keeps its order, so the bits still do not depend on threads.
CFLAGS = ("-std=c11", "-O3", "-march=native", "-ffp-contract=fast")
LIBS = ("-lm",)
OPENMP = "-fopenmp"

_threads = 1


def compiler() -> str:
    """The C compiler: $CC if set, else the first of cc, gcc, clang on PATH."""
    wanted = os.environ.get("CC")
    for name in ([wanted] if wanted else COMPILERS):
        path = shutil.which(name)
        if path:
            return path
    raise PipelineError(f"train.framework c needs a C compiler ({wanted or ', '.join(COMPILERS)}"
                        f"), none found on PATH: run `{INSTALL}` or set CC")


def compiler_version(cc: str) -> str:
    """The first line `cc --version` prints, e.g. 'gcc (Debian 12.2.0-14) 12.2.0'."""
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise PipelineError(f"{cc} --version failed: {err}") from None
    return (out.stdout.splitlines() or ["unknown"])[0].strip()


def configure(seed: int, intra_op_threads: int, inter_op_threads: int) -> None:
    """The program's thread count; the seed is passed to it with the recipe, and it has no
    second thread pool (inter_op_threads is not used)."""
    global _threads
    _threads = intra_op_threads


def threads() -> int:
    return _threads


# How fit() built the program: compiler, version, flags, OpenMP or not (for run_info).
built: dict = {}


def versions() -> dict:
    """What a C run's bits depend on besides the params: for run_info.json (the compiler
    fit() built with, or the one it would use)."""
    if built:
        return dict(built)
    cc = compiler()
    return {"cc": cc, "cc_version": compiler_version(cc)}
