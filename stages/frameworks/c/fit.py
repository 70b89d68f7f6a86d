"""Training in plain C: build the program, hand it the data as idx files, follow its epochs.

`fit(cfg, data, curves_dir)` compiles the program for `cfg.model` and `cfg.program`: the
fast mnist_mlp.c or mnist_cnn.c beside this file, or the plain one of the same name in
reference/ (the same command line, files and randomness), with the headers they include;
once per source, headers, compiler and flags: into the user's cache, BUILD_DIR. It writes
the split the stage made as idx files (MNIST's own format, which can carry float32), runs
its `train` command with the recipe, turns each epoch line it prints into the same report
and dvclive curves as the other frameworks, and returns the weights it wrote
(stages/frameworks/c/model.py's formats).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from stages.data import idx
from stages.frameworks.c import env
from stages.frameworks.c.model import MODEL_FILE, decode
from stages.runtime.failures import PipelineError, stop_if_interrupted
from stages.runtime.params import TrainConfig
from stages.training.epochs import Curves

HERE = Path(__file__).parent
# One program per model and train.c.program: the fast ones, and the plain references.
SOURCES = {"mlp": HERE / "mnist_mlp.c", "cnn": HERE / "mnist_cnn.c"}
REFERENCES = {"mlp": HERE / "reference" / "mnist_mlp.c", "cnn": HERE / "reference" / "mnist_cnn.c"}
HEADERS = (HERE / "mnist.h", HERE / "vector.h")  # what they include (vector.h: the fast ones)
# Built programs, one folder per source, headers, compiler and flags: in the user's cache
# ($XDG_CACHE_HOME, else ~/.cache), so every checkout and every queued experiment (DVC runs
# those in temporary copies of the project, which hold no ignored files) builds each
# program once.
BUILD_DIR = (Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
             / "mnist-dvc-pipeline" / "c")
BUILD_TIMEOUT = 300  # seconds: far more than one compile of the file takes


def fit(cfg: TrainConfig, data: dict, curves_dir):
    """Train with the C program for cfg.epochs, logging curves with dvclive into
    curves_dir; returns the weights (the network's arrays, in stages/frameworks/c/model.py's
    order).

    Under deferred_interrupts, Ctrl-C stops it at the next line the program prints (one
    per epoch; the program itself takes the terminal's Ctrl-C and ends at once).
    """
    program = build(cfg.model, program=cfg.program)
    stop_if_interrupted()
    with tempfile.TemporaryDirectory(prefix="mnist-c-") as tmp:
        tmp = Path(tmp)
        args = [str(program), "train", "--out", str(tmp / MODEL_FILE), *recipe_args(cfg)]
        for part, flag in (("train", ""), ("val", "val-")):
            if len(data[f"y_{part}"]):
                (tmp / f"{part}-images.idx").write_bytes(idx.encode(data.pop(f"x_{part}")))
                (tmp / f"{part}-labels.idx").write_bytes(
                    idx.encode(data.pop(f"y_{part}").astype(np.uint8)))
                args += [f"--{flag}images", str(tmp / f"{part}-images.idx"),
                         f"--{flag}labels", str(tmp / f"{part}-labels.idx")]
        with open(tmp / "stderr", "w+") as stderr, subprocess.Popen(
                args, stdout=subprocess.PIPE, stderr=stderr, text=True) as process:
            try:
                # Set up while the program reads its data (dvclive's import takes a while).
                curves = Curves(curves_dir, cfg.epochs)
                summary = follow(process, curves)
                process.wait()
            finally:
                if process.poll() is None:  # interrupted (SIGTERM reaches us only)
                    process.kill()
                    process.wait()
            stop_if_interrupted()  # a Ctrl-C that ended the program too
            if process.returncode:
                stderr.seek(0)
                said = stderr.read().strip().splitlines()
                raise PipelineError(said[-1] if said else
                                    f"{program.name} train exited with {process.returncode}")
        curves.close(validated=cfg.val_fraction > 0)
        if summary:
            print(f"arithmetic: {float(summary['executed_gflop']):.1f} GFLOP executed "
                  f"({float(summary['dense_gflop']):.1f} dense) in "
                  f"{float(summary['seconds']):.2f}s = {float(summary['gflops']):.1f} "
                  f"GFLOP/s on {summary['threads']} thread(s)", flush=True)
        return decode((tmp / MODEL_FILE).read_bytes(), "the program's model file")


def build(model: str = "mlp", toolchain: env.Toolchain = env.NATIVE,
          program: str = "fast") -> Path:
    """The `program` (fast or reference) that trains `model`, built with `toolchain` (the
    pipeline's: the native one) unless this source (and headers), compiler and flags were
    built before.

    With OpenMP when the compiler has it, else single-threaded (same bits either way): one
    compile, the flags decided before it (env.build_settings).
    """
    settings = env.build_settings(toolchain)
    cc, version, flags = settings["cc"], settings["cc_version"], settings["cflags"].split()
    source_path = (SOURCES if program == "fast" else REFERENCES)[model]
    name = source_path.name if program == "fast" else f"{program}/{source_path.name}"
    texts = [source_path.read_bytes(), *(header.read_bytes() for header in HEADERS)]
    key = hashlib.sha256(b"\0".join([*texts, version.encode(), cc.encode(),
                                     " ".join(flags).encode()])).hexdigest()[:16]
    built = BUILD_DIR / key / source_path.stem
    if built.is_file():
        return built
    built.parent.mkdir(parents=True, exist_ok=True)
    # Built aside and renamed in: a half-written program is never run, and two runs building
    # at once both end with a complete one.
    partial = built.with_name(f".{built.name}.{os.getpid()}.tmp")
    started = time.perf_counter()
    try:
        done = subprocess.run([cc, *flags, "-I", str(HERE), "-o", str(partial),
                               str(source_path), *env.LIBS],
                              capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise PipelineError(f"building {name} with {cc} failed: {err}") from None
    if done.returncode:
        partial.unlink(missing_ok=True)
        first = next((line for line in done.stderr.splitlines() if "error" in line),
                     done.stderr.strip()[:200])
        raise PipelineError(f"{cc} could not build {name}: {first}")
    partial.replace(built)
    print(f"built {name} in {time.perf_counter() - started:.1f}s: {cc} "
          f"{' '.join(flags)} ({version})", flush=True)
    return built


def recipe_args(cfg: TrainConfig) -> list[str]:
    """The recipe as the program's options (the mlp's program keeps no weight average: the
    params check refuses its `ema`)."""
    return ["--epochs", str(cfg.epochs), "--batch-size", str(cfg.batch_size),
            "--learning-rate", repr(cfg.learning_rate), "--schedule", cfg.lr_schedule,
            "--label-smoothing", repr(cfg.label_smoothing),
            "--rotation", repr(cfg.rotation), "--shift", repr(cfg.shift),
            "--zoom", repr(cfg.zoom), "--restore-best", str(int(cfg.restore_best)),
            *(["--ema", repr(cfg.ema)] if cfg.model == "cnn" else []),
            "--seed", str(cfg.seed), "--threads", str(cfg.intra_op_threads)]


def fields(line: str) -> dict[str, str]:
    """`epoch 3/5 0.4s loss=0.1 accuracy=0.9` -> {"loss": "0.1", "accuracy": "0.9"}."""
    return dict(word.split("=", 1) for word in line.split() if "=" in word)


def follow(process: subprocess.Popen, curves: Curves) -> dict:
    """Report each epoch line the program prints as the other frameworks do; returns the
    fields of its closing `train:` line."""
    summary = {}
    for line in process.stdout:
        if line.startswith("epoch "):
            epoch = int(line.split()[1].split("/")[0])
            seconds = float(line.split()[2].rstrip("s"))
            f = fields(line)
            logs = {"train/loss": float(f["loss"])}
            if "val_loss" in f:
                logs |= {"eval/loss": float(f["val_loss"]),
                         "eval/accuracy": float(f["val_accuracy"])}
            curves.epoch(epoch, seconds, logs, float(f["accuracy"]))
        elif line.startswith("train:"):
            summary = fields(line)
        else:
            print(line, end="", flush=True)  # e.g. "restoring epoch 4: ..."
        stop_if_interrupted()
    return summary
