"""Every stage's validate(params): one clear ParamError per mistake, before any heavy import."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_env
from stages import download, evaluate, normalize, render_errors, train
from stages.common import ParamError, load_params

DEFAULTS = yaml.safe_load((ROOT / "params.yaml").read_text())
STAGES = {"download": download, "normalize": normalize, "train": train,
          "evaluate": evaluate, "render": render_errors}


def params(section: str, **changes) -> dict:
    values = copy.deepcopy(DEFAULTS[section])
    for key, value in changes.items():
        if value is DELETE:
            del values[key]
        else:
            values[key] = value
    return values


DELETE = object()


def rejects(section: str, match: str, **changes) -> str:
    with pytest.raises(ParamError, match=match) as info:
        STAGES[section].validate(params(section, **changes))
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("section", sorted(STAGES))
def test_the_shipped_params_are_valid(section):
    STAGES[section].validate(params(section))


# --- missing keys --------------------------------------------------------------------


@pytest.mark.parametrize("section, key", [
    ("train", "epochs"), ("train", "model"), ("download", "sha256"),
    ("normalize", "val_fraction"), ("evaluate", "batch_size"), ("render", "per_row"),
])
def test_missing_key(section, key):
    message = rejects(section, f"^{section}.{key}: missing from params.yaml$",
                      **{key: DELETE})
    assert key in message


# --- wrong types ---------------------------------------------------------------------


@pytest.mark.parametrize("section, key, value, allowed", [
    ("train", "epochs", "5", "an integer from 1 to 10000"),
    ("train", "epochs", 5.0, "an integer from 1 to 10000"),
    ("train", "epochs", True, "an integer from 1 to 10000"),
    ("train", "learning_rate", "1e-3", r"a number in \[1e-07, 10.0\]"),
    ("train", "restore_best", "yes", "true or false"),
    ("train", "restore_best", 1, "true or false"),
    ("evaluate", "list_errors", None, "true or false"),
    ("download", "timeout", "30", "a number in"),
    ("download", "retries", 1.5, "an integer from 0 to 20"),
    ("download", "url", 42, "a URL or a path"),
    ("download", "sha256", "abc", "a 64-digit sha256 hex or null"),
    ("download", "mirrors", "http://x", "a list"),
    ("download", "mirrors", [{"url": "http://x"}], r"a URL, or \{url, sha256\}"),
    ("normalize", "seed", "42", "an integer from 0 to 4294967295"),
    ("render", "per_row", [50], "an integer from 1 to 1000"),
])
def test_wrong_type(section, key, value, allowed):
    message = rejects(section, f"^{section}\\.{key}", **{key: value})
    shown = value[0] if key == "mirrors" and isinstance(value, list) else value
    assert f"got {shown!r}; allowed: " in message, message
    assert re.search(allowed, message), message


# --- out of range --------------------------------------------------------------------


@pytest.mark.parametrize("section, key, value", [
    ("train", "epochs", 0), ("train", "epochs", -3), ("train", "epochs", 10_001),
    ("train", "batch_size", -1), ("train", "batch_size", 0),
    ("train", "learning_rate", 0.0), ("train", "learning_rate", float("nan")),
    ("train", "learning_rate", float("inf")), ("train", "shift", 0.6),
    ("train", "rotation", -1.0), ("train", "intra_op_threads", 0),
    ("train", "label_smoothing", 0.6), ("train", "label_smoothing", -0.1),
    ("train", "zoom", 0.51),
    ("render", "per_row", 0), ("render", "errors_per_row", -5),
    ("normalize", "val_fraction", 1.0), ("normalize", "val_fraction", -0.1),
    ("normalize", "sample_index", -1), ("download", "retries", 21),
    ("download", "timeout", 0), ("download", "backoff", -1),
    ("evaluate", "batch_size", 0),
])
def test_out_of_range(section, key, value):
    message = rejects(section, f"^{section}\\.{key}: got ", **{key: value})
    assert "allowed: " in message


def test_val_fraction_just_below_one_is_allowed():
    assert normalize.validate(params("normalize", val_fraction=0.99))["val_fraction"] == 0.99
    assert normalize.validate(params("normalize", val_fraction=0))["val_fraction"] == 0.0


def test_unknown_model_lists_the_allowed_names():
    assert rejects("train", "train.model", model="resnet") == \
        "train.model: got 'resnet'; allowed: one of mlp, cnn, cnn_large"


def test_unknown_lr_schedule():
    assert rejects("train", "lr_schedule", lr_schedule="step").endswith(
        "allowed: one of constant, cosine")


def test_unknown_format():
    assert "one of npz, idx" in rejects("download", "download.format", format="csv")


# --- unknown keys --------------------------------------------------------------------


@pytest.mark.parametrize("section, typo, meant", [
    ("train", "epoch", "epochs"),
    ("train", "batchsize", "batch_size"),
    ("train", "learning_rte", "learning_rate"),
    ("render", "per_rows", "per_row"),
    ("normalize", "val_fration", "val_fraction"),
    ("download", "mirror", "mirrors"),
])
def test_unknown_key_suggests_the_likely_one(section, typo, meant):
    message = rejects(section, f"^{section}\\.{typo}: unknown key", **{typo: 1})
    assert f"(did you mean '{meant}'?)" in message
    assert "allowed keys: " in message and meant in message.split("allowed keys: ")[1]


def test_unknown_key_without_a_likely_match():
    message = rejects("train", "unknown key", colour="blue")
    assert "did you mean" not in message


def test_a_typo_is_reported_before_the_missing_key_it_causes():
    values = params("train")
    values["epoch"] = values.pop("epochs")
    with pytest.raises(ParamError, match=r"train\.epoch: unknown key \(did you mean 'epochs'"):
        train.validate(values)


def test_idx_format_needs_a_hash_per_file():
    with pytest.raises(ParamError, match="for format idx"):
        download.validate(params("download", format="idx", mirrors=[]))
    ok = download.validate(params("download", format="idx", sha256=None, mirrors=[]))
    assert ok["sources"][0][1] is None


# --- params.yaml itself --------------------------------------------------------------


def test_load_params_errors(tmp_path):
    with pytest.raises(ParamError, match="not found: run from the project root"):
        load_params("train", tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ParamError, match="is not valid YAML") as info:
        load_params("train", tmp_path / "params.yaml")
    assert "\n" not in str(info.value)
    (tmp_path / "params.yaml").write_text("download: {}\ntrain:\n")
    with pytest.raises(ParamError, match="has no 'train:' section"):
        load_params("train", tmp_path / "params.yaml")


# --- no TensorFlow needed to say no --------------------------------------------------


def stage_dir(tmp_path: Path, section: str, **changes) -> Path:
    repo = tmp_path / "p"
    shutil.copytree(ROOT / "stages", repo / "stages",
                    ignore=shutil.ignore_patterns("__pycache__"))
    values = copy.deepcopy(DEFAULTS)
    values[section].update(changes)
    (repo / "params.yaml").write_text(yaml.safe_dump(values, sort_keys=False))
    return repo


PROBE = textwrap.dedent("""
    import runpy, sys
    sys.argv = ["{module}"]
    try:
        runpy.run_module("{module}", run_name="__main__")
        code = 0
    except SystemExit as exit:
        code = exit.code
    heavy = sorted(m for m in ("tensorflow", "keras", "dvclive", "PIL") if m in sys.modules)
    print(code, ",".join(heavy) or "-")
