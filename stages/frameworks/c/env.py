"""The C framework's environment: the toolchains that build the programs, the flags they are
built with, and the thread count they run on.

The programs (stages/frameworks/c/mnist_mlp.c, mnist_cnn.c) are C11 and need libc and libm
only; OpenMP, when the compiler has it, spreads each step over `speed.c_threads` threads
without changing a bit (each program's header comment says why). `-march=native` lets the
compiler use every vector instruction of this CPU: the bits are those of this machine, like
every framework's.

The pipeline builds with the native toolchain: this machine's compiler, for this CPU. The
tests also build and run the programs at AVX2's vector width, with clang (which, like
Apple's, may have no OpenMP), for AArch64 with a cross compiler, run under an emulator, and
with GCC's sanitizers at the x86-64 baseline's vector width (AVX2, CLANG, AARCH64,
SANITIZED below).
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from stages.runtime.failures import PipelineError

INSTALL = "make c-compiler"  # installs Debian's gcc when no compiler is found (as root)
COMPILERS = ("cc", "gcc", "clang")
# -ffp-contract=fast: ISO C mode (-std=c11) makes GCC keep a*b+c as two roundings; this
# lets it fuse them into one multiply-add instruction (one rounding, twice the throughput).
# It reorders nothing: each sum keeps its order, so the bits still do not depend on threads.
CFLAGS = ("-std=c11", "-O3", "-march=native", "-ffp-contract=fast")
# A cross compiler has no `native` CPU to build for: AArch64's is named instead. armv8-a is
# every 64-bit ARM's baseline, and has NEON, with its fused multiply-add (fmla).
AARCH64_CFLAGS = ("-std=c11", "-O3", "-march=armv8-a", "-ffp-contract=fast")
# The AVX2 build: x86-64 with AVX2 and FMA (Haswell's set, no AVX-512), the 256-bit vectors
# (VL 8 in the programs) of the machines without AVX-512, run natively on any x86-64 CPU
# that has AVX2: on an AVX-512 machine it is the code path the native build never takes.
AVX2_CFLAGS = ("-std=c11", "-O3", "-march=haswell", "-ffp-contract=fast")
# The sanitized build: x86-64's baseline (SSE2, no FMA) has AArch64's vector width, 128 bits
# (VL 4 in the programs), the width whose code paths only the emulated AArch64 build runs
# otherwise; AddressSanitizer and UndefinedBehaviorSanitizer check every access and operation,
# and the first error ends the program (-fno-sanitize-recover); -O1 and -g: the sanitizers'
# usual build, fast enough for the tests, its reports naming lines. Its bits are its own (no
# FMA, other optimisations): the tests compare it with NumPy within tolerances, and with
# itself only.
SANITIZED_CFLAGS = ("-std=c11", "-O1", "-march=x86-64", "-ffp-contract=fast", "-g",
                    "-fsanitize=address,undefined", "-fno-omit-frame-pointer",
                    "-fno-sanitize-recover=all")
# What the sanitized program runs with: the first report ends it with exit status 86, never
# 1, the programs' own error exit (the sanitizers' default is 1). No leak check: a program runs
# one command, allocates its buffers once for the whole of it and leaves them to the exit, on
# the normal path as after an error (fail() exits at once), so LeakSanitizer would list every
# buffer (checked: the same ones after 1 epoch as after 3, none made per batch or epoch).
SANITIZER_EXIT = 86
SANITIZER_ENV = (f"ASAN_OPTIONS=halt_on_error=1:abort_on_error=0:detect_leaks=0"
                 f":exitcode={SANITIZER_EXIT}",
                 f"UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1:exitcode={SANITIZER_EXIT}")
LIBS = ("-lm",)
OPENMP = "-fopenmp"
# What has_openmp() builds: the header and the runtime library that -fopenmp needs.
OPENMP_PROBE = "#include <omp.h>\nint main(void) { return omp_get_max_threads() < 1; }\n"

def compiler() -> str:
    """The C compiler: $CC if set, else the first of cc, gcc, clang on PATH."""
    wanted = os.environ.get("CC")
    for name in ([wanted] if wanted else COMPILERS):
        path = shutil.which(name)
        if path:
            return path
    raise PipelineError(f"train.framework c needs a C compiler ({wanted or ', '.join(COMPILERS)}"
                        f"), none found on PATH: run `{INSTALL}` or set CC")


@dataclass(frozen=True)
class Toolchain:
    """What builds a program and what runs it: a compiler (None: the one compiler() picks)
    and its flags, and the command the program runs under (none when it is built for this
    CPU; an emulator when it is built for another)."""

    name: str
    cc: str | None = None
    cflags: tuple[str, ...] = CFLAGS
    runner: tuple[str, ...] = ()

    def compiler(self) -> str:
        return compiler() if self.cc is None else shutil.which(self.cc) or self.cc

    def missing(self) -> list[str]:
        """The commands it names that are not on PATH (the native compiler is compiler()'s
        to find)."""
        return [c for c in (self.cc, *self.runner[:1]) if c and not shutil.which(c)]


NATIVE = Toolchain("native")
# The toolchains the tests build and run the programs with besides the native one (Debian's
# packages, which `make system-deps` installs). avx2: the native compiler at AVX2's width.
# clang: Debian's, without libomp-dev, has no
# OpenMP, as Apple's clang has none. aarch64: GCC's cross compiler, the program run under
# qemu's user-mode emulation, with the target's loader and libraries from Debian's cross
# packages (-L). sanitized: GCC (libasan and libubsan come with it) at the x86-64 baseline,
# run by env(1) with the sanitizers' options; x86_64 hosts only, as the tests' machines are.
CLANG = Toolchain("clang", "clang")
AVX2 = Toolchain("avx2", cflags=AVX2_CFLAGS)
AARCH64 = Toolchain("aarch64", "aarch64-linux-gnu-gcc", AARCH64_CFLAGS,
                    ("qemu-aarch64", "-L", "/usr/aarch64-linux-gnu"))
SANITIZED = Toolchain("sanitized", "gcc", SANITIZED_CFLAGS, ("env", *SANITIZER_ENV))
TOOLCHAINS = (NATIVE, AVX2, CLANG, AARCH64, SANITIZED)


def compiler_version(cc: str) -> str:
    """The first line `cc --version` prints, e.g. 'gcc (Debian 12.2.0-14) 12.2.0'."""
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise PipelineError(f"{cc} --version failed: {err}") from None
    return (out.stdout.splitlines() or ["unknown"])[0].strip()


@functools.cache
def has_openmp(cc: str) -> bool:
    """Whether `cc -fopenmp` builds and links an OpenMP program: GCC's does (libgomp comes
    with it), Debian's clang only with libomp-dev, Apple's clang never (it refuses the flag)."""
    with tempfile.TemporaryDirectory(prefix="mnist-openmp-") as tmp:
        source = Path(tmp) / "probe.c"
        source.write_text(OPENMP_PROBE)
        try:
            done = subprocess.run([cc, OPENMP, "-o", str(Path(tmp) / "probe"), str(source)],
                                  capture_output=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired):
            return False
    return done.returncode == 0


def configure(seed: int, intra_op_threads: int, inter_op_threads: int) -> None:
    """Nothing to set up in this process: the program gets the seed with the recipe and its
    thread count (cfg.intra_op_threads) on its command line, and has one thread pool."""


def build_settings(toolchain: Toolchain = NATIVE) -> dict:
    """How `toolchain` builds a program: compiler, its version, flags, OpenMP or not."""
    cc = toolchain.compiler()
    openmp = has_openmp(cc)
    return {"cc": cc, "cc_version": compiler_version(cc),
            "cflags": " ".join([*toolchain.cflags, *([OPENMP] if openmp else [])]),
            "openmp": openmp}


def versions() -> dict:
    """What a C run's bits depend on besides the params: for run_info.json (how the
    pipeline's toolchain builds the programs). Not the source's hash: the source is a dep,
    and an edit that changes no result (a comment) must leave the model folder as it was."""
    return build_settings(NATIVE)
