"""Frameworks side by side: each model trained by the train stage in Keras, in PyTorch and
(the mlp and the cnn) in plain C with the shipped params, the fast C programs and the plain
references (train.c.program).

Every variant is trained twice, alternating, so that machine noise hits all alike, and
evaluated after its first run. The table: training time, images/s, the arithmetic (dense
GFLOP/s against this machine's measured peak, benchmarks/fma_peak.c, probed before every
run; the mlp's executed GFLOP/s in C, which skips zero pixels), peak RSS, test accuracy,
and whether the forced rerun gave the same model bytes; then the C cnn's GFLOP/s layer by
layer, forward and backward, from the program's own timers. `--epochs N` shortens every
recipe (for the convnets: speed and determinism in minutes; their accuracy over seeds
comes from benchmarks/cnn.py). Part of `make bench` (the mlp, full recipe).
benchmarks/workers.py runs its variants through the same runner and table.

    python -m benchmarks.frameworks [--data PATH] [--models mlp cnn] [--epochs N]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import yaml

from benchmarks.common import (
    ROOT,
    argument_parser,
    check_data,
    header,
    prepare_project,
    run_child,
    train_seconds,
    trained_images,
)
from stages.runtime.params import C_MODELS, MODEL_NAMES
from testbed.pipeline import paths, stage_command

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


def layer_times(stdout: str) -> dict:
    """The C cnn's `layer NAME forward_gflop=F forward_seconds=S backward_gflop=G
    backward_seconds=T` lines: {NAME: (F, S, G, T)}."""
    return {m[0]: tuple(map(float, m[1:])) for m in re.findall(
        r"^layer (\w+) forward_gflop=([\d.]+) forward_seconds=([\d.]+) "
        r"backward_gflop=([\d.]+) backward_seconds=([\d.]+)", stdout, re.M)}


def arithmetic(stdout: str) -> dict:
    """The C program's own count: `arithmetic: X GFLOP executed (D dense) in Ts = G GFLOP/s`."""
    found = re.search(r"arithmetic: ([\d.]+) GFLOP executed \(([\d.]+) dense\) in ([\d.]+)s",
                      stdout)
    return ({"executed_gflop": float(found[1]), "program_dense_gflop": float(found[2]),
             "program_seconds": float(found[3])} if found else {})


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
        if model in C_MODELS:  # the plain reference C a learner reads, for its cost
            variants[model, "c reference", 1] = {"framework": "c", "model": model,
                                                 "c": {"program": "reference"}}
    return bench_variants(data, variants, epochs)


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
                 "(benchmarks/frameworks.py dense_flops_per_image) over the train stage's "
                 "training time; executed: what a C program counted doing over its own "
                 "training loop (the mlp skips zero pixels; the cnn's count adds validation "
                 "and Adam).")
    for r in rows:
        if r.get("layers"):
            lines.append(f"\n{r['model']} in {r['framework']}, layer by layer (the program's "
                         "own timers, its faster run):\n" + layers_table(r))
    return "\n".join(lines)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--models and --epochs, as this benchmark and benchmarks/workers.py read them."""
    parser.add_argument("--models", nargs="+", choices=MODEL_NAMES, default=["mlp"],
                        help="the networks to train (default: mlp)")
    parser.add_argument("--epochs", type=int, help="shorten every recipe to N epochs")


def report(data: Path, models: Sequence[str] = ("mlp",), epochs: int | None = None
           ) -> None:
    """Measure, and print each run's row as it ends and then the table."""
    print(f"\nframeworks: {', '.join(models)} with the shipped params, each trained "
          "twice by the train stage (evaluated after the first)")
    print(runs_table(bench_frameworks(data, list(models), epochs)))


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser("benchmarks.frameworks", __doc__)
    add_model_arguments(parser)
    args = parser.parse_args(argv)
    check_data(args.data)
    header()
    report(args.data, args.models, args.epochs)


if __name__ == "__main__":
    main()
