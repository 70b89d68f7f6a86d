"""TensorFlow/Keras, imported quietly and configured for bit-reproducible runs.

Importing this module imports Keras on the TensorFlow backend with its import-time log
lines kept off stderr (a stage's stderr is for its own one-line errors); `configure` seeds
every generator and pins the thread pools, which the bits of a result depend on.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile

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


with _native_stderr_filtered(_IMPORT_NOISE):
    import keras
    import tensorflow as tf


def configure(seed: int, intra_op_threads: int, inter_op_threads: int) -> None:
    """Seed everything and pin threads: bit-reproducibility depends on both."""
    tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
    tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def versions() -> dict:
    """What a Keras run's bits depend on besides the params: for run_info.json."""
    return {"tensorflow": tf.__version__, "keras": keras.__version__,
            "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default")}
