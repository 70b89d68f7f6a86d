"""stages/frameworks/keras/env.py: TensorFlow imported quietly, then seeded and pinned for
bit-exact runs."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.helpers import ROOT, run_env

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
