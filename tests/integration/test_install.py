"""The two commands' installs, as `make` plans them on a fresh checkout (`make -n`: the
commands it would run, none run): the default pipeline never installs PyTorch; the tests,
which cover every framework, do."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.helpers import ROOT


def planned(tmp_path, target: str) -> str:
    for name in ("Makefile", "pyproject.toml", "requirements.lock", "requirements-torch.lock"):
        shutil.copy2(ROOT / name, tmp_path / name)
    # As a user's shell runs it, not as a sub-make of `make test` (which would add
    # "Entering directory" lines and the parent's flags).
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    proc = subprocess.run(["make", "--no-print-directory", "-n", target], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_make_repro_installs_the_main_lock_only(tmp_path):
    plan = planned(tmp_path, "repro")
    assert "pip install --quiet -r requirements.lock" in plan
    assert "torch" not in plan
    assert plan.rstrip().splitlines()[-1] == "dvc repro"


def test_the_venv_gets_the_project_and_its_commands_installed_offline(tmp_path):
    plan = planned(tmp_path, "repro")
    # After the lock (which pins setuptools, so the build needs no index), before the check.
    install = "pip install --quiet --no-deps --no-build-isolation -e ."
    assert plan.index("-r requirements.lock") < plan.index(install) < plan.index("pip check")
    pins = (ROOT / "requirements.lock").read_text()
    assert "\nsetuptools==" in pins


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


@pytest.mark.parametrize("target", ["repro", "test", "bench"])
def test_make_repro_test_and_bench_install_a_c_compiler_when_there_is_none(tmp_path, target):
    plan = planned(tmp_path, target)
    check = next(line for line in plan.splitlines() if "command -v cc" in line)
    assert "command -v gcc" in check and "command -v clang" in check
    assert "apt-get install -y -qq --no-install-recommends gcc libc6-dev" in plan


def test_a_compiler_named_by_cc_that_is_not_there_stops_make_with_one_line(tmp_path):
    shutil.copy2(ROOT / "Makefile", tmp_path / "Makefile")
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    proc = subprocess.run(["make", "--no-print-directory", "c-compiler"], cwd=tmp_path,
                          env=env | {"CC": "no-such-cc"}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert proc.stdout == "CC=no-such-cc: not found\n"
