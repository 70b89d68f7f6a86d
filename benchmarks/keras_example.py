"""Keras' code example "Simple MNIST convnet" (keras.io/examples/vision/mnist_convnet/), as
its page has it, for the frontier's well-known baseline: the same network, batch size,
epochs, optimizer and 10% validation split. Two changes: a seed (the example sets none),
and the data file comes from the command line instead of keras.datasets' download.

    python -m benchmarks.keras_example PATH/mnist.npz [SEED]

Prints one JSON line: test accuracy and errors, training seconds, multiply-adds per image
(benchmarks/frontier.py's count).
"""

import json
import sys
import time

import keras
import numpy as np
from keras import layers

from benchmarks.frontier import forward_macs

path, seed = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 42
keras.utils.set_random_seed(seed)

# Model / data parameters
num_classes = 10
input_shape = (28, 28, 1)

# Load the data and split it between train and test sets
with np.load(path) as data:
    (x_train, y_train), (x_test, y_test) = ((data["x_train"], data["y_train"]),
                                            (data["x_test"], data["y_test"]))

# Scale images to the [0, 1] range
x_train = x_train.astype("float32") / 255
x_test = x_test.astype("float32") / 255
# Make sure images have shape (28, 28, 1)
x_train = np.expand_dims(x_train, -1)
x_test = np.expand_dims(x_test, -1)

# convert class vectors to binary class matrices
y_train = keras.utils.to_categorical(y_train, num_classes)
y_test = keras.utils.to_categorical(y_test, num_classes)

model = keras.Sequential(
    [
        keras.Input(shape=input_shape),
        layers.Conv2D(32, kernel_size=(3, 3), activation="relu"),
        layers.MaxPooling2D(pool_size=(2, 2)),
        layers.Conv2D(64, kernel_size=(3, 3), activation="relu"),
        layers.MaxPooling2D(pool_size=(2, 2)),
        layers.Flatten(),
        layers.Dropout(0.5),
        layers.Dense(num_classes, activation="softmax"),
    ]
)

batch_size = 128
epochs = 15

model.compile(loss="categorical_crossentropy", optimizer="adam", metrics=["accuracy"])
started = time.perf_counter()
model.fit(x_train, y_train, batch_size=batch_size, epochs=epochs, validation_split=0.1,
          verbose=0)
seconds = time.perf_counter() - started

score = model.evaluate(x_test, y_test, verbose=0)
errors = int(np.sum(model.predict(x_test, verbose=0).argmax(1) != y_test.argmax(1)))
print(json.dumps({"test_accuracy": score[1], "test_errors": errors, "train_seconds": seconds,
                  "epochs": epochs, "images": int(len(x_train) * 0.9), "seed": seed,
                  "macs": forward_macs(model)}))
