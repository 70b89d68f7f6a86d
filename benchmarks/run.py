"""`make bench`: side-by-side measurements on the full dataset, printed as ratios.

1. Training speed and memory: the original script's training (benchmarks/original.py)
   against this pipeline's train stage with `train.model: mlp` and the original settings,
   alternating runs in one session so that machine noise hits both alike.
2. Rendering: every mosaic, pasted one tile at a time with PIL as the original did,
   against stages.analysis.mosaic.tile (benchmarks/mosaics.py).
3. Frameworks: each of `--models` (default: mlp) trained by the train stage in Keras, in
   PyTorch and (the mlp and the cnn) in plain C with the shipped params, twice each,
   alternating: training time, images/s, the arithmetic (dense GFLOP/s against this
   machine's measured peak, benchmarks/fma_peak.c, probed before every run; the mlp's
   executed GFLOP/s in C, which skips zero pixels), peak RSS, test accuracy, and whether
   the forced rerun gave the same model bytes; and the C cnn's GFLOP/s layer by layer,
   forward and backward, from the program's own timers.
   `--epochs N` shortens every recipe (for the convnets: speed and determinism in minutes;
   their accuracy over seeds comes from 5.).
4. Workers: each of `--models` trained in PyTorch by 1 and by 2 data-parallel workers
   (`train.torch.workers`), the same columns: the images/s of both on this machine.
5. mnist-predict's preprocessing (benchmarks/predict.py): time and peak memory per image
   file from 28×28 to 8000×8000, PNG and JPEG; JPEG read at reduced scale against a full
   decode.
6. Only when asked (`--only frontier`, hours): the accuracy/cost frontier
   (benchmarks/frontier.py): each of `--models` (e.g. fast cnn) trained and evaluated once
   per `--seeds`, committees of `--committees K` of those seeds, Keras' "Simple MNIST
   convnet" (benchmarks/keras_example.py) once per `--peer-seeds`, and the published
   points: test errors (mean, spread, by verdict) against multiply-adds × images × epochs
   and seconds here; `--plot DIR` draws it and each preset's validation curve.
7. Only when asked (`--only cnn`, minutes per run): the convnet `--model` (default params
   otherwise) trained by `--framework` and evaluated by the stages once per `--seeds`, for
   test errors and time: how much of a result is the seed.

8. Only when asked (`--only hosts`, as root, minutes): two test hosts with a network between
   them (benchmarks/hosts.py): push and pull through the S3 object store, and data-parallel
   training on one host and across both, images/s.

Usage: python -m benchmarks.run [--data PATH] [--repeats N]
       [--only train|mosaics|frameworks|workers|predict|frontier|cnn|hosts]
       [--models mlp cnn] [--epochs N]
       [--model cnn|cnn_large] [--framework keras|torch|c] [--seeds 1 2 3]
       [--set KEY=VALUE ...]   (--only frontier: a variant of each preset's recipe)
       [--committees K ...] [--peer-seeds SEED ...] [--seeds-for MODEL=SEEDS ...]
       [--plot DIR] [--keep DIR]   (--only frontier)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks import frontier
from benchmarks.committees import errors_of
from benchmarks.train_runs import DEFAULT_DATA, train_seconds, trained_images
from stages.runtime.params import C_MODELS, MODEL_NAMES
from testbed.pipeline import paths, stage_command

ROOT = Path(__file__).resolve().parent.parent

# The original network and settings: the shipped mlp recipe, on one thread per pool (for a
# network this small TensorFlow spends more time handing ops between threads than on them).
ONE_THREAD = {"intra_op_threads": 1, "inter_op_threads": 1}
MLP_PRESET = {"train": {"model": "mlp", "keras": ONE_THREAD, "torch": ONE_THREAD},
              "speed": {"c_threads": 1}}


def deep_update(base: dict, changes: dict) -> None:
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = value


def run_child(args: list[str], cwd: Path) -> dict:
    """Run a child under /usr/bin/time-like accounting: wall time and peak RSS (MB)."""
    started = time.perf_counter()
    proc = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    # wait4 gives this child's own rusage, unlike getrusage(RUSAGE_CHILDREN) which sums.
    out = proc.stdout.read().decode()
    err = proc.stderr.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"benchmark child failed: {' '.join(map(str, args))}\n{err[-3000:]}")
    return {"stdout": out, "wall": time.perf_counter() - started,
            "peak_rss_mb": usage.ru_maxrss / 1024}


def prepare_project(data: Path, preset: dict) -> Path:
    """A scratch copy of the pipeline with `preset` over params.yaml, data ready to train."""
    tmp = Path(tempfile.mkdtemp(prefix="mnist-bench-"))
    shutil.copytree(ROOT / "stages", tmp / "stages",
                    ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["download"].update(url=str(data.resolve()), sha256=None, format="npz", mirrors=[])
    deep_update(params, preset)
    (tmp / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in ("download", "normalize"):
        run_child(stage_command(stage), tmp)
    return tmp


def bench_train(data: Path, repeats: int) -> dict:
    project = prepare_project(data, MLP_PRESET)
    original, stage = [], []
    try:
        for _ in range(repeats):
            child = run_child([sys.executable, str(ROOT / "benchmarks" / "original.py"),
                               str(data)], ROOT)
            original.append({**json.loads(child["stdout"].strip().splitlines()[-1]),
                             "peak_rss_mb": child["peak_rss_mb"]})
            child = run_child(stage_command("train"), project)
            seconds = train_seconds(child["stdout"])
            run_child(stage_command("evaluate"), project)
            metrics = json.loads((project / paths()["metrics"]).read_text())
            stage.append({"train_seconds": seconds, "process_seconds": child["wall"],
                          "accuracy": metrics["accuracy"], "peak_rss_mb": child["peak_rss_mb"]})
    finally:
        shutil.rmtree(project, ignore_errors=True)

    def med(runs, key):
        return statistics.median(r[key] for r in runs)

    result = {"repeats": repeats, "original": original, "stage": stage}
    for key in ("train_seconds", "process_seconds", "peak_rss_mb"):
        result[f"{key}_ratio"] = med(stage, key) / med(original, key)
    return result


def train_and_evaluate(project: Path, seed: int) -> tuple[dict, dict]:
    """The project's train stage run with `seed`, then evaluate: the train child (output,
    time, peak RSS) and the test metrics."""
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["seed"] = seed
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    child = run_child(stage_command("train"), project)
    run_child(stage_command("evaluate"), project)
    return child, json.loads((project / paths()["metrics"]).read_text())


def bench_cnn(data: Path, model: str, seeds: list[int], framework: str = "keras") -> list[dict]:
    """Train and evaluate `model` with the default params once per seed, via the stages."""
    project = prepare_project(data, {"train": {"model": model, "framework": framework}})
    runs = []
    try:
        for seed in seeds:
            child, metrics = train_and_evaluate(project, seed)
            seconds = train_seconds(child["stdout"])
            last_epoch = [line for line in child["stdout"].splitlines()
                          if line.startswith("epoch ")][-1]
            val = re.search(r"eval/accuracy=([\d.]+)", last_epoch)
            runs.append({"seed": seed, "train_seconds": seconds,
                         "val_accuracy": float(val.group(1)) if val else None,
                         "test_accuracy": metrics["accuracy"], "test_errors": metrics["errors"],
                         "peak_rss_mb": child["peak_rss_mb"]})
            print(json.dumps(runs[-1]), flush=True)
    finally:
        shutil.rmtree(project, ignore_errors=True)
    return runs


def epoch_log(stdout: str) -> list[tuple[float, float | None]]:
    """(seconds, validation accuracy or None) of each epoch, from the train stage's lines
    `epoch 3/24 41.2s ... eval/accuracy=0.9931 ...`."""
    log = []
    for line in stdout.splitlines():
        found = re.match(r"epoch \d+/\d+ ([\d.]+)s", line)
        if found:
            val = re.search(r"eval/accuracy=([\d.]+)", line)
            log.append((float(found[1]), float(val[1]) if val else None))
    return log


def recipe_changes(pairs: list[str]) -> dict:
    """`--set ema=0.999 elastic=0` -> {"ema": 0.999, "elastic": 0} (values read as YAML)."""
    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"error: --set {pair!r}: expected KEY=VALUE, e.g. ema=0.999")
        changes[key] = yaml.safe_load(value)
    return changes


def seeds_for(pairs: list[str]) -> dict[str, list[int]]:
    """`--seeds-for cnn=42 fast=1,2` -> {"cnn": [42], "fast": [1, 2]}."""
    out = {}
    for pair in pairs:
        model, sep, seeds = pair.partition("=")
        try:
            if not sep or model not in MODEL_NAMES:
                raise ValueError
            out[model] = [int(seed) for seed in seeds.split(",")]
        except ValueError:
            raise SystemExit(f"error: --seeds-for {pair!r}: expected MODEL=SEED[,SEED...] "
                             f"with MODEL one of {', '.join(MODEL_NAMES)}") from None
    return out


def variant(model: str, changes: dict) -> str:
    """A frontier row's name: the preset, and the recipe keys changed from its params."""
    return model + (f" ({', '.join(f'{k}={v}' for k, v in changes.items())})"
                    if changes else "")


