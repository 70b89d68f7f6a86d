"""Share results across machines: real `dvc push`/`dvc pull` between separate clones.

Machine A runs the pipeline, commits (param set X) and pushes its results to
  - the project's default remote, the local directory `../mnist-dvc-storage` that the
    committed .dvc/config names (here: beside A and the other clones), and
  - an SSH remote served by a real OpenSSH server on 127.0.0.1 (tests/sshd.py), whose
    port, user and key live only in each clone's git-ignored .dvc/config.local.
Machine B is a fresh `git clone` of A's repo (a bare origin holding X only) with an empty
cache of its own: it pulls, and must end up with byte-identical outputs, a clean
`dvc status` and a `dvc repro` that runs nothing.

Run-cache: A then runs param set Y (never pushed to git) and pushes it with
`dvc push --run-cache`. A clone on X that sets Y's params gets every output of Y from
the run-cache with `dvc repro --pull`, without running a single stage.
"""

from __future__ import annotations

import json
import shutil
import time
from types import SimpleNamespace

import pytest
import yaml

from conftest import (
    ROOT,
    TINY_TRAIN,
    dvc,
    dvc_env,
    make_project,
    out_hashes,
    ran_training,
    run_env,
    set_params,
    sh,
    stages_run,
)
from sshd import SSHServer

pytestmark = pytest.mark.slow

SSH_REMOTE = "team-ssh"
# Y changes training, and a download param that does not change the data: download's
# dvc.lock entry no longer matches, so only the run-cache can spare it a rerun.
PARAMS_Y = {"train": {"epochs": 2, "learning_rate": 0.004}, "download": {"timeout": 60}}
CACHED = "Stage '{}' is cached - skipping run, checking out outputs"


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    with SSHServer(tmp_path_factory.mktemp("sshd")) as server:
        yield server


def ssh_login(repo, server: SSHServer) -> None:
    """This machine's credentials for the SSH remote: --local, so never committed."""
    env = server.env(run_env())
    for key, value in (("port", server.port), ("user", server.user),
                       ("keyfile", server.client_key)):
        dvc_env(repo, "remote", "modify", "--local", SSH_REMOTE, key, str(value), env=env)


def clone(team, name: str):
    """A second machine: a fresh clone of origin with its own, empty DVC cache."""
    repo = team.root / name
    sh(team.root, "git", "clone", "-q", str(team.origin), str(repo))
    cache = team.root / f"{name}-cache"
    dvc(repo, "cache", "dir", "--local", str(cache))
    assert not cache.exists() or not any(cache.rglob("*"))
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outs = [out["path"] for stage in lock["stages"].values() for out in stage["outs"]]
    assert not any((repo / path).exists() for path in outs)  # git brought no data
    return repo, cache


@pytest.fixture(scope="module")
def team(tmp_path_factory, sshd):
    root = tmp_path_factory.mktemp("team")
    a = make_project(root / "A", train=TINY_TRAIN)
    # The project's own .dvc/config: its default remote is ../mnist-dvc-storage.
    shutil.copy(ROOT / ".dvc" / "config", a / ".dvc" / "config")
    dvc(a, "remote", "add", SSH_REMOTE, sshd.url(root / "ssh-storage"))
    ssh_login(a, sshd)
    dvc(a, "repro")
    sh(a, "git", "add", "-A")
    sh(a, "git", "commit", "-qm", "results of param set X")
    origin = root / "origin.git"
    sh(root, "git", "clone", "-q", "--bare", str(a), str(origin))
    env = sshd.env(run_env())
    hashes_x = out_hashes(a)
    assert len(hashes_x) > 50  # every output file: data, model, reports, 30 mosaics, PNGs
    for pushed in (dvc(a, "push"), dvc_env(a, "push", "-r", SSH_REMOTE, env=env)):
        assert " files pushed" in pushed.stdout
    return SimpleNamespace(root=root, a=a, origin=origin, hashes_x=hashes_x, env=env,
                           storage=root / "mnist-dvc-storage", ssh_storage=root / "ssh-storage")


@pytest.fixture(scope="module")
def team_y(team):
    """A runs param set Y, commits it locally (origin keeps X) and pushes the run-cache."""
    set_params(team.a, **PARAMS_Y)
    run_y = dvc(team.a, "repro")
    assert "train" in stages_run(run_y.stdout)
    sh(team.a, "git", "commit", "-qam", "results of param set Y")
    dvc_env(team.a, "push", "--run-cache", "-r", SSH_REMOTE, env=team.env)
    return SimpleNamespace(hashes_y=out_hashes(team.a))


