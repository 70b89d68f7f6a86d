"""Share results across machines: real `dvc push`/`dvc pull` between separate clones.

Machine A holds the session's reader project (plain C's mlp, param set X), runs the stages
after evaluate, configures its remotes, commits, and pushes its results to
  - the project's default remote, the local directory `../mnist-dvc-storage` that the
    committed .dvc/config names (here: beside A and the other clones), and
  - an SSH remote served by a real OpenSSH server on 127.0.0.1 (testbed/sshd.py),
    whose port, user and key live only in each clone's git-ignored .dvc/config.local.
Machine B is a fresh `git clone` of A's repo (a bare origin holding X only) with an empty
cache of its own: it pulls, and must end up with byte-identical outputs, a clean
`dvc status` and a `dvc repro` that runs nothing.

Run-cache: A then runs param set Y (never pushed to git; the one training of this file) and
pushes it with `dvc push --run-cache`. A clone on X that sets Y's params gets every output
of Y from the run-cache with `dvc repro --pull`, without running a single stage.
"""

from __future__ import annotations

import json
import shutil
import time
from types import SimpleNamespace

import pytest
import yaml

from testbed.processes import run_env, sh
from testbed.sshd import SSHServer
from tests.paths import ROOT
from tests.projects import copy_project, dvc, out_hashes, ran_training, set_params, stages_run

pytestmark = pytest.mark.slow

SSH_REMOTE = "team-ssh"
X_COMMIT = "param set X, shared through two remotes"
CACHED = "Stage '{}' is cached - skipping run, checking out outputs"


def params_y(repo) -> dict:
    """Y: other epochs (one, the cheapest) and learning rate for the chosen model, and a
    download param that does not change the data: download's dvc.lock entry no longer
    matches, so only the run-cache can spare it a rerun."""
    spec = yaml.safe_load((repo / "params.yaml").read_text())
    model = spec["train"]["model"]
    recipe = spec["train"][model]
    epochs = 1 if recipe["epochs"] != 1 else 2
    return {"train": {model: {"epochs": epochs, "learning_rate": recipe["learning_rate"] * 2}},
            "download": {"timeout": spec["download"]["timeout"] + 30}}


def y_epochs(params: dict) -> int:
    (recipe,) = params["train"].values()
    return recipe["epochs"]


def trained_epochs(repo) -> int:
    """Epochs of the recipe dvc.lock says the model was trained with."""
    trained = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["train"]
    params = trained["params"]["params.yaml"]
    return params[f"train.{params['train.model']}"]["epochs"]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    with SSHServer(tmp_path_factory.mktemp("sshd")) as server:
        yield server


def ssh_login(repo, server: SSHServer) -> None:
    """This machine's credentials for the SSH remote: --local, so never committed."""
    env = server.env(run_env())
    for key, value in (("port", server.port), ("user", server.user),
                       ("keyfile", server.client_key)):
        dvc(repo, "remote", "modify", "--local", SSH_REMOTE, key, str(value), env=env)


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
def team(reader_project, tmp_path_factory, sshd):
    root = tmp_path_factory.mktemp("team")
    a = copy_project(reader_project, root / "A")
    assert stages_run(dvc(a, "repro").stdout) == ["render-errors", "audit-labels"]
    # The project's own .dvc/config: its default remote is ../mnist-dvc-storage.
    shutil.copy(ROOT / ".dvc" / "config", a / ".dvc" / "config")
    dvc(a, "remote", "add", SSH_REMOTE, sshd.url(root / "ssh-storage"))
    ssh_login(a, sshd)
    assert json.loads(dvc(a, "status", "--json").stdout) == {}  # X's results, as trained
    sh(a, "git", "add", "-A")
    sh(a, "git", "commit", "-qm", X_COMMIT)
    origin = root / "origin.git"
    sh(root, "git", "clone", "-q", "--bare", str(a), str(origin))
    env = sshd.env(run_env())
    hashes_x = out_hashes(a)
    assert len(hashes_x) > 50  # every output file: data, model, reports, 30 mosaics, PNGs
    for pushed in (dvc(a, "push"), dvc(a, "push", "-r", SSH_REMOTE, env=env)):
        assert " files pushed" in pushed.stdout
    return SimpleNamespace(root=root, a=a, origin=origin, hashes_x=hashes_x, env=env,
                           epochs_x=trained_epochs(a), params_y=params_y(a),
                           storage=root / "mnist-dvc-storage", ssh_storage=root / "ssh-storage")


@pytest.fixture(scope="module")
def team_y(team):
    """A runs param set Y, commits it locally (origin keeps X) and pushes the run-cache."""
    set_params(team.a, **team.params_y)
    run_y = dvc(team.a, "repro")
    assert "train" in stages_run(run_y.stdout)
    assert trained_epochs(team.a) == y_epochs(team.params_y)
    sh(team.a, "git", "commit", "-qam", "results of param set Y")
    dvc(team.a, "push", "--run-cache", "-r", SSH_REMOTE, env=team.env)
    return SimpleNamespace(hashes_y=out_hashes(team.a))


def assert_same_results_and_nothing_to_do(repo, expected: dict, env=None) -> None:
    assert out_hashes(repo) == expected  # every file of every output, byte for byte
    assert json.loads(dvc(repo, "status", "--json", env=env or run_env()).stdout) == {}
    again = dvc(repo, "repro", env=env or run_env())
    assert stages_run(again.stdout) == [] and not ran_training(again.stdout), again.stdout


def test_default_remote_is_a_sibling_directory_and_credentials_stay_out_of_git(team):
    repo = team.a
    config = (ROOT / ".dvc" / "config").read_text()
    # name, url, "(default)": DVC wraps a row wider than the terminal, words kept whole.
    listed = dvc(repo, "remote", "list").stdout.split()
    assert listed.count("(default)") == 1, listed
    at = listed.index("(default)")
    assert listed[at - 2:at + 1] == ["storage", str(team.storage), "(default)"], listed
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
    dvc(b, "pull", "-r", SSH_REMOTE, env=team.env)
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
    failed = dvc(b, "pull", "-r", SSH_REMOTE, env=team.env, check=False, timeout=300)
    assert failed.returncode != 0
    assert not (b / "data" / "model").exists()


def test_run_cache_gives_another_machine_a_param_set_it_never_ran(team, team_y, sshd):
    b, _ = clone(team, "B-runcache")
    ssh_login(b, sshd)
    dvc(b, "remote", "default", "--local", SSH_REMOTE, env=team.env)
    assert trained_epochs(b) == team.epochs_x
    set_params(b, **team.params_y)  # Y's params; B has no dvc.lock entry for them anywhere
    assert sh(b, "git", "log", "--format=%s").stdout.split("\n")[0] == X_COMMIT

    started = time.monotonic()
    repro = dvc(b, "repro", "--pull", env=team.env)
    seconds = time.monotonic() - started
    out = repro.stdout
    assert stages_run(out) == [] and not ran_training(out), out
    for stage in ("download", "train", "evaluate", "render-errors"):
        assert CACHED.format(stage) in out, out
    # normalize's lock entry still matches Y (same data, same params): pulled, not rerun.
    assert CACHED.format("normalize") in out or "Pulling data for stage: 'normalize'" in out
    assert_same_results_and_nothing_to_do(b, team_y.hashes_y, env=team.env)
    assert trained_epochs(b) == y_epochs(team.params_y)
    print(f"run-cache restore of param set Y over SSH: {seconds:.1f}s, no stage ran")

