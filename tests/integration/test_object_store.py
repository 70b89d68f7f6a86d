"""A team's S3 remote on a real object store, between two hosts with a network between them.

Host A and host B are network namespaces joined by a veth pair (testbed/hosts.py).
SeaweedFS runs on A, bound to A's address, started by `make object-store`
(testbed/objectstore.py). A's clone of the project sets the remote up with
docs/sharing.md's commands, trains, and pushes; B, a fresh clone with its own empty cache,
pulls through A's address and gets byte-identical outputs, a clean `dvc status` and a
`dvc repro` that runs nothing; it reads A's older revision with `mnist-predict --rev` and
`mnist-errors-diff`, pulls an experiment A pushed, restores params it never ran from the
run-cache, and fetches the registered model with `dvc artifacts get`. Git goes through a
bare repository on the shared disk (the team's git host); DVC's data only through the
store, over the link.

The faults: the store killed in the middle of B's push (B's link shaped slow so that the
push is still going), then the retry completes and another clone pulls the same bytes;
wrong and unknown credentials; a missing bucket; a key that may only read. Each ends in the
`ERROR:` lines docs/sharing.md's table shows and leaves the workspace, cache and store
consistent: `dvc status --cloud` says what is missing, a pull verifies.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from testbed.hosts import Host, Hosts, clone_on
from testbed.objectstore import ObjectStore
from testbed.pipeline import paths as dvc_vars
from testbed.processes import run_env, sh
from tests.docs import block, claims, prose, run_sh
from tests.paths import ROOT
from tests.projects import copy_project, out_hashes, set_params
from tests.watch import Lines

pytestmark = pytest.mark.slow

PATHS = dvc_vars()
PAGE = "docs/sharing.md"
SHOWN_ENDPOINT = "http://127.0.0.1:8333"  # the page's store; the tests' is on host A
GIT_HOST = "https://git.example.com/mnist.git"
GTO = Path(sys.executable).parent / "gto"
MNIST_PREDICT = Path(sys.executable).parent / "mnist-predict"
MNIST_ERRORS_DIFF = Path(sys.executable).parent / "mnist-errors-diff"


def on(host: Host, repo: Path, *args, env: dict, check: bool = True,
       timeout: float = 900) -> subprocess.CompletedProcess:
    """A command of the project's venv (dvc, mnist-predict...) run in repo on host."""
    args = [sys.executable, "-m", "dvc", *args[1:]] if args[0] == "dvc" else list(args)
    proc = host.run(args, cwd=repo, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{host}: {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"{proc.stdout[-3000:]}\n{proc.stderr[-4000:]}")
    return proc


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("ERROR:")]


def stored_bytes(store: ObjectStore) -> int:
    return sum(p.stat().st_size for p in store.data.rglob("*") if p.is_file())


def out_hashes_of(repo: Path, path: str) -> str:
    import hashlib

    return hashlib.sha256((repo / path).read_bytes()).hexdigest()


def cloud_status(host: Host, repo: Path, env: dict) -> dict:
    return json.loads(on(host, repo, "dvc", "status", "--cloud", "--json", env=env).stdout)


@pytest.fixture(scope="module")
def hosts():
    with Hosts("s3") as pair:
        yield pair


@pytest.fixture(scope="module")
def store(hosts, tmp_path_factory):
    a, _ = hosts
    with ObjectStore(tmp_path_factory.mktemp("store"), a) as running:
        yield running


@pytest.fixture(scope="module")
def team(reader_project, hosts, store, tmp_path_factory):
    """Host A's clone: the page's remote setup, two commits of results pushed (the reader
    params, then another seed), and origin, the team's bare git repository."""
    a, b = hosts
    root = tmp_path_factory.mktemp("team")
    repo = copy_project(reader_project, root / "A")
    env = store.env(run_env())
    on(a, repo, "dvc", "repro", env=env)  # render-errors and the (off) audit: the rest
    sh(repo, "git", "commit", "-qam", "every stage of the reader params")
    setup = {SHOWN_ENDPOINT: store.endpoint}
    run_sh(block(PAGE, "dvc remote add -d team s3://"), repo, replace=setup, host=a, extra=env)
    run_sh(block(PAGE, 'access_key_id "$AWS_ACCESS_KEY_ID"'), repo, host=a, extra=env)
    pushed = on(a, repo, "dvc", "push", env=env)
    assert " files pushed" in pushed.stdout, pushed.stdout
    set_params(repo, train={"seed": 7})
    on(a, repo, "dvc", "repro", env=env)
    sh(repo, "git", "commit", "-qam", "seed 7")
    on(a, repo, "dvc", "push", env=env)
    origin = root / "origin.git"
    sh(root, "git", "clone", "-q", "--bare", str(repo), str(origin))
    sh(repo, "git", "remote", "add", "origin", str(origin))
    return SimpleNamespace(root=root, a=a, b=b, repo=repo, origin=origin, env=env,
                           second=out_hashes(repo))


