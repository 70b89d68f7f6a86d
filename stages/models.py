"""The networks `train.model` can name.

- mlp:       the original script's network, layer for layer.
- cnn:       a small BatchNorm convnet (the default): near the state of the art on CPU.
- cnn_large: a wider, deeper variant for users with more time or a GPU.

Each is a plain Keras model (augmentation happens in the training step, see
stages/augment.py), so the saved file needs no code of ours to load:
`keras.models.load_model("data/model/model.keras")`.
"""

from __future__ import annotations

from stages.dataset import IMAGE_SIDE
from stages.keras_env import keras

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
