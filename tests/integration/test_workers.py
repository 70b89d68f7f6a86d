"""`train.torch.workers: 2`: data-parallel PyTorch training in real worker processes on 127.0.0.1.

Real `dvc repro`, real torch.distributed (gloo) workers started by its own launcher, real
signals: the run completes with every output, a forced rerun gives the same bits, the
workers really exchange gradients, and a worker killed mid-training ends the stage with one
line and leaves the previous model.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap

import numpy as np
import psutil
import pytest

from stages.frameworks.torch.fit import share
from testbed.pipeline import paths as dvc_vars
from testbed.processes import free_port, run_env
from tests.paths import ROOT
from tests.projects import dvc, out_hashes, set_params, stages_run
from tests.watch import start, workers_of

pytestmark = pytest.mark.slow

PATHS = dvc_vars()
TWO_WORKERS = {"framework": "torch", "torch": {"workers": 2}, "model": "mlp",
               "mlp": {"epochs": 3, "batch_size": 64, "val_fraction": 0.1}}


def test_two_workers_train_through_dvc_repro_bit_reproducibly(trained_copy):
    repo = trained_copy
    set_params(repo, train=TWO_WORKERS)
    run = dvc(repo, "repro")
    # The mlp's recipe changed: the audit's too (it is off: it trains nothing).
    assert stages_run(run.stdout) == ["train", "evaluate", "render-errors", "audit-labels"], (
        run.stdout)
    assert "train: mlp in torch on 2 workers (torch.distributed)" in run.stdout
    epochs = [line for line in run.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == ["1/3", "2/3", "3/3"]  # rank 0 reports
    info = json.loads((repo / PATHS["model_dir"] / "run_info.json").read_text())
    assert (info["framework"], info["workers"], info["intra_op_threads"]) == ("torch", 2, 1)
    metrics = json.loads((repo / PATHS["metrics"]).read_text())
    assert 0.8 < metrics["accuracy"] <= 1  # 1350 fixture images, 3 epochs of the mlp

    results, lock = out_hashes(repo), (repo / "dvc.lock").read_text()
    # Trained again in new processes: the same bits, so nothing after train reruns.
    again = dvc(repo, "repro", "--force", "--single-item", "train")
    assert stages_run(again.stdout) == ["train"]
    assert out_hashes(repo) == results and (repo / "dvc.lock").read_text() == lock
    assert stages_run(dvc(repo, "repro").stdout) == []


def start_long_training(repo):
    """The train stage on 2 workers, far longer than any test waits, once both train:
    (the stage's process, its workers by rank)."""
    set_params(repo, train=TWO_WORKERS | {"mlp": {"epochs": 10_000, "batch_size": 64}})
    proc, lines = start(repo, sys.executable, "-m", "stages.train", "--data",
                        PATHS["processed"], "--model-dir", PATHS["model_dir"], "--curves",
                        PATHS["curves"])
    lines.wait_for("epoch 2/10000 ", timeout=300)
    workers = workers_of(psutil.Process(proc.pid))
    assert sorted(workers) == [0, 1]
    return proc, workers


def test_a_worker_killed_mid_training_ends_the_stage_in_one_line(trained_copy):
    repo = trained_copy
    model = repo / PATHS["model_dir"]
    before = {p.name: p.read_bytes() for p in model.iterdir()}
    proc, workers = start_long_training(repo)
    workers[1].kill()
    assert proc.wait(timeout=120) == 1
    assert proc.stderr.read() == "error: worker 1 of 2 was killed by SIGKILL\n"
    psutil.wait_procs(list(workers.values()), timeout=30)
    assert not any(w.is_running() for w in workers.values())  # rank 0 did not linger
    assert {p.name: p.read_bytes() for p in model.iterdir()} == before
    assert not list(model.parent.glob(".*.tmp"))

    # The next run of the stage completes.
    set_params(repo, train=TWO_WORKERS)
    assert stages_run(dvc(repo, "repro", "train").stdout) == ["train"]


def test_sigint_to_the_stage_stops_every_worker_with_one_line(trained_copy):
    repo = trained_copy
    proc, workers = start_long_training(repo)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    assert proc.stderr.read() == "error: interrupted; no output was replaced\n"
    psutil.wait_procs(list(workers.values()), timeout=30)
    assert not any(w.is_running() for w in workers.values())


# Each rank trains on its shares of the batches, then reports its weights and what it saw.
RANKS = textwrap.dedent("""
    import dataclasses, json, os, sys
    import numpy as np
    from stages.frameworks.torch import env, fit
    from tests.digits import toy_digits
    from tests.projects import train_cfg

    rank = int(os.environ["RANK"])
    env.configure(7, 1, 1)
    cfg = dataclasses.replace(train_cfg("torch", epochs=2, batch_size=40, val_fraction=0.0),
                              workers=2)
    data = toy_digits(500)[0]
    data["x_val"], data["y_val"] = data["x_val"][:0], data["y_val"][:0]
    seen, share = [], fit.share

    def recorded(idx, r, size):
        part = share(idx, r, size)
        seen.append(part.tolist())
        return part

    fit.share = recorded
    model = fit.fit(cfg, data, sys.argv[1] if rank == 0 else None)
    np.savez(f"{sys.argv[1]}/rank{rank}.npz",
             **{k: v.numpy() for k, v in model.state_dict().items()})
    with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:
        json.dump(seen, f)
""")


def test_the_workers_exchange_gradients_and_each_sees_its_half(tmp_path):
    script = tmp_path / "ranks.py"
    script.write_text(RANKS)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node",
         "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()), str(script),
         str(tmp_path)],
        cwd=ROOT, env=run_env() | {"GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = [np.load(tmp_path / f"rank{r}.npz") for r in (0, 1)]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Each step, the two ranks took disjoint halves of one global batch of 40...
    assert len(seen[0]) == len(seen[1]) == 2 * 10  # 400 training images, 2 epochs
    for mine, theirs in zip(*seen):
        assert len(mine) == len(theirs) == 20 and not set(mine) & set(theirs)
    assert sorted(sum(seen[0][:10] + seen[1][:10], [])) == list(range(400))
    # ...yet they end with the same weights: the gradients were averaged across them.
    for key in weights[0].files:
        assert np.array_equal(weights[0][key], weights[1][key]), key
    assert float(np.abs(weights[0]["fc1.weight"]).sum()) > 0


def test_share_splits_a_batch_into_contiguous_parts_that_cover_it():
    batch = np.arange(11)
    parts = [share(batch, r, 3) for r in range(3)]
    assert [len(p) for p in parts] == [4, 4, 3]
    assert np.array_equal(np.concatenate(parts), batch)
    assert np.array_equal(share(batch, 0, 1), batch)
