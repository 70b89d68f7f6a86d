"""TensorFlow/Keras, imported quietly and configured for bit-reproducible runs.

Importing this module imports Keras on the TensorFlow backend with its import-time log
lines kept off stderr (a stage's stderr is for its own one-line errors); `configure` hides
every GPU, seeds every generator and pins the thread pools, which the bits of a result
depend on; `use_device` shows the GPUs again for a training that asks for one
(`train.keras.device: gpu`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
import tempfile

from stages.runtime.failures import PipelineError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ info out of logs

# absl's info and warning lines, which TensorFlow prints at import before it reads
# TF_CPP_MIN_LOG_LEVEL (e.g. "oneDNN custom operations are on" on AVX-512 CPUs).
_IMPORT_NOISE = re.compile(r"[IW]\d{4} |WARNING: All log messages before absl::InitializeLog")


@contextlib.contextmanager
def _native_stderr_filtered(noise: re.Pattern):
    """Capture what C++ code writes to file descriptor 2 and pass on all but `noise`.

    Anything else TensorFlow says at import (an error, a fatal message) still gets through.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            for line in capture.read().decode(errors="replace").splitlines(keepends=True):
                if not noise.match(line):
                    sys.stderr.write(line)


# Triton (which PyPI's CUDA build of PyTorch brings, and imports on its first deterministic
# or compiled op) crashes the process when it loads after TensorFlow: TensorFlow's wheels
# load its library with RTLD_GLOBAL, and Triton's LLVM then binds to TensorFlow's
# (tensorflow/tensorflow#124205). Loaded first, it binds to its own; where it is not
# installed (the CPU builds of PyTorch, macOS) there is nothing to do.
if importlib.util.find_spec("triton") is not None:
    import triton  # noqa: F401

with _native_stderr_filtered(_IMPORT_NOISE):
    import keras
    import tensorflow as tf


def configure(seed: int, intra_op_threads: int, inter_op_threads: int) -> None:
    """Hide every GPU, seed everything and pin threads: bit-reproducibility depends on all
    three. Before TensorFlow's first op: it fixes its devices and thread pools then."""
    use_device("cpu")
    tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
    tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
    keras.utils.set_random_seed(seed)
    # Deterministic kernels, on the CPU and on a GPU alike: on a GPU it also makes cuDNN
    # pick deterministic convolution and pooling algorithms, and refuses (UnimplementedError)
    # an op that has none. It replaces TF_DETERMINISTIC_OPS and TF_CUDNN_DETERMINISTIC,
    # deprecated since TensorFlow 2.8.
    tf.config.experimental.enable_op_determinism()


def use_device(device: str) -> None:
    """Where TensorFlow runs its ops from now on: `cpu` (every GPU hidden) or `gpu`.

    `cpu` is every use but a training on `train.keras.device: gpu`: a CPU training gives
    the same bits on a machine with a GPU, and a model is evaluated on the CPU wherever it
    was trained (the same probabilities on every machine, as PyTorch's are). Only before
    TensorFlow's first op; asking again for the same device is a no-op.
    """
    if device == "cpu":
        tf.config.set_visible_devices([], "GPU")
        return
    gpus = tf.config.list_physical_devices("GPU")  # lists them without starting any
    if not gpus:
        if tf.test.is_built_with_cuda():  # the build can; the machine has no GPU or driver
            cuda = tf.sysconfig.get_build_info().get("cuda_version", "?")
            build, fix = f"built for CUDA {cuda}", "check the GPU's driver (nvidia-smi)"
        else:
            build, fix = "a CPU-only build", "`make gpu` installs GPU TensorFlow (Linux x86_64)"
        raise PipelineError(f"train.keras.device gpu: no GPU is visible to TensorFlow "
                            f"(TensorFlow {tf.__version__}, {build}): {fix}, or use "
                            "train.keras.device: cpu")
    tf.config.set_visible_devices(gpus, "GPU")
    for gpu in gpus:
        # TensorFlow otherwise reserves nearly all of a GPU's memory at its first op;
        # growing as needed changes no result and leaves the rest to other processes.
        tf.config.experimental.set_memory_growth(gpu, True)


def versions() -> dict:
    """What a Keras run's bits depend on besides the params: for run_info.json. On a GPU,
    which one, and the CUDA and cuDNN TensorFlow was built with."""
    info = {"tensorflow": tf.__version__, "keras": keras.__version__,
            "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default")}
    gpus = tf.config.get_visible_devices("GPU")
    if gpus:  # this run could use one: configure() hides them unless the run asked for one
        build = tf.sysconfig.get_build_info()
        details = tf.config.experimental.get_device_details(gpus[0])
        info |= {"gpu": details.get("device_name", gpus[0].name),
                 "cuda": build.get("cuda_version"), "cudnn": build.get("cudnn_version")}
    return info
