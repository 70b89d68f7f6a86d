"""stages/train.py: the validation split, run info, and the stage for either framework."""

from __future__ import annotations

import dataclasses
import json
import sys

import numpy as np
import pytest

from stages import train
from stages.data.mnist import validation_split
from stages.normalize import normalize
from stages.runtime import params
from stages.runtime.failures import DataError
from stages.runtime.outputs import save_npz
from testbed.pipeline import copy_pipeline, stage_command
from testbed.pipeline import paths as dvc_vars
from testbed.processes import sh
from tests.digits import fixture_data
from tests.projects import TINY_TRAIN, merge, set_params, shipped_params, train_cfg

PATHS = dvc_vars()


# --- the validation split ------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5])
def test_split_is_a_seeded_partition_in_dataset_order(fraction):
    train_idx, val_idx = validation_split(1000, fraction, seed=7)
    assert len(val_idx) == round(1000 * fraction)
    assert np.array_equal(np.sort(np.concatenate([train_idx, val_idx])), np.arange(1000))
    assert np.all(np.diff(train_idx) > 0) and np.all(np.diff(val_idx) > 0)
    again = validation_split(1000, fraction, seed=7)
    assert np.array_equal(again[0], train_idx) and np.array_equal(again[1], val_idx)
    if fraction:
        assert not np.array_equal(validation_split(1000, fraction, seed=8)[1], val_idx)


@pytest.mark.parametrize("n, fraction", [(3, 0.01), (1, 0.5)])
def test_split_refuses_a_fraction_that_leaves_no_usable_split(n, fraction):
    with pytest.raises(DataError, match=f"val_fraction {fraction} leaves no usable split of "
                                        f"{n} images"):
        validation_split(n, fraction, seed=0)


# --- what the model's bits depend on ----------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("framework", params.FRAMEWORKS)
def test_run_info_names_the_framework_and_model_and_what_the_bits_depend_on(framework):
    from stages import frameworks

    cfg = dataclasses.replace(train_cfg(), framework=framework)
    network = frameworks.network(framework)
    info = train.run_info(cfg, network.versions(), network.model_file)
    keys = ("framework", "model", "device", "seed", "intra_op_threads", "inter_op_threads")
    if framework == "c":  # its bits do not depend on its thread count: not recorded
        assert not {"intra_op_threads", "inter_op_threads"} & set(info)
        keys = keys[:4]
    assert {k: info[k] for k in keys} == {k: getattr(cfg, k) for k in keys}
    assert info["numpy"] == np.__version__
    if framework == "keras":
        from stages.frameworks.keras.env import keras, tf

        assert (info["tensorflow"], info["keras"], info["model_file"]) == (
            tf.__version__, keras.__version__, "model.keras")
    elif framework == "c":
        assert info["model_file"] == "model.bin" and info["cc"] and info["cc_version"]
    else:
        import torch

        assert (info["torch"], info["model_file"]) == (torch.__version__, "model.safetensors")
        assert info["deterministic_algorithms"] is True and info["cpu_capability"]
    assert json.loads(json.dumps(info)) == info  # plain JSON values only


# --- through the stage's command line --------------------------------------------------------


def project(tmp_path, **train_changes):
    repo = copy_pipeline(tmp_path / "p")
    set_params(repo, train=merge(TINY_TRAIN, train_changes))
    processed, _ = normalize(fixture_data())
    save_npz(repo / PATHS["processed"], **processed)
    return repo


@pytest.mark.slow
def test_cli_refuses_a_split_that_leaves_no_validation_image(tmp_path):
    repo = project(tmp_path, mlp={"val_fraction": 0.0001})
    proc = sh(repo, *stage_command("train", repo), check=False, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == ("error: val_fraction 0.0001 leaves no usable split of 1500 "
                           "images\n")
    assert not (repo / PATHS["model_dir"]).exists() and not (repo / PATHS["curves"]).exists()


@pytest.mark.slow
@pytest.mark.parametrize("framework, model_file", [("keras", "model.keras"),
                                                   ("torch", "model.safetensors"),
                                                   ("c", "model.bin")])
def test_cli_trains_the_chosen_model_and_writes_model_curves_and_run_info(
        tmp_path, framework, model_file):
    repo = project(tmp_path, framework=framework, mlp={"val_fraction": 0.1})
    proc = sh(repo, *stage_command("train", repo), timeout=300)
    assert f"train: mlp in {framework} on 1350 images, 150 held out for validation" in proc.stdout
    assert "epoch 1/1 " in proc.stdout and proc.stderr == ""
    model_dir = repo / PATHS["model_dir"]
    assert sorted(p.name for p in model_dir.iterdir()) == [model_file, "run_info.json"]
    info = json.loads((model_dir / "run_info.json").read_text())
    assert info["framework"] == framework and info["model_file"] == model_file
    assert info["model"] == "mlp" and info["seed"] == shipped_params()["train"]["seed"]
    accuracy = (repo / PATHS["curves"] / "plots/metrics/eval/accuracy.tsv").read_text()
    assert len(accuracy.splitlines()) == 2  # header and one epoch
    # no temporaries left beside the outputs
    assert sorted(p.name for p in model_dir.parent.iterdir()) == sorted(
        [model_dir.name, (repo / PATHS["processed"]).parent.name])
    assert [p.name for p in (repo / PATHS["curves"]).parent.iterdir()] == [
        (repo / PATHS["curves"]).name]


@pytest.mark.slow
def test_cli_without_pytorch_installed_names_the_command_that_installs_it(tmp_path):
    """`import torch` made to fail the way it fails where torch is not installed."""
    repo = project(tmp_path, framework="torch")
    command = stage_command("train", repo)
    without_torch = ("import runpy, sys; sys.modules['torch'] = None; "
                     f"sys.argv = {['stages.train', *command[3:]]!r}; "
                     "runpy.run_module('stages.train', run_name='__main__')")
    proc = sh(repo, sys.executable, "-c", without_torch, check=False, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == ("error: train.framework torch needs PyTorch, which is not installed: "
                           "run `make torch` (it installs requirements-torch.lock)\n")
    assert not (repo / PATHS["model_dir"]).exists() and not (repo / PATHS["curves"]).exists()


@pytest.mark.slow
def test_cli_on_cuda_trains_on_the_gpu_or_says_there_is_none(tmp_path):
    import torch

    repo = project(tmp_path, framework="torch", torch={"device": "cuda"})
    proc = sh(repo, *stage_command("train", repo), check=False, timeout=300)
    if torch.cuda.is_available():
        assert proc.returncode == 0, proc.stderr
        info = json.loads((repo / PATHS["model_dir"] / "run_info.json").read_text())
        assert info["device"] == "cuda" and info["gpu"]
    else:
        assert proc.returncode == 1
        assert proc.stderr.startswith("error: train.torch.device cuda: no CUDA GPU is visible to "
                                      "PyTorch") and proc.stderr.count("\n") == 1
        assert not (repo / PATHS["model_dir"]).exists()
        assert not (repo / PATHS["curves"]).exists()