def bench_frontier(data: Path, models: list[str], seeds: list[int], epochs: int | None,
                   changes: dict | None = None, committees: tuple[int, ...] = (),
                   peer_seeds: tuple[int, ...] = (), keep: Path | None = None,
                   seeds_for: dict[str, list[int]] | None = None) -> dict:
    """Each preset trained and evaluated by the stages once per seed (Keras, shipped params
    but the seed and `changes` to its recipe; `epochs` shortens them); committees of k of
    its seeds (consecutive, disjoint sets) from the runs' test probabilities; Keras' "Simple
    MNIST convnet" once per peer seed (benchmarks/keras_example.py). Returns the frontier's
    rows (benchmarks/frontier.py) and each preset's validation curves; `keep`: a folder
    where each run's test probabilities stay ({preset}-{seed}.npz), to combine later;
    `seeds_for`: other seeds for some presets (e.g. one seed of the slow default)."""
    import numpy as np

    rows, curves, val_images = [], {}, 0
    changes = dict(changes or {})
    for model in models:
        name = variant(model, changes)
        recipe = changes | ({"epochs": epochs} if epochs else {})
        project = prepare_project(data, {"train": {"model": model, model: recipe}})
        runs, probabilities = [], []
        try:
            y = np.load(project / paths()["raw"])["y_test"]
            for seed in (seeds_for or {}).get(model, seeds):
                child, metrics = train_and_evaluate(project, seed)
                log = epoch_log(child["stdout"])
                runs.append({"seed": seed, "epochs": len(log),
                             "images": trained_images(child["stdout"]),
                             "train_seconds": train_seconds(child["stdout"]),
                             "test_errors": metrics["errors"],
                             "test_accuracy": metrics["accuracy"],
                             **{k: metrics[k] for k in ("label_errors", "ambiguous",
                                                         "model_errors") if k in metrics}})
                print(json.dumps(runs[-1]), flush=True)
                curves.setdefault(name, []).append(log)
                held_out = re.search(r"(\d+) held out for validation", child["stdout"])
                val_images = int(held_out[1]) if held_out else val_images
                with np.load(project / paths()["predictions"]) as f:
                    probabilities.append(f["probabilities"])
                if keep:
                    keep.mkdir(parents=True, exist_ok=True)
                    shutil.copy(project / paths()["predictions"], keep / f"{model}-{seed}.npz")
        finally:
            shutil.rmtree(project, ignore_errors=True)
        macs = frontier.preset_macs(model)
        rows.append(frontier.measured_row(name, runs, macs))
        for k in committees:
            sets = [list(range(i, i + k)) for i in range(0, len(runs) - k + 1, k)]
            if not sets:
                continue
            members = []
            for chosen in sets:
                errors = errors_of(y, [probabilities[i] for i in chosen])
                members.append({"seed": "+".join(str(runs[i]["seed"]) for i in chosen),
                                "epochs": runs[0]["epochs"], "images": runs[0]["images"],
                                "train_seconds": statistics.mean(runs[i]["train_seconds"]
                                                                 for i in chosen),
                                "test_errors": errors, "test_accuracy": 1 - errors / len(y)})
            print(json.dumps({"committee": k, "of": name, "sets": members}), flush=True)
            rows.append(frontier.measured_row(f"{name}, committee of {k}", members, macs, k))
    if peer_seeds:
        runs = []
        for seed in peer_seeds:
            child = run_child([sys.executable, "-m", "benchmarks.keras_example", str(data),
                               str(seed)], ROOT)
            runs.append(json.loads(child["stdout"].strip().splitlines()[-1]))
            print(json.dumps(runs[-1]), flush=True)
        rows.append(frontier.measured_row('Keras example "Simple MNIST convnet"', runs,
                                          runs[0]["macs"]) | {"peer": True})
    return {"rows": rows + frontier.published_rows(), "curves": curves,
            "val_images": val_images}


