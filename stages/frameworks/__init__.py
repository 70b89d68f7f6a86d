"""The seam between the pipeline and the frameworks that train and run its networks.

A framework F (`train.framework`) is a folder beside this file, F/, of three modules found
by name:

- F/env.py:   imports F, `configure(seed, intra_op_threads, inter_op_threads)` (seeds,
              deterministic kernels, pinned threads), `versions()`;
- F/model.py: the networks, `MODEL_FILE`, `save(model, model_dir)`, `load(model_dir)` and
              `predict(model, x, batch_size)` -> N×10;
- F/fit.py:   `fit(cfg, data, curves_dir)` -> the trained model;

and whatever else its training runs: the modules its loop imports (Keras' and PyTorch's
resample.py), the C program's source, and for PyTorch launcher.py (`launch(cfg, argv)`, the
data-parallel workers, asked for only when train.torch.workers > 1).

The train stage trains through them; evaluate gets probabilities through `predict()`
below, which reads from the model folder's run_info.json which framework made it. So
everything after train is framework-agnostic. dvc.yaml makes the chosen framework's folder
a dep of train (all of it runs there) and its env and model modules deps of evaluate.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np

from stages.runtime.failures import DataError
from stages.runtime.params import FRAMEWORKS

RUN_INFO = "run_info.json"


def module(framework: str, part: str):
    """stages/frameworks/{framework}/{part}.py, imported (part: env, model, fit, launcher)."""
    return importlib.import_module(f"stages.frameworks.{framework}.{part}")


def framework_of(model_dir: Path) -> str:
    """Which framework trained the model in model_dir, from its run_info.json."""
    path = Path(model_dir) / RUN_INFO
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: cannot read the model's run info ({err})") from None
    # Models from before the pipeline had a second framework were all Keras.
    framework = info.get("framework", "keras") if isinstance(info, dict) else None
    if framework not in FRAMEWORKS:
        raise DataError(f"{path}: framework {framework!r} is none of {', '.join(FRAMEWORKS)}")
    return framework


def predictor(model_dir: Path, intra_op_threads: int, inter_op_threads: int):
    """The model in model_dir, loaded once: a function (images, batch_size) -> N×10 float32
    class probabilities."""
    framework = framework_of(model_dir)
    module(framework, "env").configure(0, intra_op_threads, inter_op_threads)
    network = module(framework, "model")
    model = network.load(model_dir)
    return lambda x, batch_size: network.predict(model, x, batch_size)


def predict(model_dir: Path, x: np.ndarray, batch_size: int, intra_op_threads: int,
            inter_op_threads: int) -> np.ndarray:
    """The class probabilities of the model in model_dir for every image: N×10 float32."""
    return predictor(model_dir, intra_op_threads, inter_op_threads)(x, batch_size)
