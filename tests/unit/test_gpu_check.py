"""benchmarks/gpu_check.py, the PyTorch CUDA path's one-shot check on a lent GPU machine:
its recipe is params.yaml's, its data the stages', its model hash tells weights apart, and
its smoke run works here, on the CPU, with nothing but NumPy and PyTorch installed (what
that machine has)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest

from benchmarks import gpu_check
from stages.data.mnist import validation_split
from stages.normalize import normalize
from stages.runtime import params
from testbed.processes import run_env
from tests.digits import fixture_data
from tests.paths import FIXTURE, ROOT
from tests.projects import merge, shipped_params

# What the GPU machine lacks: the pipeline's other packages, and two of the torch path's.
ABSENT = ("yaml", "dvc", "dvclive", "tensorflow", "keras", "tqdm", "safetensors", "PIL")


def test_the_recipe_is_the_shipped_cnn_as_the_train_stage_gets_it():
    shipped = shipped_params()
    assert gpu_check.RECIPE == shipped["train"]["cnn"]
    assert gpu_check.SEED == shipped["train"]["seed"]
    section = merge(shipped["train"], {
        "framework": "torch", "model": "cnn", "cnn": {"epochs": 3},
        "torch": {"device": "cuda", "intra_op_threads": 16, "inter_op_threads": 1}})
    assert gpu_check.config("cuda", 3, 16) == params.train(section,
                                                           params.speed(shipped["speed"]))


def test_the_data_is_scaled_and_split_as_the_normalize_and_train_stages_do():
    data, x_test, y_test = gpu_check.load(FIXTURE, 300)
    processed, _ = normalize(fixture_data())
    train_idx, val_idx = validation_split(300, gpu_check.RECIPE["val_fraction"], gpu_check.SEED)
    for split, idx in (("train", train_idx), ("val", val_idx)):
        assert np.array_equal(data[f"x_{split}"], processed["x_train"][:300][idx])
        assert np.array_equal(data[f"y_{split}"], processed["y_train"][:300][idx])
    assert np.array_equal(x_test, processed["x_test"]) and np.array_equal(y_test,
                                                                          processed["y_test"])


def test_the_model_hash_is_the_weights():
    import torch

    from stages.frameworks.torch.model import build

    def seeded(seed):
        torch.manual_seed(seed)
        return build("mlp")

    assert gpu_check.weights_sha256(seeded(0)) == gpu_check.weights_sha256(seeded(0))
    assert gpu_check.weights_sha256(seeded(0)) != gpu_check.weights_sha256(seeded(1))


def bare_site(dest: Path) -> Path:
    """A folder of what the GPU machine has installed: NumPy, PyTorch and the distributions
    PyTorch requires, linked from this environment."""
    dest.mkdir()
    todo, seen = ["numpy", "torch"], set()
    while todo:
        try:
            dist = metadata.distribution(todo.pop())
        except metadata.PackageNotFoundError:  # a requirement for another platform
            continue
        if dist.metadata["Name"].lower() in seen:
            continue
        seen.add(dist.metadata["Name"].lower())
        todo += [re.match(r"[\w.-]+", r)[0] for r in dist.requires or [] if "extra ==" not in r]
        for top in {f.parts[0] for f in dist.files if f.parts[0] != ".."}:
            if not (dest / top).exists():
                (dest / top).symlink_to(dist.locate_file(top))
    return dest


SMOKE = textwrap.dedent("""
    import importlib.util, json, runpy, sys

    site, absent, argv = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
    sys.path[:0] = [site, "."]  # python -S: no site-packages but these
    findable = [name for name in absent if importlib.util.find_spec(name)]
    sys.argv = ["gpu_check", *argv]
    try:
        runpy.run_module("benchmarks.gpu_check", run_name="__main__", alter_sys=True)
    finally:
        loaded = {name: getattr(sys.modules[name].__spec__, "origin", "?")
                  for name in absent if name in sys.modules}
        print(json.dumps({"findable": findable, "loaded": loaded}))
""")


@pytest.mark.slow
def test_the_smoke_run_on_the_cpu_needs_numpy_and_pytorch_only(tmp_path):
    site = bare_site(tmp_path / "site")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-S", "-c", SMOKE, str(site), ",".join(ABSENT), "--data", str(FIXTURE),
         "--device", "cpu", "--epochs", "1", "--limit", "300", "--threads", "1", "--out",
         str(out)], cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    imports = json.loads(lines[-1])
    assert imports["findable"] == []  # none of them is installed there
    assert imports["loaded"] == {"tqdm": None}  # only gpu_check's stand-in, of no file
    assert lines[0].startswith("plan: the cnn (params.yaml's train.cnn) for 1 epoch(s) on 285 "
                               "images (15 held out), scored on 500 test images: twice on cpu")
    result = json.loads((out / gpu_check.OUT_FILE).read_text())
    first, second, cpu = result["runs"]
    assert [run["device"] for run in result["runs"]] == ["cpu"] * 3
    assert first["sha256"] == second["sha256"] == cpu["sha256"]
    assert result["checks"] | {"speedup": None} == {
        "identical": True, "accuracy_gap": 0.0, "within_band": True,
        "run_info_names_the_gpu": True, "speedup": None}
    assert first["test_errors"] == round((1 - first["test_accuracy"]) * 500)
    assert [row["epoch"] for row in first["epochs"]] == [1] and "gpu" not in result["versions"]


@pytest.mark.slow
def test_without_a_gpu_the_check_ends_in_one_line_and_writes_nothing(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: the refusal is for machines without one")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_check", "--data", str(FIXTURE), "--out",
         str(tmp_path / "out")], cwd=ROOT, env=run_env(), capture_output=True, text=True,
        timeout=300)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.startswith("error: train.torch.device cuda: no CUDA GPU is visible to "
                                  "PyTorch") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()