def clone_b(team, name: str, login: bool = True) -> Path:
    """A clone on host B: git from origin, an empty cache, the page's --local credentials."""
    repo = clone_on(team.b, team.origin, team.root / name, run_env())
    assert not (repo / PATHS["model_dir"]).exists()  # git brought no data
    if login:
        run_sh(block(PAGE, 'access_key_id "$AWS_ACCESS_KEY_ID"'), repo, host=team.b,
               extra=team.env)
    return repo


def test_the_remote_is_committed_and_the_credentials_are_not(team, store):
    committed = sh(team.repo, "git", "show", "HEAD:.dvc/config").stdout
    assert "url = s3://mnist/project" in committed and store.endpoint in committed
    assert store.key not in committed and store.secret not in committed
    local = (team.repo / ".dvc" / "config.local").read_text()
    assert store.key in local and store.secret in local
    sh(team.repo, "git", "check-ignore", "-q", ".dvc/config.local")
    assert sh(team.repo, "git", "status", "--porcelain").stdout == ""
    assert stored_bytes(store) > 0  # in the store's own files on host A


@pytest.fixture(scope="module")
def experiment(team):
    """A runs an experiment (seed 3, in its workspace) and pushes it with the page's
    commands: outputs, run-cache, and the experiment itself. Its output hashes."""
    on(team.a, team.repo, "dvc", "exp", "run", "-n", "seed-3", "-S", "train.seed=3",
       env=team.env)
    run_sh(block(PAGE, "# every output of the workspace\ndvc push --run-cache"), team.repo,
           host=team.a, extra=team.env)
    return out_hashes(team.repo)


@claims((PAGE, "dvc remote add -d team s3://"), (PAGE, 'access_key_id "$AWS_ACCESS_KEY_ID"'),
        (PAGE, "# every output of the workspace\ndvc push --run-cache"),
        (PAGE, "dvc exp pull origin seed-3"))
def test_host_b_pulls_through_a_s_address(team, store, experiment):
    b = clone_b(team, "B")
    pulled = on(team.b, b, "dvc", "pull", env=team.env)
    assert "files" in pulled.stdout
    assert out_hashes(b) == team.second  # every file of every output, byte for byte
    assert json.loads(on(team.b, b, "dvc", "status", "--json", env=team.env).stdout) == {}
    again = on(team.b, b, "dvc", "repro", env=team.env)
    assert "Running stage" not in again.stdout, again.stdout
    assert any((team.root / "B-cache").rglob("*"))  # B's own cache, filled over the link

    # The experiment A pushed, through git and the store: the page's command.
    run_sh(block(PAGE, "dvc exp pull origin seed-3"), b, host=team.b, extra=team.env)
    assert out_hashes(b) == experiment
    assert yaml.safe_load((b / "params.yaml").read_text())["train"]["seed"] == 3


def test_params_b_never_ran_come_from_the_run_cache(team, experiment):
    """Seed 3's params set by hand on a clone of HEAD: `dvc repro --pull` finds them in the
    run-cache A pushed, and runs nothing."""
    b = clone_b(team, "B-runcache")
    set_params(b, train={"seed": 3})
    repro = on(team.b, b, "dvc", "repro", "--pull", env=team.env)
    assert "Running stage" not in repro.stdout, repro.stdout
    assert "Stage 'train' is cached - skipping run, checking out outputs" in repro.stdout
    assert out_hashes(b) == experiment