def model_digest(project: Path) -> str:
    """One sha256 over every file of the train stage's model folder."""
    digest = hashlib.sha256()
    for f in sorted((project / paths()["model_dir"]).iterdir()):
        digest.update(f.name.encode() + f.read_bytes())
    return digest.hexdigest()


def bench_frameworks(data: Path, models: list[str], epochs: int | None) -> list[dict]:
    """Each model trained by each framework with the shipped params, twice (alternating
    frameworks, so machine noise hits both alike); evaluated after the first run."""
    variants = {}
    for model in models:
        for framework in ("keras", "torch", "c") if model in C_MODELS else ("keras", "torch"):
            variants[model, framework, 1] = {"framework": framework, "model": model}
    return bench_variants(data, variants, epochs)


def bench_workers(data: Path, models: list[str], epochs: int | None) -> list[dict]:
    """Each model trained in PyTorch by 1 and by 2 data-parallel workers, as above."""
    return bench_variants(data, {(model, "torch", workers): {
        "framework": "torch", "model": model, "torch": {"workers": workers}}
        for model in models for workers in (1, 2)}, epochs)


def bench_variants(data: Path, variants: dict, epochs: int | None) -> list[dict]:
    """Each variant ((model, framework, workers) -> train params) trained by the train
    stage twice, alternating; evaluated after the first run."""
    projects = {}
    for key, train in variants.items():
        preset = {"train": dict(train)}
        if epochs:
            preset["train"][train["model"]] = {"epochs": epochs}
        projects[key] = prepare_project(data, preset)
    runs = {key: [] for key in projects}
    try:
        for attempt in range(2):
            for key, project in projects.items():
                probed = fma_peak()[os.cpu_count()]  # just before: these machines are noisy
                child = run_child(stage_command("train"), project)
                runs[key].append({"seconds": train_seconds(child["stdout"]),
                                  "images": trained_images(child["stdout"]),
                                  "peak_gflops": probed, "layers": layer_times(child["stdout"]),
                                  **arithmetic(child["stdout"]),
                                  "peak_rss_mb": child["peak_rss_mb"],
                                  "digest": model_digest(project)})
                if attempt == 0:
                    run_child(stage_command("evaluate"), project)
                    runs[key][0]["metrics"] = json.loads(
                        (project / paths()["metrics"]).read_text())
        rows = []
        for (model, framework, workers), (first, second) in runs.items():
            cfg = yaml.safe_load((projects[model, framework, workers] / "params.yaml")
                                 .read_text())
            n_epochs = cfg["train"][model]["epochs"]
            seconds = min(first["seconds"], second["seconds"])
            per_image = dense_flops_per_image(model)
            fastest = min((first, second), key=lambda run: run["seconds"])
            extra = {}
            if per_image:
                extra["dense_gflops"] = n_epochs * first["images"] * per_image / seconds / 1e9
            if "executed_gflop" in fastest:
                extra["executed_gflops"] = fastest["executed_gflop"] / fastest["program_seconds"]
            extra["peak_gflops"] = max(first["peak_gflops"], second["peak_gflops"])
            if fastest["layers"]:
                extra["layers"] = fastest["layers"]
            rows.append({"model": model, "framework": framework, "workers": workers,
                         "epochs": n_epochs, **extra,
                         "train_seconds": [first["seconds"], second["seconds"]],
                         "images_per_second": n_epochs * first["images"] / seconds,
                         "peak_rss_mb": max(first["peak_rss_mb"], second["peak_rss_mb"]),
                         "test_accuracy": first["metrics"]["accuracy"],
                         "test_errors": first["metrics"]["errors"],
                         "rerun_bit_identical": first["digest"] == second["digest"]})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        for project in projects.values():
            shutil.rmtree(project, ignore_errors=True)
    return rows


