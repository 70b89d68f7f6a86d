"""The original script's training, as it was: plain model.fit on NumPy arrays.

Same network and settings as `train.model: mlp` (Flatten -> Dense 128 relu -> Dropout 0.2
-> Dense 10 softmax, Adam defaults, batch 32, 5 epochs, float64 pixels / 255.0, no
validation split, no seed, Keras' default compile). Prints one JSON line of results.
"""

import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402


def main(path: str) -> None:
    started = time.perf_counter()
    with np.load(path) as data:
        x_train, y_train = data["x_train"] / 255.0, data["y_train"]
        x_test, y_test = data["x_test"] / 255.0, data["y_test"]
    model = keras.models.Sequential([
        keras.layers.Flatten(input_shape=(28, 28)),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dropout(0.2),
        keras.layers.Dense(10, activation="softmax"),
    ])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    fit_started = time.perf_counter()
    model.fit(x_train, y_train, epochs=5, verbose=0)
    train_seconds = time.perf_counter() - fit_started
    loss, accuracy = model.evaluate(x_test, y_test, verbose=0)
    print(json.dumps({"train_seconds": train_seconds, "accuracy": accuracy,
                      "process_seconds": time.perf_counter() - started}))


if __name__ == "__main__":
    main(sys.argv[1])
