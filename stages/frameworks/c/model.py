"""The C programs' model files, read and written here, and their forward passes in NumPy.

data/model/model.bin holds one of two networks, told apart by its first 8 bytes. Little-endian
throughout, byte-stable (same weights, same bytes).

mlp, the original network (784 → Dense 128 ReLU → Dense 10 softmax; dropout has no weights),
written by mnist_mlp.c:

    bytes 0–7    b"MNISTMLP"
    uint32 × 4   version 1, inputs 784, hidden 128, outputs 10
    float32      W1[784][128]  row-major [input][hidden] (Keras' Dense kernel layout)
    float32      b1[128]
    float32      W2[128][10]   [hidden][output]
    float32      b2[10]

407,104 bytes in all.

cnn, Keras' cnn (stages/frameworks/keras/model.py: 5×5 conv 32, max-pool, BatchNorm, ReLU;
5×5 conv 64, max-pool, BatchNorm, ReLU; 3×3 conv 128 padded "same", BatchNorm, ReLU;
flatten, dropout 0.3, Dense 10 softmax; no conv biases), written by mnist_cnn.c:

    bytes 0–7    b"MNISTCNN"
    uint32 × 5   version 1, channels 32, 64, 128, classes 10          (header 28 bytes)
    float32      conv1 kernel [5][5][1][32]   Keras' HWIO: [row][column][input][output]
    float32      bn1 gamma[32], beta[32], moving_mean[32], moving_variance[32]
    float32      conv2 kernel [5][5][32][64]
    float32      bn2 gamma[64], beta[64], moving_mean[64], moving_variance[64]
    float32      conv3 kernel [3][3][64][128]
    float32      bn3 gamma[128], beta[128], moving_mean[128], moving_variance[128]
    float32      dense kernel [2048][10]  [input][output]; input (h×4 + w)×128 + c, the NHWC
                                           flattening of the 4×4×128 map
    float32      dense bias [10]

147,114 floats, 588,484 bytes in all: exactly the order and shapes of Keras'
cnn().get_weights(), so `CNN(*keras_net.get_weights())` carries a Keras network over.
BatchNorm is Keras': at inference (x − moving_mean) / sqrt(moving_variance + 1e-3) × gamma
+ beta.

The programs (mnist_mlp.c and mnist_cnn.c beside this file) write them; evaluate reads them
here and predicts with predict()'s NumPy, so a pulled model is evaluated without a compiler
(tests/unit/test_c.py and test_c_cnn.py check it against the programs' own predict).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from stages.data.mnist import IMAGE_SIDE
from stages.frameworks.files import read_capped
from stages.runtime.failures import DataError
from stages.runtime.outputs import atomic_path

MODEL_FILE = "model.bin"
MODELS = ("mlp", "cnn")
FLOAT = np.dtype("<f4")
VERSION = 1  # of both formats

# --- mlp ----------------------------------------------------------------------------------
MAGIC = b"MNISTMLP"
INPUTS, HIDDEN, OUTPUTS = IMAGE_SIDE * IMAGE_SIDE, 128, 10
HEADER = struct.Struct("<8s4I")


class MLP(NamedTuple):
    """The weights: w1 [784, 128], b1 [128], w2 [128, 10], b2 [10], float32."""

    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray


SHAPES = ((INPUTS, HIDDEN), (HIDDEN,), (HIDDEN, OUTPUTS), (OUTPUTS,))
SIZE = HEADER.size + FLOAT.itemsize * sum(int(np.prod(s)) for s in SHAPES)

# --- cnn ----------------------------------------------------------------------------------
CNN_MAGIC = b"MNISTCNN"
CHANNELS = (32, 64, 128)  # of conv1, conv2, conv3
KERNELS = (5, 5, 3)  # their sides
CLASSES = 10
FEATURES = 4 * 4 * CHANNELS[2]  # the flattened map the dense layer reads: 2048
CNN_HEADER = struct.Struct("<8s5I")
BN_EPSILON = 1e-3  # Keras' BatchNormalization default (momentum 0.99: training's business)
DROPOUT = 0.3
# Images per step of the NumPy forward pass: conv2's gathered windows are 200 KB an image,
# and a few MB at a time stay in the allocator's reach (a 1000-image batch's 200 MB, paged
# in afresh each batch, took twice as long in all).
CNN_CHUNK = 64


class CNN(NamedTuple):
    """The weights, float32, in Keras' get_weights() order: conv kernels HWIO, each
    BatchNorm's gamma, beta, moving mean and moving variance, the dense kernel [2048, 10]
    and bias [10]."""

    conv1: np.ndarray
    bn1_gamma: np.ndarray
    bn1_beta: np.ndarray
    bn1_mean: np.ndarray
    bn1_var: np.ndarray
    conv2: np.ndarray
    bn2_gamma: np.ndarray
    bn2_beta: np.ndarray
    bn2_mean: np.ndarray
    bn2_var: np.ndarray
    conv3: np.ndarray
    bn3_gamma: np.ndarray
    bn3_beta: np.ndarray
    bn3_mean: np.ndarray
    bn3_var: np.ndarray
    dense: np.ndarray
    dense_bias: np.ndarray


def _cnn_shapes() -> tuple:
    shapes, inputs = [], 1
    for channels, side in zip(CHANNELS, KERNELS):
        shapes += [(side, side, inputs, channels)] + [(channels,)] * 4
        inputs = channels
    return (*shapes, (FEATURES, CLASSES), (CLASSES,))


CNN_SHAPES = _cnn_shapes()
CNN_SIZE = CNN_HEADER.size + FLOAT.itemsize * sum(int(np.prod(s)) for s in CNN_SHAPES)
# The fields training changes (the moving statistics are not the loss's parameters).
TRAINABLE = tuple(f for f in CNN._fields if not f.endswith(("_mean", "_var")))


class _Format(NamedTuple):
    magic: bytes
    header: struct.Struct
    sizes: tuple  # the header's uint32s after the version
    shapes: tuple
    size: int  # bytes in all
    kind: type


FORMATS = {
    "mlp": _Format(MAGIC, HEADER, (INPUTS, HIDDEN, OUTPUTS), SHAPES, SIZE, MLP),
    "cnn": _Format(CNN_MAGIC, CNN_HEADER, (*CHANNELS, CLASSES), CNN_SHAPES, CNN_SIZE, CNN),
}


def build(name: str, seed: int = 0) -> MLP | CNN:
    """An untrained network, Keras' initialisation (Glorot-uniform kernels, zero biases;
    BatchNorm gamma 1, beta 0, moving mean 0, moving variance 1) drawn with NumPy: for
    tests and for weights brought from elsewhere. Training starts from the programs' own
    draws (their header comments say which)."""
    if name not in MODELS:
        raise ValueError(f"the C programs implement {', '.join(MODELS)}, not {name}")
    rng = np.random.default_rng(seed)

    def glorot(shape: tuple, fan_in: int, fan_out: int) -> np.ndarray:
        limit = np.sqrt(6 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, shape).astype(np.float32)

    if name == "mlp":
        return MLP(glorot((INPUTS, HIDDEN), INPUTS, HIDDEN), np.zeros(HIDDEN, np.float32),
                   glorot((HIDDEN, OUTPUTS), HIDDEN, OUTPUTS), np.zeros(OUTPUTS, np.float32))
    arrays = []
    for shape in CNN_SHAPES[:-2:5]:  # the conv kernels, then their BatchNorm's four
        side, _, inputs, channels = shape
        arrays += [glorot(shape, side * side * inputs, side * side * channels),
                   np.ones(channels, np.float32), np.zeros(channels, np.float32),
                   np.zeros(channels, np.float32), np.ones(channels, np.float32)]
    return CNN(*arrays, glorot((FEATURES, CLASSES), FEATURES, CLASSES),
               np.zeros(CLASSES, np.float32))


def encode(model: MLP | CNN) -> bytes:
    """The model file's bytes."""
    spec = FORMATS["cnn" if isinstance(model, CNN) else "mlp"]
    parts = [spec.header.pack(spec.magic, VERSION, *spec.sizes)]
    if len(model) != len(spec.shapes):
        raise ValueError(f"{len(model)} weight arrays, expected {len(spec.shapes)}")
    for array, shape in zip(model, spec.shapes):
        if np.shape(array) != shape:
            raise ValueError(f"weights of shape {np.shape(array)}, expected {shape}")
        parts.append(np.ascontiguousarray(array, dtype=FLOAT).tobytes())
    return b"".join(parts)