# Multiply-adds of one image's forward pass through the cnn, layer by layer: conv1 (24×24
# outputs, 5×5 window, 32 channels), conv2 (8×8, 5×5×32, 64), conv3 (4×4, 3×3×64, 128), dense.
CNN_MACS = {"conv1": 24 * 24 * 25 * 32, "conv2": 8 * 8 * 800 * 64, "conv3": 4 * 4 * 576 * 128,
            "dense": 2048 * 10}


def dense_flops_per_image(model: str) -> int | None:
    """Floating-point operations one training image costs a dense implementation (a
    multiply-add counts 2). mlp: forward 784×128 and 128×10, backward the gradients of both
    weight matrices and of the hidden layer (none for the input). cnn: forward, and
    backward the weights' and the inputs' gradients of every layer but conv1 (no input
    gradient): 28.7M. The per-step Adam update and the elementwise work (ReLU, dropout,
    softmax, pooling, BatchNorm) are left out: under 3% of either."""
    if model == "mlp":
        return 2 * (784 * 128 + 128 * 10) + 2 * (784 * 128 + 128 * 10 + 128 * 10)
    if model == "cnn":
        return 2 * (3 * sum(CNN_MACS.values()) - CNN_MACS["conv1"])
    return None


def fma_peak(threads: tuple[int, ...] | None = None) -> dict[int, float]:
    """This machine's float32 GFLOP/s now, for each thread count (default: 1 and all
    cores): benchmarks/fma_peak.c, built once with the C programs' compiler and flags."""
    from stages.frameworks.c import env

    threads = threads or tuple(sorted({1, os.cpu_count()}))
    source = ROOT / "benchmarks" / "fma_peak.c"
    program = ROOT / "build" / "bench" / "fma_peak"
    cc = env.compiler()
    flags = [*env.CFLAGS, *([env.OPENMP] if env.has_openmp(cc) else [])]  # as fit.build()
    if not program.exists() or program.stat().st_mtime < source.stat().st_mtime:
        program.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([cc, *flags, "-o", str(program), str(source)], check=True, timeout=300)
    out = subprocess.run([str(program), *map(str, threads)], capture_output=True, text=True,
                         check=True, timeout=300).stdout
    return {int(t): float(g) for t, g in re.findall(r"threads=(\d+) gflops=([\d.]+)", out)}


