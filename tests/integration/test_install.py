"""The two commands' installs, as `make` plans them on a fresh checkout (`make -n`: the
commands it would run, none run): the default pipeline never installs PyTorch; the tests,
which cover every framework, do."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.paths import ROOT
from tests.projects import make_files
from tools.pythons import interpreter, supported


def planned(tmp_path, target: str) -> str:
    """What `make TARGET` would run in a fresh clone (make_n), which must plan it."""
    proc = make_n(tmp_path, target)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_make_repro_installs_the_main_lock_only(tmp_path):
    plan = planned(tmp_path, "repro")
    assert "pip install --quiet -r requirements.lock" in plan
    assert "torch" not in plan
    assert plan.rstrip().splitlines()[-1] == "dvc repro"


@pytest.mark.slow
def test_the_venv_gets_the_project_and_its_commands_installed_offline(tmp_path):
    plan = planned(tmp_path, "repro")
    # After the lock (which pins setuptools, so the build needs no index), before the check.
    install = "pip install --quiet --no-deps --no-build-isolation -e ."
    assert plan.index("-r requirements.lock") < plan.index(install) < plan.index("pip check")
    pins = (ROOT / "requirements.lock").read_text()
    assert "\nsetuptools==" in pins


@pytest.mark.slow
@pytest.mark.parametrize("target", ["torch", "test", "bench"])
def test_make_torch_test_and_bench_add_the_torch_lock(tmp_path, target):
    plan = planned(tmp_path, target)
    assert plan.index("-r requirements.lock") < plan.index("-r requirements-torch.lock")


def test_the_torch_lock_keeps_every_version_of_the_main_lock():
    def pins(name):  # name -> version and markers, e.g. "2.21.0 ; sys_platform == 'linux'"
        return dict(line.split("==", 1) for line in (ROOT / name).read_text().splitlines()
                    if "==" in line and not line.startswith((" ", "#")))

    main, torch = pins("requirements.lock"), pins("requirements-torch.lock")
    assert {k: torch[k] for k in main} == main
    assert torch["torch"] == "2.13.0"  # the public version: any build of it, CPU or CUDA
    assert "safetensors" in torch and "torch" not in main


@pytest.mark.slow
@pytest.mark.parametrize("target", ["repro", "test", "bench"])
def test_make_repro_test_and_bench_install_a_c_compiler_when_there_is_none(tmp_path, target):
    plan = planned(tmp_path, target)
    check = next(line for line in plan.splitlines() if "command -v cc" in line)
    assert "command -v gcc" in check and "command -v clang" in check
    assert "apt-get install -y -qq --no-install-recommends gcc libc6-dev" in plan


@pytest.mark.slow
def test_a_compiler_named_by_cc_that_is_not_there_stops_make_with_one_line(tmp_path):
    shutil.copy2(ROOT / "Makefile", tmp_path / "Makefile")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    proc = subprocess.run(["make", "--no-print-directory", "c-compiler"], cwd=tmp_path,
                          env=env | {"CC": "no-such-cc"}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert proc.stdout == "CC=no-such-cc: not found\n"


# --- which Python builds .venv ----------------------------------------------------------------


def real_python(version: str) -> str:
    """A real interpreter of that version on this machine (PATH or pyenv), or a skip."""
    found = interpreter(version)
    if found is None:
        pytest.skip(f"no Python {version} on this machine (PATH or pyenv)")
    return found


def make_n(tmp_path, *args, path: str | None = None) -> subprocess.CompletedProcess:
    """`make -n ARGS` in a fresh clone's files in tmp_path, as a user's shell runs it: not
    as a sub-make of `make test` (which would add "Entering directory" lines and the
    parent's flags), no PYTHON in the environment (CI exports one), the PATH given."""
    make_files(tmp_path)
    drop = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "PYTHON")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    if path is not None:
        env["PATH"] = path
    return subprocess.run(["make", "--no-print-directory", "-n", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)


def test_the_supported_pythons_are_pyprojects(tmp_path):
    makefile = (ROOT / "Makefile").read_text()
    line = next(line for line in makefile.splitlines() if line.startswith("PYTHONS :="))
    assert line.split(":=")[1].split() == supported()[::-1] == ["3.13", "3.12", "3.11"]


@pytest.mark.slow
def test_make_builds_the_venv_with_the_newest_supported_python_on_path(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for version in supported():
        (bin_dir / f"python{version}").symlink_to(real_python(version))
    proc = make_n(tmp_path, "repro", path=f"{bin_dir}:/usr/bin:/bin")
    assert proc.returncode == 0, proc.stderr
    assert f"python{supported()[-1]} -m venv .venv" in proc.stdout


@pytest.mark.slow
def test_an_unsupported_python_is_refused_in_one_line_before_anything_runs(tmp_path):
    old = real_python("3.10")
    proc = make_n(tmp_path, "repro", f"PYTHON={old}")
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr == (f"Makefile:{makefile_line('$(error')}: *** {old} is Python 3.10: the "
                           "project needs Python 3.11 to 3.13 (install one, or name it with "
                           "PYTHON=).  Stop.\n")
    proc = make_n(tmp_path, "repro", "PYTHON=no-such-python")
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert "no-such-python is not a Python that runs: the project needs Python 3.11 to 3.13" \
        in proc.stderr


def makefile_line(piece: str) -> int:
    return next(n for n, line in enumerate((ROOT / "Makefile").read_text().splitlines(), 1)
                if piece in line)


@pytest.mark.slow
def test_the_venv_keeps_its_python_unless_another_is_named(tmp_path):
    older, newer = real_python("3.11"), real_python("3.12")
    subprocess.run([older, "-m", "venv", "--without-pip", str(tmp_path / ".venv")], check=True,
                   timeout=120)
    kept = make_n(tmp_path, "repro", path=f"{Path(newer).parent}:/usr/bin:/bin")
    assert kept.returncode == 0, kept.stderr
    assert '[ "3.11" != "3.11" ]' in kept.stdout  # .venv's own Python: nothing to replace
    replaced = make_n(tmp_path, "repro", f"PYTHON={newer}")
    assert replaced.returncode == 0, replaced.stderr
    assert '[ "3.11" != "3.12" ]' in replaced.stdout
    assert f"rm -rf .venv && echo \"{newer} -m venv .venv\"" in replaced.stdout


# --- make gpu ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_make_gpu_replaces_the_cpu_builds_with_the_gpu_lock(tmp_path):
    plan = planned(tmp_path, "gpu")
    torch = plan.index("-r requirements-torch.lock")
    cpu_tf = plan.index("pip uninstall --quiet --yes tensorflow-cpu")
    assert torch < cpu_tf < plan.index("-r requirements-gpu.lock") < plan.rindex("pip check")
    assert "uname -m" in plan  # Linux x86_64 only: checked before anything is removed
