"""Which worker of a data-parallel run this process is.

torch.distributed's launcher (stages/frameworks/torch/launcher.py) starts every worker with
RANK, WORLD_SIZE and LOCAL_WORLD_SIZE in its environment; a process started any other way is
the only worker. The train stage asks this before it imports any framework.
"""

from __future__ import annotations

import os


def world() -> tuple[int, int, int]:
    """(rank, world size, workers on this machine) when a torch.distributed launcher
    started this process as one of several workers (it sets RANK, WORLD_SIZE and
    LOCAL_WORLD_SIZE), else (0, 1, 1)."""
    env = os.environ
    return (int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)),
            int(env.get("LOCAL_WORLD_SIZE", 1)))


def leave(size: int) -> None:
    """End a worker of a data-parallel run (size > 1) once its work is done and written:
    flush, then exit without running destructors. PyTorch's gloo process group can
    deadlock in its destructor, which waits for gloo's thread while holding the GIL that
    thread needs (pytorch/pytorch#56297). A lone process returns as usual."""
    import sys

    if size > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
