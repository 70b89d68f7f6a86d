"""Two test hosts with a real network between them: Linux network namespaces and a veth pair.

    with Hosts(tmp_path) as (a, b):
        a.address                   # "10.214.7.1", b.address "10.214.7.2": a /24 of its own
        a.run(["dvc", "push"], cwd=repo)   # subprocess.run inside host A
        a.popen([...])              # a process on host A (its own session: kill the group)
        b.shape(rate="8mbit")       # B's outgoing traffic shaped (tc tbf) to slow a transfer
        b.cut()                     # B's link down: it goes silent, its sockets stay open

Each host is a network namespace with its own loopback and one end of the veth pair; the
pair is the only link, and there is no route out of it: traffic from a host can reach only
itself and the other test host, never this machine's own interfaces or anything beyond.
Ports are per host, so each host's servers take fixed ports without meeting anyone else's.
Files are shared (one machine): each host works in its own clone and DVC cache.

Needs root and iproute2 (`ip`, `tc`; `make test` installs iproute2): without them it is an
error, never a skip. The namespaces, and every process still in them, go at exit.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path


def _ip(*args: str) -> str:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


class Host:
    def __init__(self, name: str, interface: str, address: str):
        self.name, self.interface, self.address = name, interface, address

    def command(self, args) -> list[str]:
        """args run inside this host's network namespace."""
        return ["ip", "netns", "exec", self.name, *map(str, args)]

    def run(self, args, **kwargs) -> subprocess.CompletedProcess:
        kwargs.setdefault("capture_output", True)
        kwargs.setdefault("text", True)
        kwargs.setdefault("timeout", 900)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.command(args), **kwargs)

    def popen(self, args, **kwargs) -> subprocess.Popen:
        kwargs.setdefault("start_new_session", True)
        return subprocess.Popen(self.command(args), **kwargs)

    def shape(self, rate: str) -> None:
        """Limit what this host sends to `rate` (a token bucket on its end of the link)."""
        subprocess.run(self.command(["tc", "qdisc", "replace", "dev", self.interface, "root",
                                     "tbf", "rate", rate, "burst", "32kbit", "latency",
                                     "400ms"]), check=True, capture_output=True, timeout=30)

    def unshape(self) -> None:
        subprocess.run(self.command(["tc", "qdisc", "del", "dev", self.interface, "root"]),
                       capture_output=True, timeout=30)

    def cut(self) -> None:
        """Take this host's end of the link down, as a cut cable or a power loss looks from
        the other host: no packet passes either way from now on, and no socket is closed
        (no FIN, no RST reaches anyone)."""
        _ip("-n", self.name, "link", "set", self.interface, "down")

    def mend(self) -> None:
        """Bring this host's end of the link back up (after cut)."""
        _ip("-n", self.name, "link", "set", self.interface, "up")

    def listening(self) -> list[tuple[str, int, int]]:
        """(address, port, pid) of every TCP socket listening on this host."""
        out = self.run(["ss", "-Hltnp"], check=True).stdout
        found = []
        for line in out.splitlines():
            fields = line.split()
            local, users = fields[3], " ".join(fields[5:])
            address, port = local.rsplit(":", 1)
            for part in users.split("pid=")[1:]:
                found.append((address.strip("[]"), int(port), int(part.split(",")[0])))
        return found

    def connects(self, address: str, port: int) -> bool:
        """Does a TCP connection from this host to address:port succeed (within 3 s)?"""
        probe = ("import socket, sys\n"
                 "try:\n"
                 f"    socket.create_connection(({address!r}, {port}), timeout=3).close()\n"
                 "except OSError:\n"
                 "    sys.exit(1)\n")
        return self.run(["python3", "-c", probe], timeout=30).returncode == 0

    def __repr__(self) -> str:
        return f"Host({self.name}, {self.address})"


class Hosts:
    """Hosts A and B joined by a veth pair, in a private /24 chosen from this process's id."""

    def __init__(self, tag: str = ""):
        for tool in ("ip", "tc", "ss"):
            if not shutil.which(tool):
                raise RuntimeError(f"{tool} not found: install iproute2 "
                                   "(`make test` does: apt-get install iproute2)")
        if os.geteuid() != 0:
            raise RuntimeError("the two-host tests make network namespaces: run them as root")
        pid = os.getpid()
        self.subnet = f"10.{200 + pid % 50}.{(pid // 50 + len(tag)) % 250}"
        stem = f"mn{pid % 100000}{tag}"[:12]
        self.hosts = [Host(f"mnist-{stem}-{side}", f"{stem}{side}", f"{self.subnet}.{n}")
                      for n, side in ((1, "a"), (2, "b"))]

    def __enter__(self) -> tuple[Host, Host]:
        a, b = self.hosts
        try:
            for host in self.hosts:
                _ip("netns", "add", host.name)
            _ip("link", "add", a.interface, "type", "veth", "peer", "name", b.interface)
            for host in self.hosts:
                _ip("link", "set", host.interface, "netns", host.name)
                _ip("-n", host.name, "addr", "add", f"{host.address}/24", "dev", host.interface)
                _ip("-n", host.name, "link", "set", host.interface, "up")
                _ip("-n", host.name, "link", "set", "lo", "up")
        except BaseException:
            self.__exit__()
            raise
        return a, b

    def __exit__(self, *exc) -> None:
        for host in self.hosts:
            self.stop_all(host)
            subprocess.run(["ip", "netns", "del", host.name], capture_output=True, timeout=30)

    @staticmethod
    def stop_all(host: Host) -> None:
        """Kill whatever still runs in host's namespace (a test that failed midway)."""
        for _ in range(3):
            pids = subprocess.run(["ip", "netns", "pids", host.name], capture_output=True,
                                  text=True, timeout=30).stdout.split()
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.2)


def clone_on(host: Host, origin: Path, dest: Path, env: dict) -> Path:
    """A fresh git clone for `host`, with a DVC cache of its own beside it."""
    subprocess.run(["git", "clone", "-q", str(origin), str(dest)], check=True, env=env,
                   capture_output=True, timeout=120)
    subprocess.run(["dvc", "cache", "dir", "--local", str(dest.parent / f"{dest.name}-cache")],
                   cwd=dest, check=True, env=env, capture_output=True, timeout=120)
    return dest
