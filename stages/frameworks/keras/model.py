"""The Keras networks `train.model` can name, and their model file: save, load, predict.

- mlp:       the original script's network, layer for layer.
- cnn:       a small BatchNorm convnet (the default): near the state of the art on CPU.
- cnn_large: a wider, deeper variant for users with more time or a GPU.
- fast:      a LeNet-sized BatchNorm convnet for quick experiments (the `fast` preset).

Each is a plain Keras model ending in softmax (augmentation happens in the training step,
see stages/frameworks/keras/fit.py), so the saved file needs no code of ours to load:
`keras.models.load_model("data/model/model.keras")`.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from stages.data.mnist import IMAGE_SIDE
from stages.frameworks.files import size_of
from stages.frameworks.keras.env import keras
from stages.runtime.failures import DataError, one_line
from stages.runtime.outputs import atomic_path

MODEL_FILE = "model.keras"
FIXED_ZIP_TIME = (1980, 1, 1, 0, 0, 0)

layers = keras.layers


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

    About 5M multiply-adds per image: cheap enough for 2 CPU cores to train a few dozen
    epochs with augmentation (what it reaches: benchmarks/RESULTS.md).
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


def fast() -> keras.Sequential:
    """LeNet's shape for quick experiments (train.fast): two 5×5 convs of 16 and 32
    channels, each pooled before BatchNorm, and a dense layer of 128 with BatchNorm. A
    fraction of the cnn's multiply-adds, and no 3×3 conv on the 4×4 map: cheap in
    arithmetic, that conv is dear per step on TensorFlow's CPU kernels (what each choice
    cost: benchmarks/RESULTS.md)."""
    return keras.Sequential([
        keras.Input((IMAGE_SIDE, IMAGE_SIDE)),
        layers.Reshape((IMAGE_SIDE, IMAGE_SIDE, 1)),
        *_conv_pool_bn_relu(16, 5),
        *_conv_pool_bn_relu(32, 5),
        layers.Flatten(),
        layers.Dense(128, use_bias=False), layers.BatchNormalization(), layers.ReLU(),
        layers.Dropout(0.2),
        layers.Dense(10, activation="softmax"),
    ], name="fast")


def cnn_large() -> keras.Sequential:
    """VGG-style: two 3×3 convs per block at full then half resolution, several times the
    cnn's multiply-adds."""
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


MODELS = {"mlp": mlp, "cnn": cnn, "cnn_large": cnn_large, "fast": fast}


def build(name: str) -> keras.Sequential:
    return MODELS[name]()


# --- the model file ----------------------------------------------------------------------


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


def save_stable(model, path: Path) -> None:
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


def save(model, model_dir: Path) -> None:
    save_stable(model, Path(model_dir) / MODEL_FILE)


# What a model file of this project may hold, checked before Keras reads it: the members
# save_stable() writes, each within its cap (zipfile stops at a member's declared size, so
# an archive that inflates beyond it fails its CRC check instead). FILE_CAP is several times
# the largest network's file (tests/unit/test_keras_model.py saves and loads each network).
FILE_CAP = 32 << 20
MEMBER_CAPS = {"metadata.json": 64 << 10, "config.json": 1 << 20, "model.weights.h5": FILE_CAP}
# Keys of a saved config that differ between two saves of the same network: the names Keras
# numbers per process, the object ids save_stable() renumbers, and what compile() and fit()
# record (loading here never compiles).
UNCOMPARED = {"name", "shared_object_id", "compile_config", "build_config"}


def _comparable(config):
    """A saved config without the keys that name or number its objects."""
    if isinstance(config, dict):
        return {k: _comparable(v) for k, v in config.items() if k not in UNCOMPARED}
    if isinstance(config, list):
        return [_comparable(v) for v in config]
    return config


def checked_archive(path: Path) -> None:
    """Refuse, in one line and before Keras reads it, a model file that is not one of this
    project's networks as save_stable() writes it: other or oversized archive members; a
    config.json that is not, layer for layer and setting for setting, the network it names
    (so no layer, function or module from elsewhere, and no size but the network's); weights
    whose arrays are not that network's shapes (an HDF5 dataset may be compressed: its
    declared shape bounds what reading it costs)."""
    import h5py

    size_of(path, FILE_CAP)
    try:
        with zipfile.ZipFile(path) as archive:
            members = {info.filename: info for info in archive.infolist()}
            if set(members) != set(MEMBER_CAPS):
                raise DataError(f"{path}: holds {sorted(members)[:5]}; a model file of this "
                                f"project holds {sorted(MEMBER_CAPS)}")
            for name, info in members.items():
                if info.file_size > MEMBER_CAPS[name]:
                    raise DataError(f"{path}: {name} inflates to {info.file_size:,} bytes; "
                                    f"at most {MEMBER_CAPS[name]:,}")
            config = json.loads(archive.read("config.json"))
            network = _network_of(config, path)
            with archive.open("model.weights.h5") as member, h5py.File(member, "r") as h5:
                arrays = []
                h5.visititems(lambda name, item: arrays.append((name, tuple(item.shape)))
                              if isinstance(item, h5py.Dataset) else None)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, KeyError,
            RecursionError) as err:  # RecursionError: a config nested past the stack
        raise DataError(f"{path}: not a model file of this project ({one_line(err)})") from None
    # The network's own arrays under layers/; the optimizer's state a compiled save adds
    # (scalars, and one or two moments of each weight's shape) beside them.
    expected = sorted(tuple(w.shape) for w in network.weights)
    weights = sorted(shape for name, shape in arrays if name.startswith("layers/"))
    others = [shape for name, shape in arrays if not name.startswith("layers/")]
    if weights != expected or len(others) > 3 * len(expected) + 4 or not all(
            shape == () or shape in expected for shape in others):
        raise DataError(f"{path}: its weights are not the {network.name}'s arrays "
                        f"({len(weights)} of them, and {len(others)} others; the "
                        f"{network.name} has {len(expected)})")


def _network_of(config, path: Path):
    """This project's network that a saved config describes, built fresh; one line when it
    describes none."""
    from keras.saving import serialize_keras_object

    inner = config.get("config") if isinstance(config, dict) else None
    name = inner.get("name") if isinstance(inner, dict) else None
    if not isinstance(name, str) or name not in MODELS:
        raise DataError(f"{path}: config.json names no network of this project "
                        f"({str(name)[:40]!r}); expected one of {', '.join(MODELS)}")
    network = build(name)
    fresh = json.loads(json.dumps(serialize_keras_object(network)))
    if _comparable(config) != _comparable(fresh):
        raise DataError(f"{path}: config.json is not this project's {name}: other layers or "
                        "settings (refused before any is built)")
    return network


def load(model_dir: Path):
    """The network in model_dir's model file, checked first (checked_archive), loaded by
    Keras with its safe mode on and uncompiled (predicting needs no optimizer)."""
    path = Path(model_dir) / MODEL_FILE
    checked_archive(path)
    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise DataError(f"{path}: cannot load the model ({one_line(err)})") from None


def predict(model, x: np.ndarray, batch_size: int) -> np.ndarray:
    """Class probabilities for every image, N×10 float32."""
    # Plain calls, not predict(): no tf.data pipeline to build for 10 batches.
    return np.concatenate([model(x[start:start + batch_size], training=False).numpy()
                           for start in range(0, len(x), batch_size)]).astype(np.float32)
