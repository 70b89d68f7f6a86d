"""Data-parallel training across two hosts with a real network between them.

Host A and host B are network namespaces joined by a veth pair (testbed/hosts.py),
each with its own address and its own checkout of the same commit and processed data. The
train stage runs on A as node 0 with docs/machines.md's command (`MNIST_NODES=2 ... dvc
repro`); B joins as node 1 with the page's one-line `torchrun`. gloo's traffic crosses the
veth link, not loopback. Shown: the stage completes and only A writes outputs; a forced
rerun with the same world size gives the same bits; B's worker killed mid-training ends
A's stage in one line naming the node and rank, with A's previous model in place; and what
the run listens on: the rendezvous port where B must reach it, and nothing a one-machine run
opens is reachable from the other host.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import psutil
import pytest

from testbed.hosts import Hosts
from testbed.pipeline import paths as dvc_vars
from testbed.processes import run_env, sh
from tests.docs import block, claims, prose
from tests.projects import copy_project, dvc, out_hashes, set_params, stages_run
from tests.watch import Lines, workers_of

pytestmark = pytest.mark.slow

PATHS = dvc_vars()
PAGE = "docs/machines.md"
PORT = 29500  # the page's rendezvous port (each test host has its own ports)
SHOWN_ADDRESS = "10.0.0.1"  # the page's machine 0; the tests' is host A's address
ACROSS = {"framework": "torch", "torch": {"workers": 2, "intra_op_threads": 2}, "model": "mlp",
          "mlp": {"epochs": 3, "batch_size": 64, "val_fraction": 0.1}}
LONG = ACROSS | {"mlp": {"epochs": 10_000, "batch_size": 64, "val_fraction": 0.1}}


def page_commands(a) -> tuple[str, str]:
    """The page's two commands, machine 0's and machine 1's, for these hosts: A's address,
    one worker per host (two hosts share this machine's cores)."""
    text = block(PAGE, "--node-rank 1").text.replace("\\\n", " ")
    text = text.replace(SHOWN_ADDRESS, a.address).replace("--nproc-per-node 2",
                                                          "--nproc-per-node 1")
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    node_0 = next(line for line in lines if "dvc repro" in line)
    node_1 = next(line for line in lines if line.startswith("torchrun"))
    return node_0, node_1


@pytest.fixture(scope="module")
def hosts():
    with Hosts("dp") as pair:
        yield pair


@pytest.fixture(scope="module")
def checkouts(trained_project, hosts, tmp_path_factory):
    """A's and B's checkouts: the same commit (the two-host params) and processed data."""
    root = tmp_path_factory.mktemp("hosts")
    a = copy_project(trained_project.repo, root / "A")
    set_params(a, train=ACROSS)
    sh(a, "git", "commit", "-qam", "train on two hosts")
    b = copy_project(a, root / "B")
    return a, b


def across(hosts, a_repo, b_repo, command_0: str, command_1: str, *, a_env=None,
           b_env=None):
    """Node 0's command on host A and node 1's on host B, both started now: (A's process
    and its stdout lines, B's process)."""
    a, b = hosts
    stage = a.popen(["bash", "-c", command_0], cwd=a_repo, env=a_env or run_env(),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    join = b.popen(["bash", "-c", command_1], cwd=b_repo, env=b_env or run_env(),
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return stage, Lines(stage), join


def finish(stage, lines, join, timeout: float = 600) -> str:
    out = lines.rest()
    assert stage.wait(timeout=timeout) == 0, out + stage.stderr.read()
    assert join.wait(timeout=timeout) == 0, join.stderr.read()[-3000:]
    return out


@claims((PAGE, "--node-rank 1"))
def test_two_hosts_train_one_model_and_a_forced_rerun_gives_the_same_bits(hosts, checkouts):
    a_repo, b_repo = checkouts
    untouched = out_hashes(b_repo)
    command_0, command_1 = page_commands(hosts[0])
    out = finish(*across(hosts, a_repo, b_repo, command_0, command_1))
    assert "train: mlp in torch on 2 workers (torch.distributed)" in out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("epoch ")] == \
        ["1/3", "2/3", "3/3"]
    info = json.loads((a_repo / PATHS["model_dir"] / "run_info.json").read_text())
    assert (info["workers"], info["intra_op_threads"]) == (2, 2)  # one worker per host
    assert out_hashes(b_repo) == untouched  # only A's rank 0 wrote
    results, lock = out_hashes(a_repo), (a_repo / "dvc.lock").read_text()

    # train forced alone: the same bits, so nothing after it reruns.
    forced = command_0.replace("dvc repro", "dvc repro --force --single-item train")
    again = finish(*across(hosts, a_repo, b_repo, forced, command_1))
    assert stages_run(again) == ["train"]
    assert out_hashes(a_repo) == results and (a_repo / "dvc.lock").read_text() == lock
    assert stages_run(dvc(a_repo, "repro").stdout) == []


def pids_under(pid: int) -> set[int]:
    """pid and every process under it."""
    top = psutil.Process(pid)
    return {p.pid for p in [top, *top.children(recursive=True)]}


def test_b_s_worker_killed_mid_training_ends_a_s_stage_in_one_line(hosts, checkouts,
                                                                   tmp_path):
    a, b = hosts
    a_repo = copy_project(checkouts[0], tmp_path / "A")
    b_repo = copy_project(checkouts[1], tmp_path / "B")
    set_params(a_repo, train=LONG)
    set_params(b_repo, train=LONG)
    model = a_repo / PATHS["model_dir"]
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    train = shlex.join([sys.executable, "-m", "stages.train", "--data", PATHS["processed"],
                        "--model-dir", PATHS["model_dir"], "--curves", PATHS["curves"]])
    command_0, command_1 = page_commands(a)
    command_0 = command_0.replace("dvc repro", train)
    stage, lines, join = across(hosts, a_repo, b_repo, command_0, command_1)
    lines.wait_for("epoch 2/10000 ", timeout=300)

    # What the run listens on, on A: the rendezvous store, and gloo's sockets, on A's
    # address on the link alone (not every interface); B reaches the store there.
    ours = pids_under(stage.pid)
    listening = {(addr, port) for addr, port, pid in a.listening() if pid in ours}
    assert (a.address, PORT) in listening, listening
    assert {addr for addr, _ in listening} == {a.address}, listening
    assert b.connects(a.address, PORT)

    remote = workers_of(psutil.Process(join.pid))
    assert sorted(remote) == [1]
    remote[1].kill()
    assert stage.wait(timeout=120) == 1
    err = stage.stderr.read()
    said = (f"error: worker 1 of 2 (node 1, {b.address}) stopped answering mid-training: "
            "gloo lost its connection")
    assert err == said + "\n"
    page = " ".join(prose(PAGE).split())
    assert f"`{said.replace(b.address, '10.0.0.2')}`" in page  # the line the page shows
    assert join.wait(timeout=120) != 0
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert not list(model.parent.glob(".*.tmp"))


def test_b_gone_silent_mid_training_ends_a_s_stage_within_the_timeout_in_one_line(
        hosts, checkouts, tmp_path):
    """B's link cut (its interface down: no packet passes, no socket closes), as a power
    loss or a cut cable look from A: A's stage ends within speed.peer_timeout and a margin,
    in one line naming B, and writes nothing."""
    a, b = hosts
    timeout = 5
    a_repo = copy_project(checkouts[0], tmp_path / "A")
    b_repo = copy_project(checkouts[1], tmp_path / "B")
    for repo in (a_repo, b_repo):
        set_params(repo, train=LONG, speed={"peer_timeout": timeout})
    model = a_repo / PATHS["model_dir"]
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    train = shlex.join([sys.executable, "-m", "stages.train", "--data", PATHS["processed"],
                        "--model-dir", PATHS["model_dir"], "--curves", PATHS["curves"]])
    command_0, command_1 = page_commands(a)
    stage, lines, join = across(hosts, a_repo, b_repo, command_0.replace("dvc repro", train),
                                command_1)
    lines.wait_for("epoch 2/10000 ", timeout=300)
    b.cut()
    try:
        cut_at = time.monotonic()
        assert stage.wait(timeout=timeout + 60) == 1
        ended_after = time.monotonic() - cut_at
        err = stage.stderr.read()
    finally:
        os.killpg(join.pid, signal.SIGKILL)  # B's side, waiting on A in vain
        b.mend()
    assert err == (f"error: worker 1 of 2 (node 1, {b.address}) went silent mid-training: "
                   f"no word for {timeout} s (speed.peer_timeout)\n")
    print(f"\nA's stage ended {ended_after:.1f} s after the cut (peer_timeout {timeout} s)")
    assert timeout <= ended_after < timeout + 30
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert not list(model.parent.glob(".*.tmp"))


def test_a_one_machine_run_opens_nothing_the_other_host_reaches(hosts, checkouts, tmp_path):
    a, b = hosts
    a_repo = copy_project(checkouts[0], tmp_path / "A")
    set_params(a_repo, train=LONG)
    train = [sys.executable, "-m", "stages.train", "--data", PATHS["processed"],
             "--model-dir", PATHS["model_dir"], "--curves", PATHS["curves"]]
    stage = a.popen(train, cwd=a_repo, env=run_env(), stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True)
    lines = Lines(stage)
    lines.wait_for("epoch 2/10000 ", timeout=300)
    ours = pids_under(stage.pid)
    sockets = [(addr, port) for addr, port, pid in a.listening() if pid in ours]
    assert sockets, "the run listens on nothing?"
    reachable = [(addr, port) for addr, port in sockets if b.connects(a.address, port)]
    stage.send_signal(signal.SIGINT)
    assert stage.wait(timeout=120) == 130
    assert not reachable, f"B reaches a one-machine run's ports: {reachable}"
    assert {addr for addr, _ in sockets} == {"127.0.0.1"}, sockets
