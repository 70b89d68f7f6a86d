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
from stages.runtime.params import TrainConfig

NODES = "MNIST_NODES"            # machines taking part (default 1: this one)
ADDRESS = "MNIST_MASTER_ADDR"    # this machine's address the others reach it at
PORT = "MNIST_MASTER_PORT"       # the port they rendezvous on (default: any free one)
RENDEZVOUS_TIMEOUT = 600         # seconds to wait for every machine to join


BOUND = "mnist-bound"  # the rendezvous backend: torchrun's static one, on one address only


def bound_rendezvous(params):
    """torchrun's static rendezvous, hosted here (node 0), with its store listening on the
    rendezvous address alone: 127.0.0.1 for a run on one machine, MNIST_MASTER_ADDR for
    several. TCPStore binds every interface of the machine and takes no bind address;
    given a socket already bound (`master_listen_fd`), it listens on that one. The
    handler's store is set before its first use (StaticTCPRendezvous makes one only when
    it has none): a private attribute of torch's, run by tests/integration/test_two_hosts.py.
    """
    import datetime
    import socket

    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous.static_tcp_rendezvous import StaticTCPRendezvous

    class Bound(StaticTCPRendezvous):
        def get_backend(self) -> str:
            return BOUND

    address, port = params.endpoint.rsplit(":", 1)
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((address, int(port)))  # port 0: any free one, bound now (no race)
    except OSError as err:
        listener.close()
        raise PipelineError(f"cannot host the rendezvous at {address}:{port}: "
                            f"{err.strerror}") from None
    listener.listen()
    port = listener.getsockname()[1]
    handler = Bound(address, port, 0, params.max_nodes, params.run_id, RENDEZVOUS_TIMEOUT)
    handler._store = TCPStore(address, port, params.max_nodes, True,
                              datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT), multi_tenant=True,
                              master_listen_fd=listener.detach())  # the store owns it now
    return handler


def address_towards(address: str) -> str:
    """This machine's own address on the way to `address`: the source address the kernel
    picks for it (a UDP connect sends nothing)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        try:
            udp.connect((address, 9))
        except OSError as err:
            raise PipelineError(f"no route from this machine to {address}: {err}") from None
        return udp.getsockname()[0]


def interface_towards(address: str) -> str:
    """The name of this machine's network interface that traffic to `address` leaves by.
    gloo must be told (GLOO_SOCKET_IFNAME): left alone, it takes the address this
    machine's hostname resolves to, often 127.0.x.1, which other machines cannot reach."""
    import fcntl
    import socket
    import struct

    local = address_towards(address)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                reply = fcntl.ioctl(udp.fileno(), 0x8915, request)  # SIOCGIFADDR
            except OSError:
                continue  # no IPv4 address on this one
            if socket.inet_ntoa(reply[20:24]) == local:
                return name
    raise PipelineError(f"no network interface holds {local}, this machine's address "
                        f"towards {address}")


def where_workers(rank: int, size: int) -> list[tuple[int, str]]:
    """Every worker's (node, address) by rank, this one's included, exchanged through the
    rendezvous store (MASTER_ADDR:MASTER_PORT, which every worker reaches). Not a gloo
    collective: the Python tensors of one outlive it in gloo's own thread, and the process
    group's destructor, which waits for that thread while holding the GIL, then deadlocks
    when the thread asks for the GIL to free them (pytorch/pytorch#56297)."""
    import datetime

    from torch.distributed import TCPStore

    store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                     is_master=False, timeout=datetime.timedelta(seconds=RENDEZVOUS_TIMEOUT))
    node = int(os.environ.get("GROUP_RANK", 0))
    store.set(f"mnist/where/{rank}", f"{node} {address_towards(os.environ['MASTER_ADDR'])}")
    keys = [f"mnist/where/{r}" for r in range(size)]
    store.wait(keys)
    where = []
    for key in keys:
        node, address = store.get(key).decode().split()
        where.append((int(node), address))
    return where


def lost_worker(error: str, where: list[tuple[int, str]], me: int) -> str | None:
    """What worker `me` says when gloo lost its connection to another worker: which one,
    on which node and address. `where[rank]` is each worker's (node, address), gathered
    when the workers met; gloo's message names the peer as [address]:port. None when it
    names no other worker's address."""
    import re

    for address in re.findall(r"\[([0-9.]+)\]:\d+", error):
        ranks = [rank for rank, (_, at) in enumerate(where) if at == address and rank != me]
        if ranks:
            return (f"{workers_named(ranks, where)} stopped answering mid-training: gloo "
                    "lost its connection")
    return None


def workers_named(ranks: list[int], where: list[tuple[int, str]]) -> str:
    """`worker 1 of 2 (node 1, 10.0.0.2)`: the ranks, of how many, and their machines."""
    who = f"worker {ranks[0]}" if len(ranks) == 1 else "workers " + ", ".join(map(str, ranks))
    on = ", ".join(f"node {node}, {address}" for node, address in sorted({where[r] for r in ranks}))
    return f"{who} of {len(where)} ({on})"


def silent_worker(error: str, where: list[tuple[int, str]], me: int,
                  timeout: float) -> str | None:
    """What worker `me` says when a gloo collective timed out (speed.peer_timeout) waiting
    for the workers of another machine: that machine, gone silent without closing its
    sockets (a cut link, a power loss). gloo's message names no peer, so every worker on
    another machine is named. None for any other error, or when all are on this one."""
    if "timed out" not in error.lower():
        return None
    mine = where[me][0]
    ranks = [rank for rank, (node, _) in enumerate(where) if node != mine]
    if not ranks:
        return None
    return (f"{workers_named(ranks, where)} went silent mid-training: no word for "
            f"{timeout:g} s (speed.peer_timeout)")


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
    if said.startswith("worker"):  # its account of another machine's worker (lost_worker)
        return said
    return f"worker {rank} of {workers} exited with {failure.exitcode}" + (
        f": {said}" if said else "")


def launch(cfg: TrainConfig, argv: list[str]) -> None:
    """Run this stage's command as `train.torch.workers` data-parallel workers with
    torch.distributed's launcher (torchrun's engine), and wait for them.

    On one machine (the default) they meet on 127.0.0.1 only, and nothing they or the
    rendezvous open listens beyond it (bound_rendezvous). With MNIST_NODES=M, this
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
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from stages.runtime.failures import Interrupted

    workers, nodes = cfg.workers, int(os.environ.get(NODES, "1"))
    if nodes < 1 or workers % nodes:
        raise PipelineError(f"{NODES}={nodes}: train.torch.workers ({workers}) must split evenly "
                            "over the machines")
    if nodes > 1 and not (os.environ.get(ADDRESS) and os.environ.get(PORT)):
        raise PipelineError(f"{NODES}={nodes}: set {ADDRESS} and {PORT}, the address and port "
                            "at which the other machines join this one (docs/machines.md)")
    address = os.environ.get(ADDRESS, "127.0.0.1")
    port = int(os.environ.get(PORT, 0))
    rendezvous_handler_registry.register(BOUND, bound_rendezvous)
    # The launcher's log lines ("Received 2 death signal...") are not for the stage's
    # stderr: its one line says what happened. Each of its loggers sets its own level.
    for name in list(logging.Logger.manager.loggerDict):
        if name.startswith("torch.distributed"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="mnist-workers-") as log_dir:
        config = LaunchConfig(
            min_nodes=nodes, max_nodes=nodes, nproc_per_node=workers // nodes,
            rdzv_backend=BOUND, rdzv_endpoint=f"{address}:{port}",
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
