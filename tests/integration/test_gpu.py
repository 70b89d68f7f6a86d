"""Training on a GPU, in Keras and in PyTorch, through the train stage's process.

Where a framework sees a GPU, the cnn trains on it twice to the same model bytes, and
run_info.json names the card: these tests skip, saying so, where it sees none (the project's
own machines have none; the PyTorch path's check on a lent GPU machine is
benchmarks/gpu_check.py). Where it sees none, asking for one ends the stage in one line with
a non-zero exit and nothing written: these tests run here.
"""

from __future__ import annotations

import functools
import hashlib
import json

import pytest

from stages.normalize import normalize
from stages.runtime.outputs import save_npz
from testbed.pipeline import copy_pipeline, stage_command
from testbed.pipeline import paths as dvc_vars
from testbed.processes import sh
from tests.digits import fixture_data
from tests.projects import FAST_TRAIN, TINY_TRAIN, merge, set_params

PATHS = dvc_vars()
GPU = {"keras": "gpu", "torch": "cuda"}  # train.<framework>.device's name for a GPU
MODEL_FILE = {"keras": "model.keras", "torch": "model.safetensors"}
NO_GPU = "no CUDA GPU on this machine: the {} GPU path has not run here ({})"


@functools.cache
def gpus(framework: str) -> tuple[int, str, bool]:
    """How many GPUs the framework sees here, its version as the refusals name it, and
    whether it is a CUDA build."""
    if framework == "torch":
        import torch

        return (torch.cuda.device_count(), f"torch {torch.__version__}",
                bool(torch.version.cuda))
    from stages.frameworks.keras.env import tf  # lists the devices without starting any

    return (len(tf.config.list_physical_devices("GPU")), f"TensorFlow {tf.__version__}",
            tf.test.is_built_with_cuda())


def need_a_gpu(framework: str) -> None:
    count, version, cuda = gpus(framework)
    if not count:
        pytest.skip(NO_GPU.format(framework, f"{version}, "
                                  f"{'a CUDA build' if cuda else 'a CPU-only build'}"))


def project(tmp_path, framework: str, **train_changes):
    """The pipeline with the fixture's normalized arrays in place: ready for the train stage."""
    repo = copy_pipeline(tmp_path / "p")
    set_params(repo, train=merge({"framework": framework}, train_changes))
    processed, _ = normalize(fixture_data())
    save_npz(repo / PATHS["processed"], **processed)
    return repo


def train(repo):
    """Run the train stage; the model file's sha256 and run_info.json."""
    sh(repo, *stage_command("train", repo), timeout=600)
    model_dir = repo / PATHS["model_dir"]
    info = json.loads((model_dir / "run_info.json").read_text())
    return hashlib.sha256((model_dir / info["model_file"]).read_bytes()).hexdigest(), info


@pytest.mark.slow
@pytest.mark.parametrize("framework", GPU)
def test_on_a_gpu_the_cnn_trains_twice_to_the_same_bits_and_run_info_names_it(
        tmp_path, framework):
    need_a_gpu(framework)
    repo = project(tmp_path, framework, **{framework: {"device": GPU[framework]}},
                   **merge(FAST_TRAIN, {"model": "cnn"}))
    first, info = train(repo)
    second, _ = train(repo)
    assert first == second  # deterministic kernels on the GPU: the same bits on a rerun
    assert info["device"] == GPU[framework] and info["model_file"] == MODEL_FILE[framework]
    assert info["gpu"] and info["cuda"] and info["cudnn"]
    losses = (repo / PATHS["curves"] / "plots/metrics/train/loss.tsv").read_text()
    first_epoch, last_epoch = (float(line.split("\t")[1]) for line in losses.splitlines()[1:])
    assert last_epoch < first_epoch  # it learned (on the CPU: 1.2, then 0.55)


@pytest.mark.slow
@pytest.mark.parametrize("framework", GPU)
def test_asking_for_a_gpu_where_there_is_none_ends_the_stage_in_one_line(tmp_path, framework):
    count, version, _ = gpus(framework)
    if count:
        pytest.skip(f"{framework} sees {count} GPU(s) here: the refusal is for machines "
                    "without one")
    repo = project(tmp_path, framework, **{framework: {"device": GPU[framework]}},
                   **TINY_TRAIN)
    proc = sh(repo, *stage_command("train", repo), check=False, timeout=300)
    assert proc.returncode == 1
    none = {"keras": "no GPU is visible to TensorFlow",
            "torch": "no CUDA GPU is visible to PyTorch"}[framework]
    assert proc.stderr.startswith(f"error: train.{framework}.device {GPU[framework]}: {none} "
                                  f"({version}, ")
    assert proc.stderr.endswith(f", or use train.{framework}.device: cpu\n")
    assert proc.stderr.count("\n") == 1
    assert not (repo / PATHS["model_dir"]).exists() and not (repo / PATHS["curves"]).exists()