def test_host_b_reads_a_s_older_revision_through_the_store(team):
    a, b = team.repo, clone_b(team, "B-revisions")
    on(team.b, b, "dvc", "pull", env=team.env)  # HEAD's outputs only: HEAD~1 is in the store
    image = ROOT / "examples" / "four.gif"
    read = {}
    for rev in ("HEAD~1", "HEAD"):
        here = on(team.a, a, MNIST_PREDICT, "--json", "--rev", rev, image, env=team.env)
        there = on(team.b, b, MNIST_PREDICT, "--json", "--rev", rev, image, env=team.env)
        read[rev] = json.loads(there.stdout)
        assert read[rev] == json.loads(here.stdout), rev
    assert read["HEAD~1"] != read["HEAD"]  # two models, two answers
    diff_a = on(team.a, a, MNIST_ERRORS_DIFF, "--json", "HEAD~1", "HEAD", env=team.env)
    diff_b = on(team.b, b, MNIST_ERRORS_DIFF, "--json", "HEAD~1", "HEAD", env=team.env)
    assert json.loads(diff_b.stdout) == json.loads(diff_a.stdout)
    assert json.loads(diff_b.stdout)["fixed"] or json.loads(diff_b.stdout)["broken"]


@claims((PAGE, "-o model  # the key pair: exported"))
def test_the_registered_model_through_the_store(team, tmp_path):
    a = team.repo
    sh(a, str(GTO), "register", "mnist-classifier", "--version", "v1.0.0")
    sh(a, "git", "push", "-q", "origin", "HEAD:main", "mnist-classifier@v1.0.0")
    elsewhere = tmp_path / "elsewhere"  # on host B, outside any project
    elsewhere.mkdir()
    run_sh(block(PAGE, "-o model  # the key pair: exported"), elsewhere,
           replace={GIT_HOST: str(team.origin)}, host=team.b, extra=team.env)
    got = {p.name: out_hashes_of(elsewhere / "model", p.name)
           for p in (elsewhere / "model").iterdir()}
    model = PATHS["model_dir"] + "/"  # HEAD's model, as A trained and pushed it
    assert got == {path.removeprefix(model): digest for path, digest in team.second.items()
                   if path.startswith(model)}


# --- faults --------------------------------------------------------------------------------


def table_lines(what: str, command: str) -> list[str]:
    """The lines docs/sharing.md's failure table shows for one failure and command."""
    for line in prose(PAGE).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] == what and cells[1] == f"`{command}`":
            return re.findall(r"`([^`]+)`", cells[2])
    raise AssertionError(f"{PAGE}: no row {what!r}, `{command}` in the failure table")


def pattern(shown: str) -> re.Pattern:
    text = ".*".join(re.escape(piece) for piece in shown.split("..."))
    return re.compile(re.sub(r"(?<![A-Za-z])N(?![A-Za-z])", r"\\d+", text))


def as_the_page_says(what: str, proc: subprocess.CompletedProcess) -> None:
    """The command failed with the ERROR lines the page's table shows for it: its last one
    last, and every ERROR line one the table shows (per-file lines any number of times)."""
    command = " ".join(str(a) for a in proc.args[proc.args.index("dvc"):])
    command = command.replace(" --json", "").replace(" -r small", "")
    shown = [pattern(line) for line in table_lines(what, command)]
    errors = error_lines(proc)
    assert proc.returncode != 0 and errors, (what, proc.stdout[-2000:], proc.stderr[-2000:])
    assert shown[-1].fullmatch(errors[-1]), (what, errors[-1])
    for line in errors:
        assert any(p.fullmatch(line) for p in shown), (what, line, proc.stderr[-3000:])


@pytest.fixture(scope="module")
def unpushed(team):
    """A clone on B that trained a seed of its own: outputs the store does not have yet.
    The tests below fail to push them, one way each; the last one pushes them."""
    b = clone_b(team, "B-new", login=False)  # keys from the environment: each test's own
    on(team.b, b, "dvc", "pull", env=team.env)
    set_params(b, train={"seed": 21})
    on(team.b, b, "dvc", "repro", env=team.env)
    sh(b, "git", "commit", "-qam", "seed 21")
    missing = cloud_status(team.b, b, team.env)
    assert missing, "the store already has these outputs"
    return SimpleNamespace(repo=b, missing=missing, hashes=out_hashes(b))


@pytest.mark.parametrize("case", ["wrong secret", "unknown key"])
def test_bad_credentials_fail_and_write_nothing(team, store, case):
    b = clone_b(team, f"B-{case.replace(' ', '-')}", login=False)
    key, secret = (store.key, "not-the-secret") if case == "wrong secret" else \
        ("nobody", store.secret)
    env = store.env(run_env(), key, secret)
    as_the_page_says(case, on(team.b, b, "dvc", "pull", env=env, check=False))
    as_the_page_says(case, on(team.b, b, "dvc", "status", "--cloud", env=env, check=False))
    assert not (b / PATHS["model_dir"]).exists()
    cache = team.root / f"B-{case.replace(' ', '-')}-cache"
    assert not cache.exists() or not any(p.is_file() for p in cache.rglob("*"))


