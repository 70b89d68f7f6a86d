"""params.yaml: every section's keys, types and limits, checked in one place.

Every stage checks the whole file before its own work (`load()`): it takes milliseconds and
needs no TensorFlow, so a typo anywhere ends the first stage that runs, in seconds, with one
line naming the key and what is allowed. A stage's results depend only on the sections it
declares in dvc.yaml; the others it reads only to check them.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os

from stages.runtime.failures import ParamError

PARAMS_FILE = "params.yaml"
SECTIONS = ("dataset", "download", "normalize", "train", "evaluate", "render", "audit", "speed")
CLASSES = 10  # every network ends in 10 softmax outputs
MODEL_NAMES = ("mlp", "cnn", "cnn_large", "fast")  # the networks of stages/frameworks/*/model.py
FRAMEWORKS = ("keras", "torch", "c")  # each one folder: stages/frameworks/F/
C_MODELS = ("mlp", "cnn")  # what the plain-C programs implement (stages/frameworks/c/mnist_*.c)
# train.c.program: which C programs train: the fast ones (stages/frameworks/c/mnist_*.c) or
# the plain references a learner reads (stages/frameworks/c/reference/); their last bits differ.
C_PROGRAMS = ("fast", "reference")
C_CNN_MAX_BATCH = 2048  # mnist_cnn.c's MAX_CNN_BATCH: its buffers take ~0.8 MB an image
# train.<framework>.device, by each framework's own name for a GPU (TensorFlow's "GPU",
# PyTorch's "cuda"); cpu is the default, and C's only device.
DEVICES = {"keras": ("cpu", "gpu"), "torch": ("cpu", "cuda")}
FORMATS = ("npz", "idx")
IDX_NAMES = (  # the four files of a source in the original idx format
    "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz",
)
THREADS = (1, 1024)
MAX_WORKERS = 64  # train.torch.workers: processes of one data-parallel training
MAX_BATCH = 65_536
MAX_CLASS_NAME = 24  # characters: names are drawn beside images on the error sheets


# --- typed values -------------------------------------------------------------------


def _bad(where: str, value, allowed: str) -> ParamError:
    return ParamError(f"{where}: got {value!r}; allowed: {allowed}")


def check_keys(section: dict, where: str, allowed) -> None:
    """Refuse unknown keys (most often typos: suggest the likely key), then missing ones."""
    if not isinstance(section, dict):
        raise _bad(where, section, "a mapping of " + ", ".join(sorted(allowed)))
    allowed = set(allowed)
    for key in sorted(set(section) - allowed, key=str):
        close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ParamError(
            f"{where}.{key}: unknown key{hint}; allowed keys: {', '.join(sorted(allowed))}")
    for key in sorted(allowed - set(section)):
        raise ParamError(f"{where}.{key}: missing from {PARAMS_FILE}")


def integer(section: dict, where: str, key: str, lo: int, hi: int | None = None) -> int:
    value = section[key]
    allowed = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"{where}.{key}", value, allowed)
    if value < lo or (hi is not None and value > hi):
        raise _bad(f"{where}.{key}", value, allowed)
    return value


def number(section: dict, where: str, key: str, lo: float, hi: float,
           hi_open: bool = False) -> float:
    value = section[key]
    allowed = f"a number in [{lo}, {hi}{')' if hi_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(f"{where}.{key}", value, allowed)
    if math.isnan(value) or not lo <= value <= hi or (hi_open and value == hi):
        raise _bad(f"{where}.{key}", value, allowed)
    return float(value)


def choice(section: dict, where: str, key: str, choices) -> str:
    value = section[key]
    if not isinstance(value, str) or value not in choices:
        raise _bad(f"{where}.{key}", value, "one of " + ", ".join(choices))
    return value


def boolean(section: dict, where: str, key: str) -> bool:
    value = section[key]
    if not isinstance(value, bool):
        raise _bad(f"{where}.{key}", value, "true or false")
    return value


def text(value, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise _bad(where, value, "a URL or a path")
    return value


# --- the sections ----------------------------------------------------------------------


def dataset(p: dict) -> dict:
    check_keys(p, "dataset", {"classes"})
    names = p["classes"]
    allowed = (f"a list of {CLASSES} distinct names (strings or integers, 1 to "
               f"{MAX_CLASS_NAME} characters, one line each)")
    if not isinstance(names, list) or len(names) != CLASSES:
        raise _bad("dataset.classes", names, allowed)
    out = []
    for name in names:
        if isinstance(name, bool) or not isinstance(name, (str, int)):
            raise _bad("dataset.classes", names, allowed)
        name = str(name)
        if not 1 <= len(name) <= MAX_CLASS_NAME or not name.isprintable() or name != name.strip():
            raise _bad("dataset.classes", names, allowed)
        out.append(name)
    if len(set(out)) != CLASSES:
        raise _bad("dataset.classes", names, allowed)
    return {"classes": out}


def _is_sha256(value) -> bool:
    return (isinstance(value, str) and len(value) == 64
            and all(c in "0123456789abcdef" for c in value.lower()))


def _hashes(value, fmt: str, where: str):
    """npz: one hex digest. idx: a map from each of the four file names to its digest."""
    if value is None:
        return None
    if fmt == "npz":
        if not _is_sha256(value):
            raise _bad(where, value, "a 64-digit sha256 hex, or null")
        return value.lower()
    if not isinstance(value, dict) or set(value) != set(IDX_NAMES):
        raise _bad(where, value, f"for format idx, a map of {', '.join(IDX_NAMES)} "
                                 "to their sha256, or null")
    for name, digest in value.items():
        if not _is_sha256(digest):
            raise _bad(f"{where}.{name}", digest, "a 64-digit sha256 hex")
    return {k: v.lower() for k, v in value.items()}


def download(p: dict) -> dict:
    """Sources in the order they are tried: `url` first, then each mirror. Each source
    carries its own format and hash: a plain-string mirror shares `url`'s, a mapping
    {url, sha256, format} names its own (format npz when left out)."""
    where = "download"
    check_keys(p, where, {"url", "sha256", "format", "mirrors", "timeout", "retries", "backoff"})
    fmt = choice(p, where, "format", FORMATS)
    first = {"url": text(p["url"], f"{where}.url"),
             "sha256": _hashes(p["sha256"], fmt, f"{where}.sha256"), "format": fmt}
    mirrors = p["mirrors"] if p["mirrors"] is not None else []
    if not isinstance(mirrors, list):
        raise _bad(f"{where}.mirrors", mirrors, "a list")
    sources = [first]
    for i, mirror in enumerate(mirrors):
        at = f"{where}.mirrors[{i}]"
        if isinstance(mirror, str) and mirror:
            sources.append(dict(first, url=mirror))
        elif isinstance(mirror, dict) and {"url", "sha256"} <= set(mirror) <= {
                "url", "sha256", "format"}:
            mirror_fmt = choice(dict(format="npz") | mirror, at, "format", FORMATS)
            sources.append({"url": text(mirror["url"], f"{at}.url"),
                            "sha256": _hashes(mirror["sha256"], mirror_fmt, f"{at}.sha256"),
                            "format": mirror_fmt})
        else:
            raise _bad(at, mirror, "a URL, or {url, sha256, format}")
    return {
        "sources": sources,
        "timeout": number(p, where, "timeout", 0.001, 3600),
        "retries": integer(p, where, "retries", 0, 20),
        "backoff": number(p, where, "backoff", 0, 600),
    }


def normalize(p: dict) -> dict:
    check_keys(p, "normalize", {"sample_index"})
    # The upper bound depends on the data; normalize checks it once the data is loaded.
    return {"sample_index": integer(p, "normalize", "sample_index", 0)}


RECIPE_KEYS = ("epochs", "batch_size", "learning_rate", "lr_schedule", "val_fraction",
               "rotation", "shift", "zoom", "label_smoothing", "restore_best", "ema",
               "elastic", "elastic_sigma")


def recipe(p: dict, where: str) -> dict:
    """One model's training settings (train.mlp, train.cnn, train.cnn_large, train.fast)."""
    check_keys(p, where, RECIPE_KEYS)
    out = {
        "epochs": integer(p, where, "epochs", 1, 10_000),
        "batch_size": integer(p, where, "batch_size", 1, MAX_BATCH),
        "learning_rate": number(p, where, "learning_rate", 1e-7, 10.0),
        "lr_schedule": choice(p, where, "lr_schedule", ("constant", "cosine")),
        "val_fraction": number(p, where, "val_fraction", 0.0, 0.5),
        "rotation": number(p, where, "rotation", 0.0, 180.0),
        "shift": number(p, where, "shift", 0.0, 0.5),
        "zoom": number(p, where, "zoom", 0.0, 0.5, hi_open=True),
        "elastic": number(p, where, "elastic", 0.0, 100.0),
        "elastic_sigma": number(p, where, "elastic_sigma", 0.5, 20.0),
        "label_smoothing": number(p, where, "label_smoothing", 0.0, 0.5),
        "restore_best": boolean(p, where, "restore_best"),
        # 0 is off; a decay of 1 would never move from the initial weights.
        "ema": number(p, where, "ema", 0.0, 1.0, hi_open=True),
    }
    if out["restore_best"] and not out["val_fraction"]:
        raise _bad(f"{where}.restore_best", True,
                   f"false when {where}.val_fraction is 0 (no validation split to choose by)")
    return out


