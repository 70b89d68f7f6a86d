"""stages/frameworks/keras/env.py: TensorFlow imported quietly, then seeded and pinned for
bit-exact runs, on the CPU unless a training asks for a GPU."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from testbed.processes import run_env
from tests.paths import ROOT

PROBE = textwrap.dedent("""
    import numpy as np
    from stages.frameworks.keras.env import configure, tf  # first: TensorFlow's import, quietly
    from tensorflow.python.framework.config import is_op_determinism_enabled

    def draws(seed):
        configure(seed, 1, 3)
        return [float(np.random.rand()), float(tf.random.uniform(()))]

    first = draws(7)
    print(tf.config.threading.get_intra_op_parallelism_threads(),
          tf.config.threading.get_inter_op_parallelism_threads(),
          is_op_determinism_enabled(),
          draws(7) == first, draws(8) != first)
""")


@pytest.mark.slow
def test_import_is_quiet_and_configure_pins_threads_and_seeds():
    """A stage's stderr is for its one-line errors: TensorFlow's import chatter is kept off
    it; configure() sets the thread pools and makes the random draws repeat."""
    env = run_env()
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert proc.stdout.split() == ["1", "3", "True", "True", "True"]


DEVICE_PROBE = textwrap.dedent("""
    from stages.frameworks.keras.env import configure, tf, use_device, versions
    from stages.runtime.failures import PipelineError

    configure(0, 1, 1)
    assert tf.config.get_visible_devices("GPU") == [] and "gpu" not in versions()
    gpus = tf.config.list_physical_devices("GPU")
    try:
        use_device("gpu")
    except PipelineError as err:
        assert not gpus
        print(err)
    else:
        assert tf.config.get_visible_devices("GPU") == gpus and versions()["gpu"]
        print("on", versions()["gpu"])
""")


@pytest.mark.slow
def test_configure_hides_every_gpu_and_a_gpu_is_shown_or_refused_in_one_line():
    """configure() leaves TensorFlow the CPU only (the bits of a CPU run, wherever it runs);
    a training on `gpu` shows the GPUs again and run_info names one, or, where TensorFlow
    sees none, gets the one line that names the TensorFlow build and the fix."""
    proc = subprocess.run([sys.executable, "-c", DEVICE_PROBE], cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    from stages.frameworks.keras.env import tf

    if tf.config.list_physical_devices("GPU"):
        assert proc.stdout.startswith("on ")
        return
    # A CPU-only build names the command that installs GPU TensorFlow; a CUDA build, the driver.
    build, fix = (("built for CUDA", "check the GPU's driver (nvidia-smi)")
                  if tf.test.is_built_with_cuda() else
                  ("a CPU-only build", "`make gpu` installs GPU TensorFlow (Linux x86_64)"))
    assert proc.stdout.startswith(f"train.keras.device gpu: no GPU is visible to TensorFlow "
                                  f"(TensorFlow {tf.__version__}, {build}")
    assert proc.stdout.endswith(f"): {fix}, or use train.keras.device: cpu\n")


@pytest.mark.slow
def test_pytorch_trains_in_a_process_that_imported_tensorflow_first():
    """A process that imports TensorFlow (this module) and then runs PyTorch with
    deterministic kernels, as the suite and the benchmarks do: PyPI's CUDA build of
    PyTorch then loads Triton, which crashed with SIGSEGV after TensorFlow
    (tensorflow/tensorflow#124205) until env.py loaded it first. Where Triton is not
    installed (the CPU build of PyTorch) this passes either way; `make test-pythons`, whose
    3.12 and 3.13 venvs get the CUDA build, is where it bites."""
    pytest.importorskip("torch", reason="PyTorch is not installed (make torch)")
    code = ("import stages.frameworks.keras.env, torch\n"
            "torch.use_deterministic_algorithms(True)\n"
            "print(torch.nn.Linear(2, 1)(torch.ones(1, 2)).shape)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "torch.Size([1, 1])\n"