def test_a_missing_bucket_fails_and_writes_nothing(team):
    b = clone_b(team, "B-nobucket")
    on(team.b, b, "dvc", "remote", "modify", "team", "url", "s3://no-such-bucket/project",
       env=team.env)
    as_the_page_says("no such bucket", on(team.b, b, "dvc", "pull", env=team.env, check=False))
    assert not (b / PATHS["model_dir"]).exists()


def test_a_read_only_key_pulls_but_cannot_push(team, store, unpushed):
    env = store.env(run_env(), *store.reader)
    push = on(team.b, unpushed.repo, "dvc", "push", env=env, check=False)
    as_the_page_says("a key that may only read", push)
    assert cloud_status(team.b, unpushed.repo, env) == unpushed.missing  # it lists, too
    reader = clone_b(team, "B-reader", login=False)
    on(team.b, reader, "dvc", "pull", env=env)
    assert out_hashes(reader) == team.second


def checksums_only_when_required() -> dict:
    """The page's two variables for stores that reject botocore's checksums."""
    text = block(PAGE, "AWS_REQUEST_CHECKSUM_CALCULATION").text
    return dict(line.removeprefix("export ").split("=") for line in text.splitlines()
                if line.startswith("export "))


@claims((PAGE, "AWS_REQUEST_CHECKSUM_CALCULATION"))
def test_the_checksum_setting_reaches_dvc_s3_client(team):
    """treeverse/dvc#10695: with the page's variables botocore sends checksums only when
    an operation requires them; DVC's S3 client is built with that setting."""
    read = ("from dvc.repo import Repo\n"
            "fs = Repo('.').cloud.get_remote('team').fs.fs\n"
            "config = fs.s3.meta.config\n"
            "print(config.request_checksum_calculation, config.response_checksum_validation)")
    for extra, expected in ((team.env, "when_supported when_supported"),
                            (team.env | checksums_only_when_required(),
                             "when_required when_required")):
        got = on(team.a, team.repo, sys.executable, "-c", read, env=extra).stdout.split()
        assert " ".join(got) == expected


def test_the_store_stopped_mid_push_then_a_retry_completes(team, store, unpushed):
    b = unpushed.repo
    assert cloud_status(team.b, b, team.env) == unpushed.missing  # nothing went there yet
    team.b.shape("256kbit")  # the push takes many seconds: the store dies during it
    try:
        push = team.b.popen([sys.executable, "-m", "dvc", "push"], cwd=b, env=team.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        errors = Lines(push, stream="stderr")
        time.sleep(3)
        assert push.poll() is None, "the push ended before the store was stopped"
        store.kill()
        errors.wait_for("ERROR: failed to transfer", timeout=120)
    finally:
        team.b.unshape()
        store.start()  # back while the push still runs: the files after it go through
    assert push.wait(timeout=300) != 0
    failed = subprocess.CompletedProcess(push.args, push.returncode, push.stdout.read(),
                                         errors.rest())
    as_the_page_says("the store stopped mid-push", failed)
    # Honest status: what did not arrive is still missing; the workspace is whole.
    still = cloud_status(team.b, b, team.env)
    assert still and set(still) <= set(unpushed.missing)
    assert out_hashes(b) == unpushed.hashes
    # The retry, with checksums sent only when required: the store takes that too.
    env = team.env | checksums_only_when_required()
    assert " pushed" in on(team.b, b, "dvc", "push", env=env).stdout
    assert cloud_status(team.b, b, env) == {}
    sh(b, "git", "push", "-q", str(team.origin), "HEAD:seed-21")
    other = clone_on(team.a, team.origin, team.root / "A-seed-21", run_env())
    sh(other, "git", "checkout", "-q", "seed-21")
    run_sh(block(PAGE, 'access_key_id "$AWS_ACCESS_KEY_ID"'), other, host=team.a,
           extra=team.env)
    on(team.a, other, "dvc", "pull", env=team.env)  # every file hash-checked on the way in
    assert out_hashes(other) == unpushed.hashes
