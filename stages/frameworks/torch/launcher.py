"""More than one worker: the train stage's command run as `train.torch.workers` data-parallel
processes by torch.distributed's own launcher (torchrun's engine, through its Python API),
so the stage gets each worker's failure as data and reports it in one line.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# PyTorch itself, imported as the framework's env does: one line if it is not installed.
from stages.frameworks.torch.env import torch  # noqa: F401
from stages.runtime.failures import PipelineError

NODES = "MNIST_NODES"            # machines taking part (default 1: this one)
ADDRESS = "MNIST_MASTER_ADDR"    # this machine's address the others reach it at
PORT = "MNIST_MASTER_PORT"       # the port they rendezvous on (default: any free one)
RENDEZVOUS_TIMEOUT = 600         # seconds to wait for every machine to join


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def failure_line(failures: dict, workers: int, log_dir: Path) -> str:
    """One line for the worker whose failure ended the run: one killed by a signal first
    (the others then fail for want of it), then one that failed on its own (with its own
    `error:` line), last one the launcher stopped (SIGTERM) once another had failed; the
    earliest of a kind (the launcher's timestamps are whole seconds)."""
    import signal

    def cause(item):
        rank, failure = item
        kind = (2 if failure.exitcode == -signal.SIGTERM else
                0 if failure.exitcode < 0 else 1)
        return kind, failure.timestamp, rank

    rank, failure = min(failures.items(), key=cause)
    if failure.exitcode < 0:
        return f"worker {rank} of {workers} was killed by {failure.signal_name()}"
    said = ""
    for log in log_dir.rglob(f"{failure.local_rank}/stderr.log"):
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        said = lines[-1].removeprefix("error: ") if lines else ""
    return f"worker {rank} of {workers} exited with {failure.exitcode}" + (
        f": {said}" if said else "")


def launch(cfg: dict, argv: list[str]) -> None:
    """Run this stage's command as `train.torch.workers` data-parallel workers with
    torch.distributed's launcher (torchrun's engine), and wait for them.

    On one machine (the default) they meet on 127.0.0.1 only. With MNIST_NODES=M, this
    machine is node 0 and hosts the rendezvous at MNIST_MASTER_ADDR:MNIST_MASTER_PORT; each
    other machine joins with torchrun (docs/machines.md). Worker 0 (here)
    writes the outputs; a worker that fails ends the run in one line naming it.
    """
    import logging
    import signal
    import tempfile

    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from stages.runtime.failures import Interrupted

    workers, nodes = cfg["workers"], int(os.environ.get(NODES, "1"))
    if nodes < 1 or workers % nodes:
        raise PipelineError(f"{NODES}={nodes}: train.torch.workers ({workers}) must split evenly "
                            "over the machines")
    address = os.environ.get(ADDRESS, "127.0.0.1")
    if nodes == 1 and address == "127.0.0.1":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's own sockets: loopback
    port = int(os.environ.get(PORT, 0)) or free_port()
    # The launcher's log lines ("Received 2 death signal...") are not for the stage's
    # stderr: its one line says what happened. Each of its loggers sets its own level.
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="mnist-workers-") as log_dir:
        config = LaunchConfig(
            min_nodes=nodes, max_nodes=nodes, nproc_per_node=workers // nodes,
            rdzv_backend="static", rdzv_endpoint=f"{address}:{port}",
            rdzv_configs={"rank": 0, "timeout": RENDEZVOUS_TIMEOUT}, max_restarts=0,
            # torchrun's default run id: the other machines' plain torchrun line matches.
            run_id="none", local_addr=address, monitor_interval=0.1,
            signals_to_handle="SIGTERM,SIGINT",
            logs_specs=DefaultLogsSpecs(log_dir=log_dir, redirects=Std.ERR))
        try:
            elastic_launch(config, sys.executable)("-m", "stages.train", *argv)
        except SignalException as err:
            raise Interrupted(err.sigval) from None
        except ChildFailedError as err:
            codes = {f.exitcode for f in err.failures.values()}
            if codes <= {130, 143, -signal.SIGINT, -signal.SIGTERM}:  # Ctrl-C reached them
                raise Interrupted(signal.SIGINT if codes & {130, -signal.SIGINT}
                                  else signal.SIGTERM) from None
            raise PipelineError(failure_line(err.failures, workers, Path(log_dir))) from None
