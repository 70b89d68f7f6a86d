"""Child processes a test watches line by line, their data-parallel workers, and a loaded
machine."""

from __future__ import annotations

import contextlib
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

from testbed.processes import run_env


@contextlib.contextmanager
def busy_cores(n: int = 2):
    """n processes spinning on a core each, for the duration of the block: a loaded machine.

    Under load, every step of the stage takes longer and a signal lands at moments an idle
    machine rarely shows (inside TensorFlow's import, tracing, a chunk's conversion).
    """
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
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
