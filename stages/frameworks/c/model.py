"""The C program's model file, read and written here, and its forward pass in NumPy.

data/model/model.bin holds the original network (784 → Dense 128 ReLU → Dense 10 softmax;
dropout has no weights). Little-endian throughout, byte-stable (same weights, same bytes):

    bytes 0–7    b"MNISTMLP"
    uint32 × 4   version 1, inputs 784, hidden 128, outputs 10
    float32      W1[784][128]  row-major [input][hidden] (Keras' Dense kernel layout)
    float32      b1[128]
    float32      W2[128][10]   [hidden][output]
    float32      b2[10]

407,104 bytes in all. The program (mnist_mlp.c beside this file) writes it; evaluate reads it
here and predicts with the three lines of NumPy in predict(), so a pulled model is evaluated
without a compiler (tests/unit/test_c.py checks them against the program's own predict).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

from stages.data.mnist import IMAGE_SIDE
from stages.runtime.failures import DataError
from stages.runtime.outputs import atomic_path

MODEL_FILE = "model.bin"
MODELS = ("mlp",)
MAGIC = b"MNISTMLP"
VERSION = 1
INPUTS, HIDDEN, OUTPUTS = IMAGE_SIDE * IMAGE_SIDE, 128, 10
HEADER = struct.Struct("<8s4I")
FLOAT = np.dtype("<f4")


class MLP(NamedTuple):
    """The weights: w1 [784, 128], b1 [128], w2 [128, 10], b2 [10], float32."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray


SHAPES = ((INPUTS, HIDDEN), (HIDDEN,), (HIDDEN, OUTPUTS), (OUTPUTS,))
SIZE = HEADER.size + FLOAT.itemsize * sum(int(np.prod(s)) for s in SHAPES)


def build(name: str, seed: int = 0) -> MLP:
    """An untrained network, Keras' initialisation (Glorot-uniform weights, zero biases)
    drawn with NumPy: for tests and for weights brought from elsewhere. Training starts
    from the program's own draws (its header comment says which)."""
    if name not in MODELS:
        raise ValueError(f"the C program implements {', '.join(MODELS)}, not {name}")
    rng = np.random.default_rng(seed)

    def glorot(fan_in: int, fan_out: int) -> np.ndarray:
        limit = np.sqrt(6 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, (fan_in, fan_out)).astype(np.float32)

    return MLP(glorot(INPUTS, HIDDEN), np.zeros(HIDDEN, np.float32),
               glorot(HIDDEN, OUTPUTS), np.zeros(OUTPUTS, np.float32))


def encode(model: MLP) -> bytes:
    """The model file's bytes."""
    parts = [HEADER.pack(MAGIC, VERSION, INPUTS, HIDDEN, OUTPUTS)]
    for array, shape in zip(model, SHAPES):
        if array.shape != shape:
            raise ValueError(f"weights of shape {array.shape}, expected {shape}")
        parts.append(np.ascontiguousarray(array, dtype=FLOAT).tobytes())
    return b"".join(parts)


def decode(data: bytes, name: str) -> MLP:
    """The weights a model file holds; one line naming what is wrong if it is not one."""
    if len(data) < HEADER.size or data[:8] != MAGIC:
        raise DataError(f"{name}: not a model file of the C program (no {MAGIC.decode()} "
                        "header)")
    _, version, *sizes = HEADER.unpack_from(data)
    if version != VERSION or tuple(sizes) != (INPUTS, HIDDEN, OUTPUTS):
        raise DataError(f"{name}: version {version}, sizes {tuple(sizes)}; this project "
                        f"reads version {VERSION}, sizes {(INPUTS, HIDDEN, OUTPUTS)}")
    if len(data) != SIZE:
        raise DataError(f"{name}: {len(data)} bytes; a model file has {SIZE}")
    arrays, offset = [], HEADER.size
    for shape in SHAPES:
        count = int(np.prod(shape))
        arrays.append(np.frombuffer(data, FLOAT, count, offset).reshape(shape)
                      .astype(np.float32))
        offset += count * FLOAT.itemsize
    if not all(np.isfinite(a).all() for a in arrays):
        raise DataError(f"{name}: holds weights that are not finite numbers")
    return MLP(*arrays)


def save(model: MLP, model_dir: Path) -> None:
    with atomic_path(Path(model_dir) / MODEL_FILE) as tmp:
        tmp.write_bytes(encode(model))


def load(model_dir: Path) -> MLP:
    path = Path(model_dir) / MODEL_FILE
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read the model ({err.strerror})") from None
    return decode(data, str(path))


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def predict(model: MLP, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Class probabilities for every image, N×10 float32 (dropout is off at inference)."""
    out = []
    for start in range(0, len(x), batch_size):
        flat = x[start:start + batch_size].reshape(-1, INPUTS).astype(np.float32)
        hidden = np.maximum(flat @ model.w1 + model.b1, 0)
        out.append(softmax(hidden @ model.w2 + model.b2))
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 10), np.float32)
