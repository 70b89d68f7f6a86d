"""stages/frameworks/torch/fit.py: the seeded augmentation and fitting, in PyTorch."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch  # make test installs PyTorch (make torch)

from tests.digits import fixture_data, toy_digits
from tests.projects import train_cfg


def test_augment_is_seeded_stays_in_range_and_is_off_at_zero():
    from stages.frameworks.torch.resample import augment

    x = torch.from_numpy((fixture_data()["x_train"][:6] / 255).astype(np.float32))

    def draw(seed):
        return augment(x, torch.Generator().manual_seed(seed), 10.0, 0.1, 0.1).numpy()

    assert augment(x, torch.Generator().manual_seed(1), 0.0, 0.0, 0.0) is x
    a, b, c = draw(1), draw(1), draw(2)
    assert a.shape == tuple(x.shape) and np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.min() >= 0.0 and a.max() <= 1.0 + 1e-6
    assert all(not np.array_equal(a[i], x.numpy()[i]) for i in range(len(a)))


def test_evaluate_is_the_mean_cross_entropy_and_accuracy():
    from stages.frameworks.torch.fit import evaluate
    from stages.frameworks.torch.model import build

    model = build("mlp")
    x = torch.rand(30, 28, 28)
    y = torch.randint(0, 10, (30,))
    result = evaluate(model, x, y, batch_size=7)
    with torch.no_grad():
        logits = model.eval()(x)
    assert result["loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    assert result["accuracy"] == (logits.argmax(1) == y).sum().item() / 30


def test_configure_asks_for_deterministic_kernels_on_the_cpu_and_on_a_gpu(monkeypatch):
    import os

    from stages.frameworks.torch.env import configure

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    configure(0, 1, 1)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # cuBLAS' deterministic mode


def test_cuda_without_a_gpu_is_one_line_naming_the_build():
    from stages.frameworks.torch.env import device
    from stages.runtime.failures import PipelineError

    assert device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():  # tests/integration/test_gpu.py trains there
        assert device("cuda").type == "cuda"
        return
    with pytest.raises(PipelineError) as info:
        device("cuda")
    # A CPU-only build names the command that installs the CUDA one; a CUDA build, the driver.
    build, fix = ((f"built for CUDA {torch.version.cuda}", "check the GPU's driver (nvidia-smi)")
                  if torch.version.cuda else
                  ("a CPU-only build", "`make gpu` installs PyTorch's CUDA build (Linux x86_64)"))
    assert str(info.value) == (
        f"train.torch.device cuda: no CUDA GPU is visible to PyTorch (torch {torch.__version__}, "
        f"{build}): {fix}, or use train.torch.device: cpu")


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_fit_learns_and_is_reproducible_in_process(tmp_path, monkeypatch, schedule):
    """A few steps on separable toy data: loss falls, the same seed gives the same bits."""
    monkeypatch.chdir(tmp_path)
    from stages.frameworks.torch.env import configure
    from stages.frameworks.torch.fit import fit
    from stages.frameworks.torch.model import predict

    configure(0, 1, 1)
    data, x_val, y_val = toy_digits()
    cfg = train_cfg("torch", epochs=8, learning_rate=0.01, batch_size=8, val_fraction=0.2,
                    restore_best=True, lr_schedule=schedule, rotation=5.0,
                    label_smoothing=0.1)
    first = fit(cfg, dict(data), tmp_path / "curves")
    assert (predict(first, x_val, 100).argmax(1) == y_val).mean() > 0.9
    second = fit(cfg, dict(data), tmp_path / "curves2")
    one, two = first.state_dict(), second.state_dict()
    assert all(torch.equal(one[k], two[k]) for k in one)
    lines = (tmp_path / "curves/plots/metrics/train/loss.tsv").read_text().splitlines()
    losses = [float(line.split("\t")[1]) for line in lines[1:]]
    assert len(losses) == 8 and losses[-1] < losses[0]
    val = (tmp_path / "curves/plots/metrics/eval/accuracy.tsv").read_text().splitlines()
    assert len(val) == 1 + 8
    other = fit(dataclasses.replace(cfg, seed=cfg.seed + 1), dict(data), tmp_path / "curves3")
    assert not torch.equal(other.state_dict()["fc1.weight"], one["fc1.weight"])


def test_the_failure_named_is_the_cause_not_the_workers_the_launcher_stopped(tmp_path):
    import signal
    from types import SimpleNamespace

    from stages.frameworks.torch.launcher import failure_line

    def failure(exitcode, timestamp, local_rank):
        name = signal.Signals(-exitcode).name if exitcode < 0 else "<N/A>"
        return SimpleNamespace(exitcode=exitcode, timestamp=timestamp, local_rank=local_rank,
                               signal_name=lambda: name)

    # Rank 1 killed; the launcher then stopped rank 0 with SIGTERM in the same second.
    killed = {0: failure(-signal.SIGTERM, 5, 0), 1: failure(-signal.SIGKILL, 5, 1)}
    assert failure_line(killed, 2, tmp_path) == "worker 1 of 2 was killed by SIGKILL"
    # Rank 1 failed on its own: its last stderr line is quoted.
    log = tmp_path / "none/attempt_0/1/stderr.log"
    log.parent.mkdir(parents=True)
    log.write_text("warming up\nerror: data/processed/mnist.npz: not found\n")
    failed = {0: failure(-signal.SIGTERM, 3, 0), 1: failure(1, 4, 1)}
    assert failure_line(failed, 2, tmp_path) == (
        "worker 1 of 2 exited with 1: data/processed/mnist.npz: not found")


@pytest.mark.slow
def test_with_ema_the_average_is_validated_and_returned(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    from stages.frameworks.torch.env import configure
    from stages.frameworks.torch.fit import fit
    from stages.frameworks.torch.model import predict

    configure(0, 1, 1)
    data, x_val, y_val = toy_digits()
    cfg = train_cfg("torch", epochs=3, learning_rate=0.01, batch_size=8, val_fraction=0.2,
                    ema=0.9)
    averaged = fit(cfg, dict(data), tmp_path / "ema")
    again = fit(cfg, dict(data), tmp_path / "ema2")
    trained = fit(dataclasses.replace(cfg, ema=0.0), dict(data), tmp_path / "plain")
    accuracy = (predict(averaged, x_val, 100).argmax(1) == y_val).mean()
    lines = (tmp_path / "ema/plots/metrics/eval/accuracy.tsv").read_text().splitlines()
    assert accuracy == pytest.approx(float(lines[-1].split("\t")[1]))
    one, two = averaged.state_dict(), again.state_dict()
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert not torch.equal(one["fc1.weight"], trained.state_dict()["fc1.weight"])


def test_a_lost_worker_is_named_by_rank_node_and_address():
    from stages.frameworks.torch.launcher import lost_worker

    gloo = ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
            "[10.0.0.2]:40123")
    one_each = [(0, "10.0.0.1"), (1, "10.0.0.2")]
    assert lost_worker(gloo, one_each, 0) == (
        "worker 1 of 2 (node 1, 10.0.0.2) stopped answering mid-training: gloo lost its "
        "connection")
    two_each = [(0, "10.0.0.1"), (0, "10.0.0.1"), (1, "10.0.0.2"), (1, "10.0.0.2")]
    assert lost_worker(gloo, two_each, 1).startswith("workers 2, 3 of 4 (node 1, 10.0.0.2)")
    # gloo naming the worker itself, or no address at all: not a lost worker.
    assert lost_worker(gloo, one_each, 1) is None
    assert lost_worker("Connection reset by peer", one_each, 0) is None


def test_a_silent_machine_is_named_when_a_collective_times_out():
    from stages.frameworks.torch.launcher import silent_worker

    gloo = ("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting "
            "5000ms for recv operation to complete")
    one_each = [(0, "10.0.0.1"), (1, "10.0.0.2")]
    assert silent_worker(gloo, one_each, 0, 5.0) == (
        "worker 1 of 2 (node 1, 10.0.0.2) went silent mid-training: no word for 5 s "
        "(speed.peer_timeout)")
    two_each = [(0, "10.0.0.1"), (0, "10.0.0.1"), (1, "10.0.0.2"), (1, "10.0.0.2")]
    assert silent_worker(gloo, two_each, 2, 180.0).startswith(
        "workers 0, 1 of 4 (node 0, 10.0.0.1) went silent")
    # Another error, or every worker on this machine: not a silent machine.
    assert silent_worker("Connection reset by peer", one_each, 0, 5.0) is None
    assert silent_worker(gloo, [(0, "127.0.0.1"), (0, "127.0.0.1")], 0, 5.0) is None


def test_gloo_goes_out_by_the_interface_towards_the_rendezvous():
    from stages.frameworks.torch.launcher import address_towards, interface_towards

    assert interface_towards("127.0.0.1") == "lo"
    assert address_towards("127.0.0.1") == "127.0.0.1"


def test_several_machines_need_the_rendezvous_address_and_port(monkeypatch):
    from stages.frameworks.torch.launcher import launch
    from stages.runtime.failures import PipelineError

    monkeypatch.setenv("MNIST_NODES", "2")
    monkeypatch.delenv("MNIST_MASTER_ADDR", raising=False)
    monkeypatch.setenv("MNIST_MASTER_PORT", "29500")
    with pytest.raises(PipelineError, match="set MNIST_MASTER_ADDR and MNIST_MASTER_PORT"):
        launch(dataclasses.replace(train_cfg("torch"), workers=2), [])
