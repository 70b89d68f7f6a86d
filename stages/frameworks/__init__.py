"""The seam between the pipeline and the frameworks that train and run its networks.

A framework F (`train.framework`: keras, torch or c) is a folder beside this file:

- F/env.py:   imports F; `configure(seed, intra_op_threads, inter_op_threads)` (seeds,
              deterministic kernels, pinned threads) and `versions()` (for run_info.json);
- F/model.py: the networks, `MODEL_FILE`, `save(model, model_dir)`, `load(model_dir)` and
              `predict(model, x, batch_size)` -> N×10;
- F/fit.py:   `fit(cfg, data, curves_dir)` -> the trained model (cfg: params.TrainConfig);

and whatever else its training runs: the modules its loop imports (Keras' and PyTorch's
resample.py), the C programs' sources, and PyTorch's launcher.py (`launch(cfg, argv)`, the
data-parallel workers).

Two registries name them in code, and import one framework's modules only when it is asked
for, so a Keras run never imports PyTorch:

- `network(framework)` below: what runs a trained model (evaluate, mnist-predict, the
  committee), a `Network`;
- `trainer(framework)` in trainers.py: a `Trainer`, that Network with `fit` and, for
  PyTorch, the workers' `launch`.

The train stage trains through a Trainer; evaluate gets probabilities through `predictor()`
below, which reads from the model folder's run_info.json which framework made it. So
everything after train is framework-agnostic. dvc.yaml makes the chosen framework's folder
a dep of train (all of it runs there) and its env and model modules deps of evaluate.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.frameworks.files import RUN_INFO_CAP, read_capped
from stages.runtime.failures import DataError
from stages.runtime.params import FRAMEWORKS

RUN_INFO = "run_info.json"


@dataclass(frozen=True)
class Network:
    """One framework's networks as a trained model needs them: set up the framework, say
    what the bits depend on, and save, load and run a model."""

    framework: str
    configure: Callable[[int, int, int], None]  # (seed, intra_op_threads, inter_op_threads)
    versions: Callable[[], dict]
    model_file: str  # the file in the model folder that holds the weights
    save: Callable[[Any, Path], None]
    load: Callable[[Path], Any]
    predict: Callable[[Any, np.ndarray, int], np.ndarray]  # (model, x, batch_size) -> N×10


def network(framework: str) -> Network:
    """The named framework's Network; imports that framework only."""
    match framework:
        case "keras":
            from stages.frameworks.keras import env, model
        case "torch":
            from stages.frameworks.torch import env, model
        case "c":
            from stages.frameworks.c import env, model
        case _:
            raise DataError(f"framework {framework!r} is none of {', '.join(FRAMEWORKS)}")
    return Network(framework, env.configure, env.versions, model.MODEL_FILE, model.save,
                   model.load, model.predict)


def framework_of(model_dir: Path) -> str:
    """Which framework trained the model in model_dir, from its run_info.json."""
    path = Path(model_dir) / RUN_INFO
    data = read_capped(path, RUN_INFO_CAP, "model's run info")
    try:
        info = json.loads(data)
    except (ValueError, RecursionError) as err:  # RecursionError: nested past the stack
        raise DataError(f"{path}: cannot read the model's run info ({err})") from None
    # A run_info.json without the key: a Keras model (Keras was the first framework).
    framework = info.get("framework", "keras") if isinstance(info, dict) else None
    if framework not in FRAMEWORKS:
        raise DataError(f"{path}: framework {framework!r} is none of {', '.join(FRAMEWORKS)}")
    return framework


def predictor(model_dir: Path, intra_op_threads: int, inter_op_threads: int):
    """The model in model_dir, loaded once: a function (images, batch_size) -> N×10 float32
    class probabilities."""
    net = network(framework_of(model_dir))
    net.configure(0, intra_op_threads, inter_op_threads)
    model = net.load(model_dir)
    return lambda x, batch_size: net.predict(model, x, batch_size)


def predict(model_dir: Path, x: np.ndarray, batch_size: int, intra_op_threads: int,
            inter_op_threads: int) -> np.ndarray:
    """The class probabilities of the model in model_dir for every image: N×10 float32."""
    return predictor(model_dir, intra_op_threads, inter_op_threads)(x, batch_size)