THREAD_KEYS = ("intra_op_threads", "inter_op_threads")
# train.<framework>: the settings of that framework that can change its results. Keras:
# the device and TensorFlow's two thread pools (their sizes change how sums are split, so
# the last bits). PyTorch: the device, the data-parallel workers and its two thread pools.
# C: which program, fast or reference (each gives the same bits for any thread count:
# `speed.c_threads`).
FRAMEWORK_KEYS = {"keras": ("device", *THREAD_KEYS),
                  "torch": ("device", "workers", *THREAD_KEYS), "c": ("program",)}


def framework_settings(p: dict, framework: str) -> dict:
    """train.<framework> checked; device and workers are cpu and 1 where it has none."""
    where = f"train.{framework}"
    check_keys(p, where, FRAMEWORK_KEYS[framework])
    out = {"device": "cpu", "workers": 1, "program": "fast"}
    if "program" in p:
        out["program"] = choice(p, where, "program", C_PROGRAMS)
    if "device" in p:
        out["device"] = choice(p, where, "device", DEVICES[framework])
    if "workers" in p:
        out["workers"] = integer(p, where, "workers", 1, MAX_WORKERS)
    return out | {key: integer(p, where, key, *THREADS) for key in THREAD_KEYS if key in p}


def speed(p: dict) -> dict:
    """Knobs that change how fast a stage runs and never what it writes: no stage lists
    them in dvc.yaml, so changing one reruns nothing."""
    where = "speed"
    check_keys(p, where, {"keras_steps_per_execution", "c_threads", "peer_timeout"})
    return {"keras_steps_per_execution": integer(p, where, "keras_steps_per_execution", 1,
                                                 100_000),
            "c_threads": integer(p, where, "c_threads", *THREADS),
            "peer_timeout": number(p, where, "peer_timeout", 1.0, 86_400.0)}