def decode(data: bytes, name: str) -> MLP | CNN:
    """The weights a model file holds, an MLP or a CNN by its magic; one line naming what
    is wrong if it is not one."""
    spec = next((s for s in FORMATS.values() if data[:8] == s.magic), None)
    if spec is None:
        raise DataError(f"{name}: not a model file of the C program (no "
                        f"{' or '.join(s.magic.decode() for s in FORMATS.values())} header)")
    if len(data) < spec.header.size:
        raise DataError(f"{name}: {len(data)} bytes; a {spec.magic.decode()} model file "
                        f"has {spec.size}")
    _, version, *sizes = spec.header.unpack_from(data)
    if version != VERSION or tuple(sizes) != spec.sizes:
        raise DataError(f"{name}: version {version}, sizes {tuple(sizes)}; this project "
                        f"reads version {VERSION}, sizes {spec.sizes}")
    if len(data) != spec.size:
        raise DataError(f"{name}: {len(data)} bytes; a model file has {spec.size}")
    arrays, offset = [], spec.header.size
    for shape in spec.shapes:
        count = int(np.prod(shape))
        arrays.append(np.frombuffer(data, FLOAT, count, offset).reshape(shape)
                      .astype(np.float32))
        offset += count * FLOAT.itemsize
    if not all(np.isfinite(a).all() for a in arrays):
        raise DataError(f"{name}: holds weights that are not finite numbers")
    model = spec.kind(*arrays)
    if isinstance(model, CNN):
        for layer in (1, 2, 3):
            if (getattr(model, f"bn{layer}_var") < 0).any():
                raise DataError(f"{name}: BatchNorm {layer} has a negative moving variance")
    return model