def assert_same_results_and_nothing_to_do(repo, expected: dict, env=None) -> None:
    assert out_hashes(repo) == expected  # every file of every output, byte for byte
    assert json.loads(dvc_env(repo, "status", "--json", env=env or run_env()).stdout) == {}
    again = dvc_env(repo, "repro", env=env or run_env())
    assert stages_run(again.stdout) == [] and not ran_training(again.stdout), again.stdout


def test_default_remote_is_a_sibling_directory_and_credentials_stay_out_of_git(team):
    repo = team.a
    config = (ROOT / ".dvc" / "config").read_text()
    listed = dvc(repo, "remote", "list").stdout.splitlines()
    default = [line.split() for line in listed if line.endswith("(default)")]
    assert default == [["storage", str(team.storage), "(default)"]], listed
    assert team.storage.is_dir() and any((team.storage / "files" / "md5").rglob("*"))
    # Port, user and key only in the git-ignored .dvc/config.local.
    def keys(text):
        return {line.split("=")[0].strip() for line in text.splitlines() if "=" in line
                and not line.lstrip().startswith(("#", ";"))}

    secret = {"keyfile", "port", "user", "password"}
    assert not keys(config) & secret
    assert not keys(sh(repo, "git", "show", "HEAD:.dvc/config").stdout) & secret
    assert {"keyfile", "port", "user"} <= keys((repo / ".dvc" / "config.local").read_text())
    sh(repo, "git", "check-ignore", "-q", ".dvc/config.local")
    assert sh(repo, "git", "status", "--porcelain").stdout == ""


def test_clone_pulls_from_the_default_local_remote(team):
    b, cache = clone(team, "B-local")
    pulled = dvc(b, "pull")
    assert "files" in pulled.stdout and any(cache.rglob("*"))
    assert_same_results_and_nothing_to_do(b, team.hashes_x)


def test_clone_pulls_over_ssh_from_a_real_sshd(team, sshd):
    started = time.monotonic()
    b, cache = clone(team, "B-ssh")
    ssh_login(b, sshd)
    dvc_env(b, "pull", "-r", SSH_REMOTE, env=team.env)
    assert any(cache.rglob("*"))  # B's own cache, filled over SSH
    assert_same_results_and_nothing_to_do(b, team.hashes_x, env=team.env)
    seconds = time.monotonic() - started
    print(f"cross-clone over SSH (clone, pull, verify, status, repro): {seconds:.1f}s")
    # It really went through sshd: key logins from this user, and objects in its storage.
    assert f"Accepted publickey for {sshd.user}" in sshd.log.read_text()
    assert any((team.ssh_storage / "files" / "md5").rglob("*"))


def test_ssh_remote_without_credentials_fails_cleanly(team):
    """No key configured: the pull is refused, nothing half-written in the workspace."""
    b, _ = clone(team, "B-nokey")
    failed = dvc_env(b, "pull", "-r", SSH_REMOTE, env=team.env, check=False, timeout=300)
    assert failed.returncode != 0
    assert not (b / "data" / "model").exists()


def test_run_cache_gives_another_machine_a_param_set_it_never_ran(team, team_y, sshd):
    b, _ = clone(team, "B-runcache")
    ssh_login(b, sshd)
    dvc_env(b, "remote", "default", "--local", SSH_REMOTE, env=team.env)
    lock_x = yaml.safe_load((b / "dvc.lock").read_text())
    assert lock_x["stages"]["train"]["params"]["params.yaml"]["train"]["epochs"] == 1
    set_params(b, **PARAMS_Y)  # Y's params; B has no dvc.lock entry for them anywhere
    assert sh(b, "git", "log", "--format=%s").stdout.split("\n")[0] == "results of param set X"

    started = time.monotonic()
    repro = dvc_env(b, "repro", "--pull", env=team.env)
    seconds = time.monotonic() - started
    out = repro.stdout
    assert stages_run(out) == [] and not ran_training(out), out
    for stage in ("download", "train", "evaluate", "render-errors"):
        assert CACHED.format(stage) in out, out
    # normalize's lock entry still matches Y (same data, same params): pulled, not rerun.
    assert CACHED.format("normalize") in out or "Pulling data for stage: 'normalize'" in out
    assert_same_results_and_nothing_to_do(b, team_y.hashes_y, env=team.env)
    lock = yaml.safe_load((b / "dvc.lock").read_text())
    assert lock["stages"]["train"]["params"]["params.yaml"]["train"]["epochs"] == 2
    print(f"run-cache restore of param set Y over SSH: {seconds:.1f}s, no stage ran")

