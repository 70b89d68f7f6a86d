"""Train with PyTorch or plain C instead of Keras: same stages, same data, same outputs.

The README's `dvc exp run -S train.framework=torch` (or `=c`) lines run once on a copy of the
session's trained (Keras) project (conftest.py's `switched`); each test applies one of
those experiments to a copy of it, as right after its run, and goes on with `dvc repro`:
the stages after train run unchanged on the new model, a rerun gives the same bits (forced,
or started by an edit of the framework's code), each framework's code is a dependency only
when it is chosen, and going back to Keras restores its results from DVC's run-cache
without training.
"""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from stages.frameworks.c import fit as c_fit
from testbed.pipeline import paths as dvc_vars
from testbed.processes import sh
from tests.projects import (
    applied,
    dvc,
    edit_module,
    out_hashes,
    ran_training,
    set_params,
    stages_run,
    status,
)

pytestmark = pytest.mark.slow

PATHS = dvc_vars()
ALL_STAGES = ["download", "normalize", "train", "evaluate", "render-errors", "audit-labels"]


def forced_rerun_gives_the_same_bits(repo, results: dict) -> None:
    """Same params, same machine, new processes: every output byte for byte, dvc.lock as
    it was."""
    lock = (repo / "dvc.lock").read_text()
    again = dvc(repo, "repro", "--force")
    assert stages_run(again.stdout) == ALL_STAGES
    assert out_hashes(repo) == results
    assert (repo / "dvc.lock").read_text() == lock


def test_torch_trains_behind_the_same_stages_bit_reproducibly(trained_project, switched,
                                                              tmp_path):
    keras_results = out_hashes(trained_project.repo)
    params = yaml.safe_load((trained_project.repo / "params.yaml").read_text())["train"]
    recipe = params[params["model"]]
    repo, out = applied(switched, ("torch", params["model"]), tmp_path)

    # download and normalize are framework-free: not rerun.
    assert stages_run(out) == ["train", "evaluate", "render-errors"], out
    assert f"train: {params['model']} in torch on " in out
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == recipe["epochs"]
    assert all("eval/accuracy=" in line for line in epochs)

    model_dir = repo / PATHS["model_dir"]
    assert sorted(p.name for p in model_dir.iterdir()) == ["model.safetensors", "run_info.json"]
    info = json.loads((model_dir / "run_info.json").read_text())
    assert (info["framework"], info["model"], info["device"]) == ("torch", params["model"],
                                                                   "cpu")
    assert info["torch"] and info["deterministic_algorithms"] is True

    # Every output of every stage is there, the same files as under Keras but the model's.
    torch_results = out_hashes(repo)
    model_file = f"{PATHS['model_dir']}/model."
    assert ({p for p in torch_results if not p.startswith(model_file)}
            == {p for p in keras_results if not p.startswith(model_file)})
    metrics = json.loads((repo / PATHS["metrics"]).read_text())
    with open(repo / PATHS["misclassified"], newline="") as f:
        assert len(list(csv.DictReader(f))) == metrics["errors"]
    assert 0 < metrics["accuracy"] <= 1
    assert (repo / PATHS["page"]).read_text().count("<img") > 0

    # Only the chosen framework's code is a dependency: its training loop of train, its
    # networks of train and evaluate.
    edit_module(repo, "frameworks/keras/fit")
    edit_module(repo, "frameworks/keras/model")
    assert status(repo) == {}
    edit_module(repo, "frameworks/torch/fit")
    assert list(status(repo)) == ["train"]
    edit_module(repo, "frameworks/torch/model")
    assert sorted(status(repo)) == ["evaluate", "train"]
    # A comment retrains and re-evaluates in new processes, and the same bits come out:
    # the model and every table, so render-errors does not rerun; dvc.lock's outputs stay.
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    rerun = dvc(repo, "repro")
    assert stages_run(rerun.stdout) == ["train", "evaluate"] and out_hashes(repo) == torch_results
    after = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert {s: after[s]["outs"] for s in after} == {s: lock[s]["outs"] for s in lock}

    # Back to Keras, its code as it was: its results come back from the run-cache, with
    # no training.
    sh(repo, "git", "checkout", "--", "stages")
    set_params(repo, train={"framework": "keras"})
    back = dvc(repo, "repro")
    assert not ran_training(back.stdout), back.stdout
    assert "Stage 'train' is cached - skipping run" in back.stdout
    assert out_hashes(repo) == keras_results