def layer_times(stdout: str) -> dict:
    """The C cnn's `layer NAME forward_gflop=F forward_seconds=S backward_gflop=G
    backward_seconds=T` lines: {NAME: (F, S, G, T)}."""
    return {m[0]: tuple(map(float, m[1:])) for m in re.findall(
        r"^layer (\w+) forward_gflop=([\d.]+) forward_seconds=([\d.]+) "
        r"backward_gflop=([\d.]+) backward_seconds=([\d.]+)", stdout, re.M)}


def layers_table(row: dict) -> str:
    """One C cnn run's GFLOP/s layer by layer against the measured peak."""
    peak = row["peak_gflops"]
    lines = ["| layer | forward GFLOP/s (% of peak) | backward GFLOP/s (% of peak) | share of "
             "the program's time |", "|---|---|---|---|"]
    layers = row["layers"]
    total = sum(f_s + b_s for _, f_s, _, b_s in layers.values())
    for name, (f, f_s, b, b_s) in layers.items():
        lines.append(f"| {name} | {f / f_s:.1f} ({f / f_s / peak:.0%}) | "
                     f"{b / b_s:.1f} ({b / b_s / peak:.0%}) | {(f_s + b_s) / total:.0%} |")
    flops = sum(f + b for f, _, b, _ in layers.values())
    lines.append(f"| all | | {flops / total:.1f} ({flops / total / peak:.0%}) over both | "
                 "100% |")
    return "\n".join(lines)


def nominal_peak() -> tuple[float, str]:
    """The CPU's peak float32 GFLOP/s for the widest FMA it has, on all its cores, at the
    clock /proc/cpuinfo reports (a VM's nominal clock: boost would raise it)."""
    info = Path("/proc/cpuinfo").read_text()
    flags = set(re.search(r"^flags\s*:(.*)$", info, re.M).group(1).split())
    mhz = float(re.search(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M).group(1))
    if "avx512f" in flags:
        isa, per_cycle = "AVX-512 FMA", 2 * 16 * 2  # two 512-bit FMA units
    elif {"avx2", "fma"} <= flags:
        isa, per_cycle = "AVX2 FMA", 2 * 8 * 2  # two 256-bit FMA units
    else:
        isa, per_cycle = "SSE", 2 * 4
    cores = os.cpu_count()
    peak = cores * per_cycle * mhz / 1000
    return peak, (f"{cores} cores × {per_cycle} FLOP/cycle ({isa}) × {mhz / 1000:.2f} GHz "
                  f"= {peak:.0f} GFLOP/s")


