"""The networks `train.model` can name, and a byte-stable way to save them.

- mlp:       the original script's network, layer for layer.
- cnn:       a small BatchNorm convnet (the default): near the state of the art on CPU.
- cnn_large: a wider, deeper variant for users with more time or a GPU.

Each is a plain Keras model (augmentation happens in the training step, see
stages/augment.py), so the saved file needs no code of ours to load:
`keras.models.load_model("data/model/model.keras")`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
import zipfile

from stages.common import IMAGE_SIDE, atomic_path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ info out of logs

# absl's info and warning lines, which TensorFlow prints at import before it reads
# TF_CPP_MIN_LOG_LEVEL (e.g. "oneDNN custom operations are on" on AVX-512 CPUs).
_IMPORT_NOISE = re.compile(r"[IW]\d{4} |WARNING: All log messages before absl::InitializeLog")


@contextlib.contextmanager
def _native_stderr_filtered(noise: re.Pattern):
    """Capture what C++ code writes to file descriptor 2 and pass on all but `noise`.

    A stage's stderr is for its own one-line errors; anything else TensorFlow says at
    import (an error, a fatal message) still gets through.
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
    import tensorflow  # noqa: F401  (Keras' backend: its import is what logs)
from keras import layers  # noqa: E402


def mlp() -> keras.Sequential:
    return keras.Sequential([
        keras.Input((IMAGE_SIDE, IMAGE_SIDE)),
        layers.Flatten(),
        layers.Dense(128, activation="relu"),
        layers.Dropout(0.2),
        layers.Dense(10, activation="softmax"),
    ], name="mlp")


def _conv_bn_relu(filters: int, size: int, padding: str) -> list:
    # No bias: BatchNorm's shift does its job.
    return [layers.Conv2D(filters, size, padding=padding, use_bias=False),
            layers.BatchNormalization(), layers.ReLU()]


def _head(dense: int) -> list:
    return [layers.Flatten(), layers.Dense(dense, use_bias=False), layers.BatchNormalization(),
            layers.ReLU(), layers.Dropout(0.4), layers.Dense(10, activation="softmax")]


def _conv_pool_bn_relu(filters: int, size: int) -> list:
    # Pooling straight after the conv means BatchNorm and ReLU (memory-bound on a CPU) see
    # a quarter of the values: a third more images per second than conv-BN-ReLU-pool.
    return [layers.Conv2D(filters, size, use_bias=False), layers.MaxPooling2D(),
            layers.BatchNormalization(), layers.ReLU()]


def cnn() -> keras.Sequential:
    """LeNet's shape with modern parts: 5×5 convs with BatchNorm, pooled twice, then a
    3×3 conv on the 4×4 map and a linear read-out.

    About 5M multiply-adds per image: cheap enough for 2 CPU cores to train ~25 epochs
    with augmentation in minutes, which is what gets a small net to ~99.6%.
    """
    return keras.Sequential([
        keras.Input((IMAGE_SIDE, IMAGE_SIDE)),
        layers.Reshape((IMAGE_SIDE, IMAGE_SIDE, 1)),
        *_conv_pool_bn_relu(32, 5),
        *_conv_pool_bn_relu(64, 5),
        *_conv_bn_relu(128, 3, "same"),
        layers.Flatten(),
        layers.Dropout(0.3),
        layers.Dense(10, activation="softmax"),
    ], name="cnn")


def cnn_large() -> keras.Sequential:
    """VGG-style: two 3×3 convs per block at full then half resolution; ~5× the cost of cnn."""
    blocks = []
    for width in (32, 64):
        blocks += [*_conv_bn_relu(width, 3, "same"), *_conv_bn_relu(width, 3, "same"),
                   layers.MaxPooling2D(), layers.Dropout(0.25)]
    return keras.Sequential([
        keras.Input((IMAGE_SIDE, IMAGE_SIDE)),
        layers.Reshape((IMAGE_SIDE, IMAGE_SIDE, 1)),
        *blocks,
        *_head(256),
    ], name="cnn_large")


MODELS = {"mlp": mlp, "cnn": cnn, "cnn_large": cnn_large}


def build(name: str) -> keras.Sequential:
    return MODELS[name]()


def configure_tensorflow(seed: int, intra: int, inter: int) -> None:
    """Seed everything and pin threads: bit-reproducibility depends on both."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(inter)
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def _renumber_shared_ids(config, ids=None):
    """Replace Python object ids (`shared_object_id`, which differ per process) by 1, 2, ...

    They only link objects within one file, so numbering by first appearance keeps the
    meaning and makes the bytes stable.
    """
    ids = {} if ids is None else ids
    if isinstance(config, dict):
        return {k: (ids.setdefault(v, len(ids) + 1) if k == "shared_object_id"
                    else _renumber_shared_ids(v, ids)) for k, v in config.items()}
    if isinstance(config, list):
        return [_renumber_shared_ids(v, ids) for v in config]
    return config


def save_stable(model: keras.Model, path) -> None:
    """Save a .keras file whose bytes depend on the weights only, not on the clock.

    Keras stamps the save time into metadata.json and into every zip entry; we rewrite
    the archive with those fixed, so an unchanged model keeps its DVC hash.
    """
    # Keras insists on the .keras suffix, so the raw save gets a hidden name of its own.
    raw = path.with_name(f".{path.stem}.raw.keras")
    try:
        model.save(raw)
        with atomic_path(path) as tmp:
            with zipfile.ZipFile(raw) as src, zipfile.ZipFile(tmp, "w") as dst:
                for info in src.infolist():
                    data = src.read(info.filename)
                    if info.filename == "metadata.json":
                        meta = json.loads(data)
                        meta["date_saved"] = "1980-01-01@00:00:00"
                        data = json.dumps(meta, sort_keys=True).encode()
                    elif info.filename == "config.json":
                        data = json.dumps(_renumber_shared_ids(json.loads(data))).encode()
                    fixed = zipfile.ZipInfo(info.filename, date_time=FIXED_ZIP_TIME)
                    fixed.compress_type = info.compress_type
                    fixed.external_attr = 0o644 << 16
                    dst.writestr(fixed, data)
    finally:
        raw.unlink(missing_ok=True)