def test_c_trains_the_default_convnet_behind_the_same_stages_bit_reproducibly(
        trained_project, switched, tmp_path):
    keras_repo = trained_project.repo
    recipe = yaml.safe_load((keras_repo / "params.yaml").read_text())["train"]["cnn"]
    keras = {"metrics": json.loads((keras_repo / PATHS["metrics"]).read_text())}
    keras_curves = json.loads((keras_repo / PATHS["curves"] / "metrics.json").read_text())
    repo, out = applied(switched, ("c", "cnn"), tmp_path)

    assert stages_run(out) == ["train", "evaluate", "render-errors"], out
    assert "train: cnn in c on " in out and "GFLOP/s on 1 thread(s)" in out  # the fixture's
    assert len([line for line in out.splitlines() if line.startswith("epoch ")]) == (
        recipe["epochs"])
    assert [line.split()[1] for line in out.splitlines()
            if line.startswith("layer ")] == ["conv1", "conv2", "conv3", "dense"]
    model_dir = repo / PATHS["model_dir"]
    info = json.loads((model_dir / "run_info.json").read_text())
    assert (info["framework"], info["model"], info["model_file"]) == ("c", "cnn", "model.bin")
    assert list(c_fit.BUILD_DIR.glob("*/mnist_cnn"))
    # The fixture's recipe (2 epochs of 1,425 images) trains the network, but leaves
    # BatchNorm's moving statistics (momentum 0.99) far from the batches': Keras' test
    # accuracy is low too. C's agrees with Keras' on the same recipe.
    metrics = json.loads((repo / PATHS["metrics"]).read_text())
    curves = json.loads((repo / PATHS["curves"] / "metrics.json").read_text())
    assert curves["train"]["loss"] < 1.0 and keras_curves["train"]["loss"] < 1.0
    assert abs(metrics["accuracy"] - keras["metrics"]["accuracy"]) < 0.1

    c_results = out_hashes(repo)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    # Reruns in new processes give the same bits: evaluate forced here; train forced on two
    # threads (the fixture's: one) below, then again after an edit of its source.
    rescored = dvc(repo, "repro", "--force", "--single-item", "evaluate")
    assert stages_run(rescored.stdout) == ["evaluate"] and out_hashes(repo) == c_results
    # The program's thread count is a speed knob: two threads write the same bits.
    set_params(repo, speed={"c_threads": 2})
    assert status(repo) == {}
    two = dvc(repo, "repro", "--force", "train")
    assert "on 2 thread(s)" in two.stdout
    assert out_hashes(repo) == c_results

    # Its source and the header both programs include are train's deps (and the C audit's).
    with open(repo / "stages/frameworks/c/mnist_cnn.c", "a") as f:
        f.write("/* edited by a test: a comment changes no result */\n")
    assert sorted(status(repo)) == ["audit-labels", "train"]
    dvc(repo, "repro")
    after = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    assert {s: after[s]["outs"] for s in after} == {s: lock[s]["outs"] for s in lock}
    with open(repo / "stages/frameworks/c/mnist.h", "a") as f:
        f.write("/* edited by a test */\n")
    assert sorted(status(repo)) == ["audit-labels", "train"]
    assert out_hashes(repo) == c_results


def test_one_param_trains_with_the_plain_reference_program_instead(switched, tmp_path):
    """`-S train.c.program=reference`: the plain C a learner reads trains the same network
    behind the same stages, its model in the same format, about as accurate. The key is
    train's dep: the reference sums in its own order, so its last bits may differ (for the
    mlp, GCC happens to give the fast program's very bits; other compilers need not)."""
    repo, _ = applied(switched, ("c", "mlp"), tmp_path)
    model_file = repo / PATHS["model_dir"] / "model.bin"
    fast_model = model_file.read_bytes()
    fast = json.loads((repo / PATHS["metrics"]).read_text())["accuracy"]

    out = dvc(repo, "exp", "run", "-S", "train.c.program=reference").stdout
    assert stages_run(out)[:2] == ["train", "evaluate"], out
    info = json.loads((repo / PATHS["model_dir"] / "run_info.json").read_text())
    assert (info["framework"], info["model"], info["program"]) == ("c", "mlp", "reference")
    assert len(model_file.read_bytes()) == len(fast_model)
    accuracy = json.loads((repo / PATHS["metrics"]).read_text())["accuracy"]
    assert abs(accuracy - fast) < 0.03, (accuracy, fast)
    assert list(c_fit.BUILD_DIR.glob("*/mnist_mlp"))


def test_c_trains_the_original_network_behind_the_same_stages_bit_reproducibly(
        trained_project, switched, tmp_path):
    keras_results = out_hashes(trained_project.repo)
    recipe = yaml.safe_load((trained_project.repo / "params.yaml").read_text())["train"]["mlp"]
    repo, out = applied(switched, ("c", "mlp"), tmp_path)

    assert stages_run(out) == ["train", "evaluate", "render-errors"], out
    assert "train: mlp in c on " in out and "GFLOP/s on 1 thread(s)" in out  # the fixture's
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == recipe["epochs"]
    model_dir = repo / PATHS["model_dir"]
    assert sorted(p.name for p in model_dir.iterdir()) == ["model.bin", "run_info.json"]
    info = json.loads((model_dir / "run_info.json").read_text())
    assert (info["framework"], info["model"], info["model_file"]) == ("c", "mlp", "model.bin")
    assert info["cc_version"] and "-march=native" in info["cflags"] and "openmp" in info
    # The program was built outside the project, in the user's cache: nothing for git.
    assert list(c_fit.BUILD_DIR.glob("*/mnist_mlp"))
    assert not (repo / "build").exists()
    assert "build" not in sh(repo, "git", "status", "--porcelain").stdout

    c_results = out_hashes(repo)
    model_file = f"{PATHS['model_dir']}/model."
    assert ({p for p in c_results if not p.startswith(model_file)}
            == {p for p in keras_results if not p.startswith(model_file)})
    metrics = json.loads((repo / PATHS["metrics"]).read_text())
    assert 0.8 < metrics["accuracy"] <= 1  # 1500 fixture images, the original recipe

    forced_rerun_gives_the_same_bits(repo, c_results)

    # The C program's source is train's dependency, and only when C trains (and the label
    # audit's, whose shipped auditor is C's mlp; off, it trains nothing).
    edit_module(repo, "frameworks/torch/fit")
    assert status(repo) == {}
    with open(repo / "stages/frameworks/c/mnist_mlp.c", "a") as f:
        f.write("/* edited by a test: a comment changes no result */\n")
    assert sorted(status(repo)) == ["audit-labels", "train"]
    rerun = dvc(repo, "repro")
    assert sorted(stages_run(rerun.stdout)) == ["audit-labels", "train"]
    assert out_hashes(repo) == c_results
    # How evaluate reads the model: train, evaluate, and the (shipped, C) auditor.
    edit_module(repo, "frameworks/c/model")
    assert set(status(repo)) == {"train", "evaluate", "audit-labels"}