""")


@pytest.mark.slow
@pytest.mark.parametrize("module, section, change, key", [
    ("stages.train", "train", {"epochs": "5"}, "train.epochs"),
    ("stages.train", "train", {"model": "resnet"}, "train.model"),
    ("stages.evaluate", "evaluate", {"batch_size": 0}, "evaluate.batch_size"),
    ("stages.render_errors", "render", {"per_row": 0}, "render.per_row"),
])
def test_bad_params_are_refused_before_tensorflow_is_imported(tmp_path, module, section,
                                                              change, key):
    repo = stage_dir(tmp_path, section, **change)
    # The stage's real __main__ path, then a look at what it imported.
    proc = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], cwd=repo,
                          env=run_env(), capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["1", "-"], proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"error: {key}: got ") and proc.stderr.count("\n") == 1


@pytest.mark.slow
def test_train_cli_with_a_bad_param_fails_fast_with_one_line(tmp_path):
    repo = stage_dir(tmp_path, "train", epochs=0)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "stages.train"], cwd=repo, env=run_env(),
                          capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 1
    assert proc.stderr == ("error: train.epochs: got 0; allowed: an integer from 1 to "
                           "10000\n")
    assert proc.stdout == ""
    assert elapsed < 3.0  # importing TensorFlow alone takes ~6s here


@pytest.mark.slow
def test_validate_of_every_stage_imports_no_tensorflow(tmp_path):
    code = textwrap.dedent("""
        import copy, sys, yaml
        from stages import download, normalize, train, evaluate, render_errors
        from stages.common import ParamError
        defaults = yaml.safe_load(open("params.yaml"))
        for section, module in [("download", download), ("normalize", normalize),
                                ("train", train), ("evaluate", evaluate),
                                ("render", render_errors)]:
            module.validate(defaults[section])
            bad = dict(defaults[section], bogus=1)
            try:
                module.validate(bad)
                raise SystemExit(section + " accepted an unknown key")
            except ParamError:
                pass
        print(sorted(m for m in ("tensorflow", "keras", "dvclive") if m in sys.modules))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