def arithmetic(stdout: str) -> dict:
    """The C program's own count: `arithmetic: X GFLOP executed (D dense) in Ts = G GFLOP/s`."""
    found = re.search(r"arithmetic: ([\d.]+) GFLOP executed \(([\d.]+) dense\) in ([\d.]+)s",
                      stdout)
    return ({"executed_gflop": float(found[1]), "program_dense_gflop": float(found[2]),
             "program_seconds": float(found[3])} if found else {})


def runs_table(rows: list[dict]) -> str:
    peak = max(r["peak_gflops"] for r in rows)
    nominal, how = nominal_peak()
    lines = ["| model | framework | workers | epochs | training (s), run / rerun | images/s | "
             "dense GFLOP/s (% of peak) | peak RSS (MB) | test accuracy (errors) | rerun "
             "bit-identical |", "|---" * 10 + "|"]
    for r in rows:
        first, second = r["train_seconds"]
        dense = (f"{r['dense_gflops']:.1f} ({r['dense_gflops'] / peak:.1%})"
                 if r.get("dense_gflops") else "–")
        if r.get("executed_gflops"):
            dense += f"; executed {r['executed_gflops']:.1f}"
        lines.append(f"| {r['model']} | {r['framework']} | {r['workers']} | {r['epochs']} | "
                     f"{first:.1f} / "
                     f"{second:.1f} | {r['images_per_second']:.0f} | {dense} | "
                     f"{r['peak_rss_mb']:.0f} | {r['test_accuracy']:.2%} "
                     f"({r['test_errors']}) | {'yes' if r['rerun_bit_identical'] else 'NO'} |")
    lines.append(f"\nPeak: {peak:.1f} GFLOP/s on {os.cpu_count()} threads, the best of "
                 "benchmarks/fma_peak.c's probes before each run (nominal: "
                 f"{how}). Dense GFLOP/s: the dense implementation's operations "
                 "(benchmarks/run.py dense_flops_per_image) over the train stage's training "
                 "time; executed: what a C program counted doing over its own training loop "
                 "(the mlp skips zero pixels; the cnn's count adds validation and Adam).")
    for r in rows:
        if r.get("layers"):
            lines.append(f"\n{r['model']} in {r['framework']}, layer by layer (the program's "
                         "own timers, its faster run):\n" + layers_table(r))
    return "\n".join(lines)


