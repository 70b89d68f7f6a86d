"""The PyTorch CUDA path, checked once on a lent GPU machine: the default cnn trained by the
train stage's own fit() on MNIST, twice on the GPU (the same bits?) and once on the CPU (the
GPU's test accuracy within a band of the CPU's?), timed side by side.

Written for a machine that has Python, NumPy and a CUDA build of PyTorch only: no
TensorFlow, DVC, dvclive, PyYAML or tqdm, no network. So it imports NumPy, PyTorch and the
project's PyTorch modules, and gets past the two imports of theirs that serve the stage
rather than the training (import_torch_path, EpochLog). It reads MNIST's raw npz (Keras'
layout) and scales and splits it as the normalize and train stages do; the recipe is
params.yaml's `train.cnn`, copied below (a test holds the copy to the file).

    python -m benchmarks.gpu_check --data data/raw/mnist.npz --out gpu-check

prints a plan line, one line per epoch and per run, and a summary, writes
`gpu_check.json` into --out after every run (so a run cut short still leaves the runs
done), and exits 1 with one `error:` line when a check fails or there is no GPU.
`--device cpu --epochs 1 --limit 300` is the smoke run the tests make here, on the CPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from importlib.machinery import ModuleSpec
from importlib.util import module_from_spec
from pathlib import Path

import numpy as np

from stages.runtime.machine import cpu_model
from stages.runtime.params import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
OUT_FILE = "gpu_check.json"
SEED = 42  # params.yaml's train.seed
# params.yaml's train.cnn: the default network's recipe (tests/unit/test_gpu_check.py).
RECIPE = {
    "epochs": 24, "batch_size": 128, "learning_rate": 0.002, "lr_schedule": "cosine",
    "val_fraction": 0.05, "rotation": 10.0, "shift": 0.1, "zoom": 0.1, "elastic": 0.0,
    "elastic_sigma": 4.0, "label_smoothing": 0.1, "restore_best": False, "ema": 0.0,
}
# The largest gap allowed between the GPU's test accuracy and the CPU's, as a fraction.
# After 3 epochs the cnn scored 99.35-99.40% in the three frameworks, and the full recipe's
# seeds spread over about 0.1 points (RESULTS.md): a GPU run is one more draw of that noise
# (other kernels, other bits). Half a point is a wide margin; a broken path lands far out.
BAND = 0.005


def import_torch_path() -> tuple:
    """The train stage's PyTorch modules (env, fit, model), importable where only NumPy
    and PyTorch are. One of their imports serves the stage, not the training: fit.py's
    progress bar, tqdm, drawn only when stdout is a terminal; where tqdm is missing, a
    stand-in that draws nothing. The other, fit()'s dvclive curves, is replaced by
    EpochLog in train_once().
    """
    try:
        import tqdm  # noqa: F401
    except ImportError:
        # With a spec of no origin: PyTorch's compiler asks find_spec("tqdm") at import.
        sys.modules["tqdm"] = module_from_spec(ModuleSpec("tqdm", None))
        sys.modules["tqdm"].tqdm = NoBar
    from stages.frameworks.torch import env, fit, model

    return env, fit, model


class NoBar:
    """tqdm's interface as fit() uses it, drawing nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def update(self, *args):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def close(self):
        pass


class EpochLog:
    """fit()'s epoch report without dvclive: the train stage's epoch line on stdout, and
    each epoch's numbers kept for the result file (stages/training/epochs.py: Curves)."""

    def __init__(self, epochs: int, rows: list):
        self.epochs, self.rows = epochs, rows

    def epoch(self, epoch: int, seconds: float, logs: dict, train_accuracy: float) -> None:
        shown = logs | {"train/accuracy": train_accuracy}
        self.rows.append({"epoch": epoch, "seconds": round(seconds, 2)}
                         | {k: round(v, 6) for k, v in shown.items()})
        print(f"  epoch {epoch}/{self.epochs} {seconds:.1f}s "
              + " ".join(f"{k}={v:.4f}" for k, v in shown.items()), flush=True)

    def close(self, validated: bool) -> None:
        pass


def config(device: str, epochs: int, threads: int) -> TrainConfig:
    """What fit() gets from the train stage for `train.framework: torch`, `train.model:
    cnn` and `train.torch.device: <device>` with the shipped params (one worker, `threads`
    intra-op threads, one inter-op thread), the recipe's epochs changed."""
    return TrainConfig(framework="torch", model="cnn", seed=SEED, device=device, workers=1,
                       program="fast", intra_op_threads=threads, inter_op_threads=1,
                       steps_per_execution=100, peer_timeout=180.0,
                       **RECIPE | {"epochs": epochs})


def load(path: str, limit: int | None) -> tuple[dict, np.ndarray, np.ndarray]:
    """fit()'s data as the train stage gives it (the first `limit` training images, scaled
    to [0, 1] as normalize does, split with the seed), and the test images and labels."""
    from stages.data.mnist import load_mnist, scale, validation_split

    raw = load_mnist(path)  # checked: keys, shapes, dtypes, labels
    x = scale(raw["x_train"][:limit])
    y = raw["y_train"][:limit]
    train_idx, val_idx = validation_split(len(y), RECIPE["val_fraction"], SEED)
    data = {"x_train": x[train_idx], "y_train": y[train_idx],
            "x_val": x[val_idx], "y_val": y[val_idx]}
    return data, scale(raw["x_test"]), raw["y_test"]


