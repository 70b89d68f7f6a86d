"""Child processes a test watches line by line, their data-parallel workers, and a loaded
machine."""

from __future__ import annotations

import contextlib
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from testbed.processes import run_env


def running_elsewhere() -> int | None:
    """How many threads the kernel has running or ready to run now, besides the caller
    (/proc/loadavg's fourth field counts the reading thread too); None off Linux."""
    try:
        with open("/proc/loadavg") as f:
            return int(f.read().split()[3].split("/")[0]) - 1
    except (OSError, ValueError, IndexError):
        return None


@contextlib.contextmanager
def busy_cores(n: int = 2, period: float = 0.1):
    """A loaded machine for the duration of the block: n runnable threads besides the code
    under test, topped up by processes spinning on a core.

    Under load, every step of the stage takes longer and a signal lands at moments an idle
    machine rarely shows (inside TensorFlow's import, tracing, a chunk's conversion).

    A loop spins only while fewer than n + 1 threads run (the code under test and n more):
    under `make test` the other workers' processes often load every core already, and a
    loop beside them would take their time and add no load. A thread looks every `period`
    seconds and stops (SIGSTOP) or resumes (SIGCONT) loops to make up the difference. Where
    the count cannot be read (no /proc), all n spin.
    """
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    spinning, done = n, threading.Event()

    def keep_loaded():
        nonlocal spinning
        while not done.wait(period):
            others = running_elsewhere()
            if others is None:
                return
            want = max(0, min(n, n + 1 - (others - spinning)))
            for loop in loops[want:spinning]:
                loop.send_signal(signal.SIGSTOP)
            for loop in loops[spinning:want]:
                loop.send_signal(signal.SIGCONT)
            spinning = want

    keeper = threading.Thread(target=keep_loaded, daemon=True)
    keeper.start()
    try:
        yield
    finally:
        done.set()
        keeper.join()
        for loop in loops:
            loop.kill()  # SIGKILL ends a stopped process too
            loop.wait()


class Lines:
    """Read a child's stdout on a thread, so a test can wait for a line with a timeout."""

    def __init__(self, proc: subprocess.Popen, stream: str = "stdout"):
        self.proc, self.seen, self._q = proc, [], queue.Queue()
        self._stream = getattr(proc, stream)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self._stream:
            self._q.put(line)
        self._q.put(None)

    def wait_for(self, prefix: str | tuple[str, ...], timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"exited {self.proc.wait()} before {prefix!r}:\n"
                                     + "".join(self.seen) + (self.proc.stderr.read()
                                     if self._stream is not self.proc.stderr else ""))
            self.seen.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no line {prefix!r} within {timeout}s:\n" + "".join(self.seen))

    def rest(self) -> str:
        chunks = []
        while (line := self._q.get(timeout=60)) is not None:
            chunks.append(line)
        return "".join(self.seen + chunks)


def workers_of(process) -> dict:
    """The data-parallel worker processes under `process` (a psutil.Process), by rank:
    torch.distributed's launcher sets RANK in each one's environment."""
    import psutil

    found = {}
    for child in [process, *process.children(recursive=True)]:
        try:
            rank = child.environ().get("RANK")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if rank is not None:
            found[int(rank)] = child
    return found


def start(repo: Path, *args, env: dict | None = None) -> tuple[subprocess.Popen, Lines]:
    proc = subprocess.Popen(args, cwd=repo, env=env or run_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    return proc, Lines(proc)
