"""The C programs (stages/frameworks/c): built with a toolchain, run under its runner, and
the idx files they read and write."""

from __future__ import annotations

import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from stages.frameworks.c import env as c_env
from stages.frameworks.c import model as c_model


@dataclass(frozen=True)
class Program:
    """A C program as fit.build() built it, and the command it runs under (its toolchain's
    runner: none on this CPU, an emulator for another's)."""

    path: Path
    runner: tuple[str, ...] = ()
    kind: str = "fast"  # or "reference" (train.c.program)


def require(toolchain: c_env.Toolchain) -> None:
    """A toolchain this machine lacks fails the test, naming what installs it: a test that
    needs it is never skipped."""
    missing = toolchain.missing()
    if missing:
        pytest.fail(f"the {toolchain.name} toolchain needs {' and '.join(missing)}, not found "
                    f"on PATH: `make system-deps` installs it (as root)", pytrace=False)


def c_program(model: str, toolchain: c_env.Toolchain = c_env.NATIVE,
              program: str = "fast") -> Program:
    """`model`'s C program, fast or reference, built with `toolchain` (required)."""
    from stages.frameworks.c import fit

    require(toolchain)
    return Program(fit.build(model, toolchain, program), toolchain.runner, program)


# The C programs' toolchains (stages/frameworks/c/env.py) as the parameters of a test that
# takes the module's `program` fixture, which builds with the toolchain it is handed:
# `@on_every_toolchain` over a test runs it with each. The toolchains besides the native one
# are `slow`: `make test` installs them (system-deps), `make test-fast` needs a C compiler only.
TOOLCHAINS = [pytest.param(t, id=t.name, marks=[pytest.mark.slow] if t != c_env.NATIVE else [])
              for t in c_env.TOOLCHAINS]
on_every_toolchain = pytest.mark.parametrize("program", TOOLCHAINS, indirect=True)

# The reference programs (stages/frameworks/c/reference/), built natively: what a `program`
# fixture handed REFERENCE builds. A check that every C program must pass runs with each
# toolchain's fast program and with the reference (`@on_every_toolchain_and_the_reference`),
# or with the native fast one and the reference (`@fast_and_reference`).
REFERENCE = "reference"
on_every_toolchain_and_the_reference = pytest.mark.parametrize(
    "program", [*TOOLCHAINS, pytest.param(REFERENCE, id=REFERENCE)], indirect=True)
fast_and_reference = pytest.mark.parametrize(
    "program", [pytest.param(c_env.NATIVE, id="fast"), pytest.param(REFERENCE, id=REFERENCE)],
    indirect=True)


def program_for(model: str, request) -> Program:
    """The `program` fixture's program for `model`: the toolchain or REFERENCE a test is
    handed (request.param), else the native fast one."""
    handed = getattr(request, "param", c_env.NATIVE)
    if handed == REFERENCE:
        return c_program(model, c_env.NATIVE, REFERENCE)
    return c_program(model, handed)


def run_program(program: Program, *args, check: bool = True, timeout: float = 300):
    """One of the C programs with `args`, under its runner, output captured; with check, its
    exit status must be 0."""
    proc = subprocess.run([*program.runner, str(program.path), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def write_idx(path: Path, array: np.ndarray) -> Path:
    from stages.data import idx

    path.write_bytes(idx.encode(array))
    return path


def read_idx(path: Path) -> np.ndarray:
    """An idx file the C programs wrote: uint8 or big-endian float32, its dimensions."""
    data = path.read_bytes()
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.uint8 if data[2] == 0x08 else np.dtype(">f4")
    return np.frombuffer(data, dtype, offset=4 + 4 * ndim).reshape(dims)


def lively_cnn(seed: int, readout: float = 0.1) -> c_model.CNN:
    """Weights under which every part of the network shows in its output: He-scaled kernels
    (activations of order 1 through the stack), BatchNorm scales, shifts and moving
    statistics far from the identity, a read-out whose probabilities spread (its columns
    sum to zero: the ReLU features, all positive, would otherwise favour one class)."""
    rng = np.random.default_rng(seed)
    arrays = []
    for side, _, inputs, channels in c_model.CNN_SHAPES[:-2:5]:
        arrays += [rng.normal(0, np.sqrt(2 / (side * side * inputs)),
                              (side, side, inputs, channels)),
                   rng.uniform(0.5, 1.5, channels), rng.normal(0, 0.3, channels),
                   rng.normal(0.3, 0.3, channels), rng.uniform(0.5, 2, channels)]
    dense = rng.normal(0, readout, (c_model.FEATURES, 10))
    arrays += [dense - dense.mean(0), rng.normal(0, 0.3, 10)]
    return c_model.CNN(*(a.astype(np.float32) for a in arrays))