def check_c_model(framework: str, model: str, model_key: str, framework_key: str) -> None:
    if framework == "c" and model not in C_MODELS:
        raise _bad(model_key, model, f"{' or '.join(C_MODELS)} with {framework_key} c "
                   "(the plain-C programs implement the original network and the default "
                   "convnet)")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What one training run is: params.yaml's `train` section checked and resolved for the
    chosen framework and model. The train stage, the label audit's auditors and every
    framework's fit() read it; nothing changes it (dataclasses.replace makes a variant)."""

    framework: str  # train.framework: keras, torch or c
    model: str  # train.model: the network
    seed: int
    # train.<framework>: where and on how many threads it runs (C: speed.c_threads, one pool)
    device: str
    workers: int  # PyTorch's data-parallel processes; 1 elsewhere
    program: str  # train.c.program: the C programs, fast or reference; "fast" elsewhere
    intra_op_threads: int
    inter_op_threads: int
    steps_per_execution: int  # speed.keras_steps_per_execution: Keras' batches per call
    peer_timeout: float  # speed.peer_timeout: seconds a worker waits on a silent machine
    # train.<model>: the recipe
    epochs: int
    batch_size: int
    learning_rate: float
    lr_schedule: str
    val_fraction: float
    rotation: float
    shift: float
    zoom: float
    elastic: float
    elastic_sigma: float
    label_smoothing: float
    restore_best: bool
    ema: float


def train(p: dict, knobs: dict, framework_key: str = "train.framework") -> TrainConfig:
    """The shared settings, the chosen framework's own (train.<framework>) and the recipe of
    the model `train.model` names, as one TrainConfig; `knobs` is the checked `speed`
    section. framework_key: the key that chose the framework, as the messages name it."""
    where = "train"
    check_keys(p, where, {"framework", "model", "seed", *FRAMEWORKS, *MODEL_NAMES})
    recipes = {name: recipe(p[name], f"{where}.{name}") for name in MODEL_NAMES}
    framework = choice(p, where, "framework", FRAMEWORKS)
    # Every framework's section is checked, so a typo in one not chosen still fails early.
    settings = {name: framework_settings(p[name], name) for name in FRAMEWORKS}[framework]
    model = choice(p, where, "model", MODEL_NAMES)
    check_c_model(framework, model, f"{where}.model", framework_key)
    for key, missing, models in (("ema", "keeps no average of its weights", ("mlp",)),
                                 ("elastic", "has no elastic distortion", C_MODELS)):
        if framework == "c" and model in models and recipes[model][key]:
            raise _bad(f"{where}.{model}.{key}", recipes[model][key], f"0 with {framework_key} "
                       f"c (the plain-C program {missing})")
    batch = recipes[model]["batch_size"]
    if framework == "c" and model == "cnn" and batch > C_CNN_MAX_BATCH:
        raise _bad(f"{where}.cnn.batch_size", batch, f"at most {C_CNN_MAX_BATCH} with "
                   f"{framework_key} c (the program holds a batch's activations in memory)")
    if batch % settings["workers"]:
        raise _bad(f"{where}.torch.workers", settings["workers"], f"a divisor of "
                   f"train.{model}.batch_size ({batch}): every worker takes an equal share of "
                   "each batch")
    if framework == "c":  # one OpenMP pool
        settings |= {"intra_op_threads": knobs["c_threads"], "inter_op_threads": 1}
    return TrainConfig(
        framework=framework,
        model=model,
        seed=integer(p, where, "seed", 0, 2**31 - 1),
        **settings,
        steps_per_execution=knobs["keras_steps_per_execution"],
        peer_timeout=knobs["peer_timeout"],
        **recipes[model],
    )