def weights_sha256(model) -> str:
    """sha256 of every tensor of the model's state dict, names and bytes in order: what its
    model.safetensors holds (safetensors itself need not be on the GPU machine)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def train_once(modules: tuple, cfg: TrainConfig, data: dict, x_test, y_test) -> dict:
    """One training as the train stage runs it (configure, then fit), timed as the stage
    times it (fit alone), then scored on the test set on the CPU, as evaluate does."""
    env, torch_fit, network = modules
    rows: list = []
    # fit() builds its report as Curves(curves_dir, epochs): this run's EpochLog instead.
    torch_fit.Curves = lambda _curves_dir, epochs: EpochLog(epochs, rows)
    env.configure(cfg.seed, cfg.intra_op_threads, cfg.inter_op_threads)
    started = time.perf_counter()
    model = torch_fit.fit(cfg, dict(data), None)  # it pops the arrays from the dict it gets
    seconds = time.perf_counter() - started
    predicted = network.predict(model, x_test, 1000).argmax(1)
    images = len(data["y_train"]) * cfg.epochs
    return {"device": cfg.device, "seconds": round(seconds, 2),
            "images_per_s": round(images / seconds, 1),
            "test_accuracy": float((predicted == y_test).mean()),
            "test_errors": int((predicted != y_test).sum()),
            "sha256": weights_sha256(model), "epochs": rows}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="MNIST's raw npz (Keras' layout)")
    parser.add_argument("--out", required=True, type=Path, help="folder for " + OUT_FILE)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                        help="the device checked (cpu: the smoke run)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of each run")
    parser.add_argument("--limit", type=int, default=None,
                        help="train on the first N training images only")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="PyTorch's intra-op threads (the CPU run's speed)")
    parser.add_argument("--band", type=float, default=BAND,
                        help="largest allowed |GPU - CPU| test accuracy, as a fraction")
    args = parser.parse_args(argv)

    modules = import_torch_path()
    env = modules[0]
    torch = env.torch
    env.configure(SEED, args.threads, 1)  # before CUDA starts: cuBLAS reads its setting then
    where = env.device(args.device)  # one line when there is no GPU
    card = torch.cuda.get_device_name(where) if where.type == "cuda" else cpu_model()
    data, x_test, y_test = load(args.data, args.limit)
    n, n_val = len(data["y_train"]), len(data["y_val"])
    print(f"plan: the cnn (params.yaml's train.cnn) for {args.epochs} epoch(s) on {n} images "
          f"({n_val} held out), scored on {len(y_test)} test images: twice on "
          f"{args.device} ({card}), then once on the CPU ({args.threads} threads); torch "
          f"{torch.__version__}, CUDA {torch.version.cuda or 'none'}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    result = {"plan": {"device": args.device, "card": card, "epochs": args.epochs,
                       "train_images": n, "val_images": n_val, "test_images": len(y_test),
                       "cpu": cpu_model(), "cpu_threads": args.threads, "band": args.band,
                       "seed": SEED,
                       "recipe": RECIPE},
              "runs": []}
    for name, device in (("first", args.device), ("second", args.device), ("cpu", "cpu")):
        print(f"{name} run, on {device}:", flush=True)
        run = train_once(modules, config(device, args.epochs, args.threads), data, x_test,
                         y_test)
        result["runs"].append({"run": name} | run)
        if device == args.device and "versions" not in result:
            result["versions"] = env.versions()  # what run_info.json records: the GPU too
        print(f"{name} run: {run['seconds']:.1f}s ({run['images_per_s']:.0f} images/s), "
              f"test accuracy {run['test_accuracy']:.4f} ({run['test_errors']} errors)",
              flush=True)
        (args.out / OUT_FILE).write_text(json.dumps(result, indent=2) + "\n")

    first, second, cpu = result["runs"]
    gap = first["test_accuracy"] - cpu["test_accuracy"]
    result["checks"] = {
        "identical": first["sha256"] == second["sha256"],
        "accuracy_gap": round(gap, 6),
        "within_band": abs(gap) <= args.band,
        "run_info_names_the_gpu": args.device == "cpu" or bool(result["versions"].get("gpu")),
        "speedup": round(cpu["seconds"] / second["seconds"], 2),  # the warm GPU run
    }
    (args.out / OUT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    checks = result["checks"]
    print(f"{args.device} ({card}): {second['seconds']:.1f}s, CPU ({args.threads} threads): "
          f"{cpu['seconds']:.1f}s, {checks['speedup']}x; reruns bit-identical: "
          f"{checks['identical']}; test accuracy {first['test_accuracy']:.4f} against the "
          f"CPU's {cpu['test_accuracy']:.4f} (band ±{args.band})")
    failed = [name for name in ("identical", "within_band", "run_info_names_the_gpu")
              if not checks[name]]
    if failed:
        from stages.runtime.failures import PipelineError

        raise PipelineError(f"gpu check failed: {', '.join(failed)} (see {args.out / OUT_FILE})")


if __name__ == "__main__":
    from stages.runtime.failures import run

    run(main)