def machine() -> str:
    import numpy as np
    import torch

    from stages.frameworks.keras.env import keras, tf
    from stages.runtime.machine import cpu_model

    return (f"{cpu_model()} ({torch.backends.cpu.get_cpu_capability()}), {os.cpu_count()} "
            f"cores, {platform.platform()}, Python {platform.python_version()}, TensorFlow "
            f"{tf.__version__}, Keras {keras.__version__}, PyTorch {torch.__version__}, "
            f"NumPy {np.__version__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA,
                        help="full MNIST in the Keras .npz layout")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--only", choices=("train", "mosaics", "frameworks", "workers",
                                           "predict", "cnn", "frontier", "hosts"))
    parser.add_argument("--models", nargs="+", choices=MODEL_NAMES,
                        default=["mlp"], help="what --only frameworks/workers/frontier train")
    parser.add_argument("--epochs", type=int, help="shorten every recipe (frameworks)")
    parser.add_argument("--model", choices=("cnn", "cnn_large"), default="cnn")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    parser.add_argument("--framework", choices=("keras", "torch", "c"), default="keras",
                        help="who trains --only cnn")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                        help="--only frontier: change each preset's recipe (e.g. ema=0)")
    parser.add_argument("--committees", type=int, nargs="*", default=[], metavar="K",
                        help="--only frontier: committees of K of each preset's seeds")
    parser.add_argument("--peer-seeds", type=int, nargs="*", default=[42], metavar="SEED",
                        help="--only frontier: the Keras example's seeds (default 42)")
    parser.add_argument("--plot", type=Path, metavar="DIR",
                        help="--only frontier: also draw frontier.svg and curves.svg into DIR")
    parser.add_argument("--seeds-for", nargs="+", default=[], metavar="MODEL=SEEDS",
                        help="--only frontier: other seeds for a preset, e.g. cnn=42 or cnn=42,1")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="--only frontier: keep each run's test probabilities in DIR")
    args = parser.parse_args()
    if not args.data.is_file():
        sys.exit(f"error: {args.data} not found; pass --data PATH to a full mnist.npz")
    print(f"machine: {machine()}")
    print(f"date: {time.strftime('%Y-%m-%d')}")
    if args.only in (None, "train"):
        r = bench_train(args.data, args.repeats)
        print("\ntraining, mlp, batch 32, 5 epochs (median of "
              f"{r['repeats']} alternating runs each)")
        print(f"{'':24}{'original':>12}{'train stage':>14}{'ratio':>8}")
        for key, label, fmt in (("train_seconds", "training time (s)", "{:.1f}"),
                                ("process_seconds", "whole process (s)", "{:.1f}"),
                                ("peak_rss_mb", "peak RSS (MB)", "{:.0f}")):
            o = statistics.median(x[key] for x in r["original"])
            s = statistics.median(x[key] for x in r["stage"])
            print(f"{label:24}{fmt.format(o):>12}{fmt.format(s):>14}{s / o:>8.2f}")
        def accuracies(runs):
            return " / ".join(f"{x['accuracy']:.4f}" for x in runs)

        print(f"{'test accuracy':24}{accuracies(r['original']):>12}  {accuracies(r['stage'])}")
    if args.only in (None, "mosaics"):
        from benchmarks import mosaics

        print("\nrendering and neighbour search (benchmarks/mosaics.py)")
        print(json.dumps(mosaics.run(args.data), indent=2, sort_keys=True))
    if args.only in (None, "frameworks"):
        print(f"\nframeworks: {', '.join(args.models)} with the shipped params, each trained "
              "twice by the train stage (evaluated after the first)")
        print(runs_table(bench_frameworks(args.data, args.models, args.epochs)))
    if args.only in (None, "workers"):
        print(f"\nworkers: {', '.join(args.models)} in PyTorch, 1 and 2 data-parallel workers "
              "(train.torch.workers), shipped params otherwise, each trained twice")
        print(runs_table(bench_workers(args.data, args.models, args.epochs)))
    if args.only in (None, "predict"):
        from benchmarks import predict

        print("\nmnist-predict's preprocessing, per image file (benchmarks/predict.py)")
        print(json.dumps(predict.run(args.data), indent=2))
    if args.only == "frontier":
        changes = recipe_changes(args.set)
        print(f"\nfrontier: {', '.join(args.models)} in Keras, shipped params"
              f"{' but ' + str(changes) if changes else ''}, seeds {args.seeds} "
              f"(train + evaluate stages); committees of {args.committees or 'none'}; the Keras "
              f"example, seeds {args.peer_seeds or 'none'}")
        result = bench_frontier(args.data, args.models, args.seeds, args.epochs, changes,
                                tuple(args.committees), tuple(args.peer_seeds), args.keep,
                                seeds_for(args.seeds_for))
        print(frontier.table(result["rows"]))
        if args.plot:
            for path in frontier.write_plots(result["rows"], result["curves"],
                                             result["val_images"], args.plot):
                print(f"plot -> {path}")
    if args.only == "hosts":
        from benchmarks import hosts

        epochs = args.epochs or 3
        print(f"\ntwo test hosts (benchmarks/hosts.py): the object store, and the mlp in "
              f"PyTorch for {epochs} epochs on one host and across both")
        print(json.dumps(hosts.run(args.data, epochs), indent=2))
    if args.only == "cnn":
        print(f"\n{args.model} in {args.framework}, default params, seeds {args.seeds} "
              "(train + evaluate stages)")
        runs = bench_cnn(args.data, args.model, args.seeds, args.framework)
        errors = [r["test_errors"] for r in runs]
        print(f"test errors {errors}: mean {statistics.mean(errors):.1f}, worst {max(errors)}; "
              f"training {statistics.median(r['train_seconds'] for r in runs):.0f}s (median)")


if __name__ == "__main__":
    main()