def save(model: MLP | CNN, model_dir: Path) -> None:
    with atomic_path(Path(model_dir) / MODEL_FILE) as tmp:
        tmp.write_bytes(encode(model))


def load(model_dir: Path) -> MLP | CNN:
    """The network in model_dir's model file: its size checked against the formats' before
    a byte is read, then its header and weights (decode)."""
    path = Path(model_dir) / MODEL_FILE
    largest = max(spec.size for spec in FORMATS.values())
    return decode(read_capped(path, largest), str(path))


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def conv(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """A valid convolution (cross-correlation, as Keras') of NHWC x by an HWIO kernel."""
    side, _, _, channels = kernel.shape
    # N, H', W', kh, kw, C: each window gathered in the kernel's own order, one matmul.
    windows = sliding_window_view(x, (side, side), axis=(1, 2)).transpose(0, 1, 2, 4, 5, 3)
    n, height, width = windows.shape[:3]
    return (windows.reshape(n * height * width, -1) @ kernel.reshape(-1, channels)).reshape(
        n, height, width, channels)


def max_pool(x: np.ndarray) -> np.ndarray:
    """2×2 max-pooling, stride 2, of NHWC x (even sides)."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _cnn_logits(model: CNN, x: np.ndarray) -> np.ndarray:
    """The cnn's logits at inference (moving statistics, no dropout), float32."""
    def bn_relu(h, layer):
        gamma, beta, mean, var = model[5 * layer + 1:5 * layer + 5]
        scale = gamma / np.sqrt(var + np.float32(BN_EPSILON))
        return np.maximum((h - mean) * scale + beta, 0)

    h = x.reshape(len(x), IMAGE_SIDE, IMAGE_SIDE, 1)
    h = bn_relu(max_pool(conv(h, model.conv1)), 0)
    h = bn_relu(max_pool(conv(h, model.conv2)), 1)
    h = bn_relu(conv(np.pad(h, ((0, 0), (1, 1), (1, 1), (0, 0))), model.conv3), 2)
    return h.reshape(len(x), FEATURES) @ model.dense + model.dense_bias


def predict(model: MLP | CNN, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Class probabilities for every image, N×10 float32 (dropout is off at inference,
    BatchNorm uses its moving statistics). Memory is bounded by batch_size, not N: the
    cnn goes CNN_CHUNK images at a time at most (each image is computed alone)."""
    model = type(model)(*(np.asarray(a, np.float32) for a in model))
    step = min(batch_size, CNN_CHUNK) if isinstance(model, CNN) else batch_size
    out = []
    for start in range(0, len(x), step):
        batch = np.asarray(x[start:start + step], np.float32)
        if isinstance(model, CNN):
            logits = _cnn_logits(model, batch)
        else:
            hidden = np.maximum(batch.reshape(-1, INPUTS) @ model.w1 + model.b1, 0)
            logits = hidden @ model.w2 + model.b2
        out.append(softmax(logits))
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 10), np.float32)