def evaluate(p: dict) -> dict:
    check_keys(p, "evaluate", {"list_errors", "batch_size", "neighbours"})
    return {
        "list_errors": boolean(p, "evaluate", "list_errors"),
        "batch_size": integer(p, "evaluate", "batch_size", 1, MAX_BATCH),
        "neighbours": integer(p, "evaluate", "neighbours", 1, 100),
    }


def render(p: dict) -> dict:
    where = "render"
    check_keys(p, where, {"per_row", "errors_per_row", "neighbours_k", "top_confident",
                          "top_pairs"})
    return {
        "per_row": integer(p, where, "per_row", 1, 1000),
        "errors_per_row": integer(p, where, "errors_per_row", 1, 1000),
        "neighbours_k": integer(p, where, "neighbours_k", 1, 20),
        "top_confident": integer(p, where, "top_confident", 1, 10_000),
        "top_pairs": integer(p, where, "top_pairs", 1, CLASSES * (CLASSES - 1)),
    }


def audit(p: dict, train_section: dict, knobs: dict) -> dict:
    """The number of folds, and the auditors' TrainConfig: audit.framework, audit.model and
    audit.seed over train's sections (the framework's settings and the model's recipe),
    checked by train's rules when the audit is on (off, a recipe the auditor could not
    train is no error: nothing trains, and "train" is None)."""
    where = "audit"
    check_keys(p, where, {"folds", "framework", "model", "seed"})
    folds = integer(p, where, "folds", 0, 100)
    if folds == 1:
        raise _bad(f"{where}.folds", folds, "0 (off) or 2..100 folds")
    chosen = {"framework": choice(p, where, "framework", FRAMEWORKS),
              "model": choice(p, where, "model", MODEL_NAMES),
              "seed": integer(p, where, "seed", 0, 2**31 - 1)}
    check_c_model(chosen["framework"], chosen["model"], f"{where}.model", f"{where}.framework")
    if not folds:
        return {"folds": 0, "train": None}
    return {"folds": folds,
            "train": train(dict(train_section) | chosen, knobs, f"{where}.framework")}


CHECKS = {"dataset": dataset, "download": download, "normalize": normalize,
          "evaluate": evaluate, "render": render, "speed": speed}


def check(params) -> dict:
    """Every section checked, in pipeline order: {section: its checked settings}."""
    if not isinstance(params, dict):
        raise ParamError(f"{PARAMS_FILE}: got {type(params).__name__}; allowed: a mapping "
                         f"of sections {', '.join(SECTIONS)}")
    check_keys(params, PARAMS_FILE.removesuffix(".yaml"), SECTIONS)
    checked = {"speed": speed(params["speed"])}  # first: train reads it
    for name in SECTIONS:
        if name == "train":
            checked[name] = train(params[name], checked["speed"])
        elif name == "audit":
            checked[name] = audit(params[name], params["train"], checked["speed"])
        elif name not in checked:
            checked[name] = CHECKS[name](params[name])
    return {name: checked[name] for name in SECTIONS}


def read(path: str | os.PathLike = PARAMS_FILE) -> dict:
    # Imported here: the schema above, TrainConfig included, needs no PyYAML (a GPU
    # machine's check trains through it with NumPy and PyTorch only: benchmarks/gpu_check.py).
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        raise ParamError(f"{path} not found: run from the project root") from None
    except yaml.YAMLError as err:
        raise ParamError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ParamError(f"{path}: unreadable ({err})") from None


def load(path: str | os.PathLike = PARAMS_FILE) -> dict:
    """Read and check the whole file; every stage calls this before its own work."""
    return check(read(path))
