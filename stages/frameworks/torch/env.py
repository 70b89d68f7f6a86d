"""PyTorch, imported with a one-line error when it is missing, and configured for
bit-reproducible runs: seeded, deterministic algorithms only, threads pinned.

PyTorch is an optional part of the project (its own locked extra, several hundred MB):
`make torch` installs it into the project's environment.
"""

from __future__ import annotations

import os
import random

import numpy as np

from stages.runtime.failures import PipelineError

INSTALL = "make torch"

# c10d's C++ warnings (a peer whose hostname does not resolve back, a socket whose peer
# went silent...) are not for the stage's stderr, which says what happened in one line;
# read once, when torch loads.
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

try:
    import torch
except ImportError:
    raise PipelineError(f"train.framework torch needs PyTorch, which is not installed: run "
                        f"`{INSTALL}` (it installs requirements-torch.lock)") from None


def configure(seed: int, intra_op_threads: int, inter_op_threads: int) -> None:
    """Seed every generator, allow deterministic algorithms only, pin both thread pools."""
    # cuBLAS is deterministic only with a fixed workspace; it must be set before CUDA starts.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.set_num_threads(intra_op_threads)
    if torch.get_num_interop_threads() != inter_op_threads:
        torch.set_num_interop_threads(inter_op_threads)  # allowed once, before any work
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # the CPU generator and every GPU's
    # Deterministic kernels only (an op that has none raises); on a GPU, cuDNN's
    # convolutions too, chosen the same way each run: no autotuning, which picks by timing.
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def device(name: str) -> torch.device:
    """`cpu`, or `cuda` when a GPU is there (one line when it is not)."""
    if name == "cuda" and not torch.cuda.is_available():
        if torch.version.cuda:  # the build can; the machine has no GPU or driver
            build = f"built for CUDA {torch.version.cuda}"
            fix = "check the GPU's driver (nvidia-smi)"
        else:
            build = "a CPU-only build"
            fix = "`make gpu` installs PyTorch's CUDA build (Linux x86_64)"
        raise PipelineError(f"train.torch.device cuda: no CUDA GPU is visible to PyTorch "
                            f"(torch {torch.__version__}, {build}): {fix}, or use "
                            "train.torch.device: cpu")
    return torch.device(name)


def versions() -> dict:
    """What a PyTorch run's bits depend on besides the params: for run_info.json."""
    info = {"torch": torch.__version__, "deterministic_algorithms": True,
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if torch.cuda.is_initialized():  # this run used a GPU
        info |= {"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                 "gpu": torch.cuda.get_device_name(0)}
    return info
