"""stages/runtime/params.py: the whole params.yaml, checked in one place: one clear ParamError per
mistake, and every stage checks every section before its own work, without TensorFlow."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

from stages.runtime import params
from stages.runtime.failures import ParamError
from testbed.pipeline import copy_pipeline, stage_command
from testbed.processes import run_env
from tests.digits import NAMED_CLASSES
from tests.paths import ROOT
from tests.projects import set_params, shipped_params

SHIPPED = shipped_params()
DELETE = object()
SHARED_TRAIN_KEYS = ("framework", "model", "seed")
IDX_HASHES = {name: f"{i:x}" * 64 for i, name in enumerate(params.IDX_NAMES, start=10)}


def edited(path: str, value) -> dict:
    """The shipped params with the key at dotted `path` set to value (DELETE: removed)."""
    values = copy.deepcopy(SHIPPED)
    *parents, key = path.split(".")
    section = values
    for name in parents:
        section = section[name]
    if value is DELETE:
        del section[key]
    else:
        section[key] = value
    return values


def rejects(path: str, value, match: str) -> str:
    """The one-line message params.check gives for the shipped params with one change."""
    with pytest.raises(ParamError, match=match) as info:
        params.check(edited(path, value))
    message = str(info.value)
    assert "\n" not in message
    return message


def expected_train(model: str, framework: str = "keras", **changes) -> params.TrainConfig:
    """What train gets for `model` in `framework`, from the shipped file: the shared keys,
    that framework's settings (device and workers fixed where it has none), the speed
    knob Keras reads, and the model's recipe; `changes` over them."""
    shared = {key: SHIPPED["train"][key] for key in SHARED_TRAIN_KEYS}
    own = {"device": "cpu", "workers": 1, "program": "fast"} | SHIPPED["train"][framework]
    if framework == "c":
        own |= {"intra_op_threads": SHIPPED["speed"]["c_threads"], "inter_op_threads": 1}
    return params.TrainConfig(**(
        shared | own | {"framework": framework, "model": model}
        | {"steps_per_execution": SHIPPED["speed"]["keras_steps_per_execution"],
           "peer_timeout": SHIPPED["speed"]["peer_timeout"]}
        | SHIPPED["train"][model] | changes))


# --- the shipped file ------------------------------------------------------------------


def test_the_shipped_params_are_valid():
    loaded = params.load(ROOT / "params.yaml")
    assert tuple(loaded) == params.SECTIONS
    assert loaded["dataset"]["classes"] == [str(c) for c in SHIPPED["dataset"]["classes"]]
    assert loaded["train"] == expected_train(SHIPPED["train"]["model"])
    for section in ("normalize", "evaluate", "render", "speed"):
        assert loaded[section] == SHIPPED[section]
    download = SHIPPED["download"]
    assert loaded["download"]["sources"] == [
        {key: download[key] for key in ("url", "sha256", "format")}, *download["mirrors"]]
    assert {k: loaded["download"][k] for k in ("timeout", "retries", "backoff")} == {
        k: download[k] for k in ("timeout", "retries", "backoff")}


@pytest.mark.parametrize("model", params.MODEL_NAMES)
def test_train_gets_the_shared_keys_and_the_chosen_recipe_only(model):
    assert params.check(edited("train.model", model))["train"] == expected_train(model)


def test_another_models_recipe_does_not_reach_train_but_is_still_checked():
    chosen = SHIPPED["train"]["model"]
    other = next(name for name in params.MODEL_NAMES if name != chosen)
    changed = params.check(edited(f"train.{other}.epochs", 7))["train"]
    assert changed.epochs == SHIPPED["train"][chosen]["epochs"] != 7
    rejects(f"train.{other}.epochs", 0, rf"^train\.{other}\.epochs: got 0; allowed: ")


# --- missing keys --------------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "train.cnn.epochs", "train.mlp.restore_best", "train.model", "train.seed", "train.mlp",
    "train.keras.intra_op_threads", "train.keras.device", "train.torch.workers", "train.c",
    "speed.c_threads", "download.sha256", "download.format", "normalize.sample_index",
    "evaluate.batch_size", "render.per_row", "dataset.classes",
])
def test_missing_key(path):
    rejects(path, DELETE, f"^{re.escape(path)}: missing from params.yaml$")


def test_missing_section():
    rejects("render", DELETE, r"^params\.render: missing from params\.yaml$")


# --- wrong types ---------------------------------------------------------------------


@pytest.mark.parametrize("path, value, allowed", [
    ("train.cnn.epochs", "5", "an integer from 1 to 10000"),
    ("train.cnn.epochs", 5.0, "an integer from 1 to 10000"),
    ("train.cnn.epochs", True, "an integer from 1 to 10000"),
    ("train.mlp.learning_rate", "1e-3", r"a number in \[1e-07, 10.0\]"),
    ("train.mlp.restore_best", "yes", "true or false"),
    ("train.mlp.restore_best", 1, "true or false"),
    ("train.seed", "42", "an integer from 0 to 2147483647"),
    ("speed.keras_steps_per_execution", 1.5, "an integer from 1 to 100000"),
    ("evaluate.list_errors", None, "true or false"),
    ("download.timeout", "30", "a number in"),
    ("download.retries", 1.5, "an integer from 0 to 20"),
    ("download.url", 42, "a URL or a path"),
    ("download.url", "", "a URL or a path"),
    ("download.sha256", "abc", "a 64-digit sha256 hex, or null"),
    ("download.mirrors", "http://x", "a list"),
    ("normalize.sample_index", "0", "an integer >= 0"),
    ("render.per_row", [50], "an integer from 1 to 1000"),
    ("render.neighbours_k", True, "an integer from 1 to 20"),
    ("render.neighbours_k", 2.5, "an integer from 1 to 20"),
    ("render.top_confident", "20", "an integer from 1 to 10000"),
])
def test_wrong_type(path, value, allowed):
    message = rejects(path, value, f"^{re.escape(path)}: got ")
    assert f"got {value!r}; allowed: " in message, message
    assert re.search(allowed, message), message


# --- out of range --------------------------------------------------------------------


@pytest.mark.parametrize("path, value", [
    ("train.cnn.epochs", 0), ("train.cnn.epochs", -3), ("train.cnn.epochs", 10_001),
    ("train.cnn.batch_size", -1), ("train.cnn.batch_size", 0),
    ("train.cnn.batch_size", params.MAX_BATCH + 1),
    ("train.cnn.learning_rate", 0.0), ("train.cnn.learning_rate", float("nan")),
    ("train.cnn.learning_rate", float("inf")), ("train.cnn.shift", 0.6),
    ("train.cnn.rotation", -1.0), ("train.keras.intra_op_threads", 0),
    ("train.torch.inter_op_threads", 1025), ("speed.c_threads", 0),
    ("train.cnn.label_smoothing", 0.6), ("train.cnn.label_smoothing", -0.1),
    ("train.cnn.zoom", 0.5), ("train.cnn.zoom", 0.51),
    ("train.cnn.val_fraction", 0.6), ("train.cnn.val_fraction", -0.1),
    ("train.cnn.ema", 1.0), ("train.cnn.ema", -0.5), ("train.cnn.elastic", -1.0),
    ("train.cnn.elastic", 101.0), ("train.cnn.elastic_sigma", 0.0),
    ("render.per_row", 0), ("render.errors_per_row", -5),
    ("render.neighbours_k", 0), ("render.neighbours_k", 21),
    ("render.top_confident", 0), ("render.top_pairs", 0), ("render.top_pairs", 91),
    ("normalize.sample_index", -1), ("download.retries", 21),
    ("download.timeout", 0), ("download.backoff", -1),
    ("evaluate.batch_size", 0),
])
def test_out_of_range(path, value):
    message = rejects(path, value, f"^{re.escape(path)}: got ")
    assert f"got {value!r}; allowed: " in message


@pytest.mark.parametrize("path, value, kind", [
    ("train.cnn.val_fraction", 0.5, float), ("train.cnn.val_fraction", 0, float),
    ("train.cnn.zoom", 0.499, float), ("train.cnn.learning_rate", 10, float),
    ("train.cnn.label_smoothing", 0.5, float), ("render.top_pairs", 90, int),
    ("train.cnn.ema", 0.9999, float), ("train.cnn.ema", 0, float),
    ("train.cnn.elastic", 100, float), ("train.cnn.elastic_sigma", 20, float),
    ("train.keras.inter_op_threads", 1024, int), ("download.backoff", 0, float),
])
def test_limits_are_inclusive_where_documented(path, value, kind):
    """The edges of each range are accepted, and numbers come back as floats."""
    assert SHIPPED["train"]["model"] == "cnn"  # train.cnn.* reach check()["train"]
    section, key = path.split(".")[0], path.split(".")[-1]
    checked = params.check(edited(path, value))[section]
    got = getattr(checked, key) if section == "train" else checked[key]
    assert got == value and type(got) is kind


def test_restore_best_needs_a_validation_split():
    assert SHIPPED["train"]["mlp"]["val_fraction"] == 0  # the shipped mlp holds none out
    message = rejects("train.mlp.restore_best", True, r"^train\.mlp\.restore_best: got True")
    assert message.endswith("allowed: false when train.mlp.val_fraction is 0 (no validation "
                            "split to choose by)")
    values = edited("train.mlp.restore_best", True)
    values["train"]["mlp"]["val_fraction"] = 0.1
    values["train"]["model"] = "mlp"
    got = params.check(values)["train"]
    assert got.restore_best is True and got.val_fraction == 0.1


def test_unknown_framework_and_device_list_the_allowed_names():
    assert rejects("train.framework", "jax", "train.framework") == \
        "train.framework: got 'jax'; allowed: one of keras, torch, c"
    assert rejects("train.torch.device", "tpu", "train.torch.device") == \
        "train.torch.device: got 'tpu'; allowed: one of cpu, cuda"


def test_each_framework_gets_its_own_settings_only():
    for framework, model in (("keras", "cnn"), ("torch", "cnn"), ("c", "mlp")):
        values = edited("train.framework", framework)
        values["train"]["model"] = model
        assert params.check(values)["train"] == expected_train(model, framework)
    # Another framework's settings do not reach train, but a typo in them still fails.
    values = edited("train.torch.device", "cuda")
    assert params.check(values)["train"].device == "cpu"
    assert rejects("train.torch.workers", 0, r"^train\.torch\.workers: got 0")


def test_each_framework_names_a_gpu_its_own_way_and_c_has_none():
    """TensorFlow's name for a GPU in train.keras, PyTorch's in train.torch; C has no device
    to set: the key is unknown there."""
    for framework, gpu, other in (("keras", "gpu", "cuda"), ("torch", "cuda", "gpu")):
        values = edited(f"train.{framework}.device", gpu)
        values["train"]["framework"] = framework
        assert params.check(values)["train"] == expected_train("cnn", framework, device=gpu)
        assert rejects(f"train.{framework}.device", other, "device") == (
            f"train.{framework}.device: got '{other}'; allowed: one of cpu, {gpu}")
    assert "train.c.device: unknown key" in rejects("train.c.device", "cuda", "device")


def test_c_trains_with_the_fast_programs_or_the_plain_references():
    values = edited("train.c.program", "reference")
    values["train"]["framework"] = "c"
    assert params.check(values)["train"] == expected_train("cnn", "c", program="reference")
    assert rejects("train.c.program", "slow", "program") == (
        "train.c.program: got 'slow'; allowed: one of fast, reference")
    # The other frameworks have one implementation each: the key is unknown there.
    assert "train.keras.program: unknown key" in rejects("train.keras.program", "fast",
                                                         "program")


def test_c_trains_the_original_network_and_the_default_convnet_only():
    values = edited("train.framework", "c")  # the shipped model is the cnn
    assert params.check(values)["train"] == expected_train("cnn", "c")
    values["train"]["model"] = "mlp"
    assert params.check(values)["train"] == expected_train("mlp", "c")
    values["train"]["model"] = "cnn_large"
    with pytest.raises(ParamError) as info:
        params.check(values)
    assert str(info.value) == (
        "train.model: got 'cnn_large'; allowed: mlp or cnn with train.framework c (the "
        "plain-C programs implement the original network and the default convnet)")


def test_c_averages_the_convnets_weights_but_not_the_mlps():
    values = edited("train.cnn.ema", 0.999)
    values["train"]["framework"] = "c"
    assert params.check(values)["train"].ema == 0.999
    values["train"]["cnn"]["elastic"] = 34.0
    with pytest.raises(ParamError, match=r"^train\.cnn\.elastic: got 34\.0; allowed: 0 with "
                                         r"train\.framework c \(the plain-C program has no "
                                         r"elastic distortion\)"):
        params.check(values)


def test_c_refuses_a_convnet_batch_it_would_hold_in_unbounded_memory():
    values = edited("train.framework", "c")
    values["train"]["cnn"]["batch_size"] = 2049
    with pytest.raises(ParamError, match=r"^train\.cnn\.batch_size: got 2049; allowed: at "
                                         r"most 2048 with train\.framework c"):
        params.check(values)


@pytest.mark.parametrize("key, value, missing", [
    ("ema", 0.999, "keeps no average of its weights"),
    ("elastic", 34.0, "has no elastic distortion"),
])
def test_c_refuses_what_its_program_does_not_do(key, value, missing):
    values = edited(f"train.mlp.{key}", value)
    values["train"] |= {"framework": "c", "model": "mlp"}
    with pytest.raises(ParamError) as info:
        params.check(values)
    assert str(info.value) == (f"train.mlp.{key}: got {value!r}; allowed: 0 with "
                               f"train.framework c (the plain-C program {missing})")
    values["train"]["framework"] = "torch"
    assert getattr(params.check(values)["train"], key) == value


def test_unknown_model_lists_the_allowed_names():
    assert rejects("train.model", "resnet", "train.model") == \
        "train.model: got 'resnet'; allowed: one of mlp, cnn, cnn_large, fast"


def test_unknown_lr_schedule():
    assert rejects("train.cnn.lr_schedule", "step", r"^train\.cnn\.lr_schedule").endswith(
        "allowed: one of constant, cosine")


def test_unknown_format():
    assert "one of npz, idx" in rejects("download.format", "csv", r"^download\.format: got")


# --- unknown keys --------------------------------------------------------------------


@pytest.mark.parametrize("where, typo, meant", [
    ("train.cnn", "epoch", "epochs"),
    ("train.cnn", "batchsize", "batch_size"),
    ("train.mlp", "learning_rte", "learning_rate"),
    ("train", "modle", "model"),
    ("render", "per_rows", "per_row"),
    ("render", "neighbors_k", "neighbours_k"),
    ("normalize", "sample_idx", "sample_index"),
    ("download", "mirror", "mirrors"),
    ("dataset", "class", "classes"),
    ("evaluate", "list_error", "list_errors"),
])
def test_a_typo_in_any_section_suggests_the_key(where, typo, meant):
    message = rejects(f"{where}.{typo}", 1, f"^{re.escape(where)}\\.{typo}: unknown key")
    assert f"(did you mean '{meant}'?)" in message
    assert "allowed keys: " in message and meant in message.split("allowed keys: ")[1]


def test_a_typo_in_a_section_name_suggests_the_section():
    values = copy.deepcopy(SHIPPED)
    values["rendr"] = values.pop("render")
    with pytest.raises(ParamError, match=r"^params\.rendr: unknown key \(did you mean "
                                         r"'render'\?\)"):
        params.check(values)


def test_unknown_key_without_a_likely_match():
    message = rejects("train.cnn.colour", "blue", r"^train\.cnn\.colour: unknown key")
    assert "did you mean" not in message


def test_a_typo_is_reported_before_the_missing_key_it_causes():
    values = copy.deepcopy(SHIPPED)
    values["train"]["cnn"]["epoch"] = values["train"]["cnn"].pop("epochs")
    with pytest.raises(ParamError,
                       match=r"^train\.cnn\.epoch: unknown key \(did you mean 'epochs'"):
        params.check(values)


@pytest.mark.parametrize("path, value, keys", [
    ("render", 5, ["errors_per_row", "neighbours_k", "per_row", "top_confident",
                   "top_pairs"]),
    ("train.cnn", None, sorted(params.RECIPE_KEYS)),
    ("dataset", ["0"], ["classes"]),
])
def test_a_section_that_is_not_a_mapping(path, value, keys):
    message = rejects(path, value, f"^{re.escape(path)}: got {re.escape(repr(value))}; "
                                   "allowed: a mapping of ")
    assert message.endswith("a mapping of " + ", ".join(keys))


def test_a_file_that_is_not_a_mapping():
    with pytest.raises(ParamError, match=r"^params\.yaml: got list; allowed: a mapping of "
                                         r"sections dataset, download, normalize"):
        params.check(["train"])


# --- dataset.classes -------------------------------------------------------------------


@pytest.mark.parametrize("classes", [
    [str(c) for c in range(9)],
    [str(c) for c in range(11)],
    ["0", "1", "2", "3", "4", "5", "6", "7", "8", "8"],  # not distinct
    [0, 1, 2, 3, 4, 5, 6, 7, 8, "8"],  # distinct values, equal names
    ["", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
    [None, "1", "2", "3", "4", "5", "6", "7", "8", "9"],
    [True, "1", "2", "3", "4", "5", "6", "7", "8", "9"],
    ["x" * (params.MAX_CLASS_NAME + 1), "1", "2", "3", "4", "5", "6", "7", "8", "9"],
    ["a\nb", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
    [" 0", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
    ["0 ", "1", "2", "3", "4", "5", "6", "7", "8", "9"],
    "0123456789",
    [["0"], "1", "2", "3", "4", "5", "6", "7", "8", "9"],
], ids=["9", "11", "duplicate", "int-and-str-equal", "empty", "null", "bool", "too-long",
        "newline", "leading-space", "trailing-space", "a-string", "nested"])
def test_classes_must_be_ten_distinct_one_line_names(classes):
    rejects("dataset.classes", classes, r"^dataset\.classes: got .*; allowed: a list of 10 "
                                        r"distinct names")


@pytest.mark.parametrize("classes, names", [
    (NAMED_CLASSES, NAMED_CLASSES),
    (list(range(10)), [str(c) for c in range(10)]),
    (["zero", 1, "two", 3, 4, 5, 6, 7, 8, "x" * params.MAX_CLASS_NAME],
     ["zero", "1", "two", "3", "4", "5", "6", "7", "8", "x" * params.MAX_CLASS_NAME]),
])
def test_classes_are_names_as_written(classes, names):
    assert params.check(edited("dataset.classes", classes))["dataset"]["classes"] == names


# --- download sources ------------------------------------------------------------------


def download_with(**changes) -> dict:
    values = copy.deepcopy(SHIPPED)
    values["download"].update(changes)
    return params.check(values)["download"]


def test_an_idx_url_with_the_shipped_npz_mirror_is_valid():
    """Each source carries its own format: the idx url needs no npz hash, the npz mirror
    keeps its own."""
    got = download_with(url="https://example.org/mnist/", format="idx", sha256=IDX_HASHES)
    assert got["sources"] == [
        {"url": "https://example.org/mnist/", "sha256": IDX_HASHES, "format": "idx"},
        *SHIPPED["download"]["mirrors"]]


def test_sources_are_the_url_then_every_mirror_in_order():
    own = {"url": "/b.npz", "sha256": "B" * 64}
    got = download_with(mirrors=["/a.npz", own, {"url": "/c", "sha256": None,
                                                 "format": "idx"}])["sources"]
    first = {key: SHIPPED["download"][key] for key in ("url", "sha256", "format")}
    assert got == [
        first,
        dict(first, url="/a.npz"),  # a plain mirror: url's format and hash
        {"url": "/b.npz", "sha256": "b" * 64, "format": "npz"},  # own hash, npz, lowercased
        {"url": "/c", "sha256": None, "format": "idx"},
    ]
    assert len(download_with(mirrors=None)["sources"]) == 1


@pytest.mark.parametrize("sha256", ["a" * 64, {**IDX_HASHES, "extra.gz": "a" * 64},
                                    {k: v for k, v in list(IDX_HASHES.items())[1:]}])
def test_idx_format_needs_a_hash_per_file(sha256):
    values = edited("download.format", "idx")
    values["download"]["sha256"] = sha256
    with pytest.raises(ParamError, match=r"^download\.sha256: got .*; allowed: for format "
                                         r"idx, a map of train-images-idx3-ubyte\.gz"):
        params.check(values)


def test_idx_hash_map_digests_are_checked_and_null_means_unverified():
    bad = dict(IDX_HASHES, **{"t10k-labels-idx1-ubyte.gz": "xyz"})
    with pytest.raises(ParamError, match=r"^download\.sha256\.t10k-labels-idx1-ubyte\.gz: "
                                         r"got 'xyz'; allowed: a 64-digit sha256 hex$"):
        download_with(format="idx", sha256=bad)
    got = download_with(format="idx", sha256=None)
    assert got["sources"][0] == {"url": SHIPPED["download"]["url"], "sha256": None,
                                 "format": "idx"}


@pytest.mark.parametrize("mirror, match", [
    ({"url": "http://x"}, r"^download\.mirrors\[0\]: got \{'url': 'http://x'\}; allowed: "
                          r"a URL, or \{url, sha256, format\}$"),
    ({"url": "/x", "sha256": None, "md5": "0"}, r"^download\.mirrors\[0\]: got "),
    ("", r"^download\.mirrors\[0\]: got ''"),
    (42, r"^download\.mirrors\[0\]: got 42"),
    ({"url": "/x", "sha256": None, "format": "zip"},
     r"^download\.mirrors\[0\]\.format: got 'zip'; allowed: one of npz, idx$"),
    ({"url": "/x", "sha256": "a" * 64, "format": "idx"},
     r"^download\.mirrors\[0\]\.sha256: got 'a+'; allowed: for format idx"),
    ({"url": "", "sha256": None}, r"^download\.mirrors\[0\]\.url: got ''; allowed: a URL"),
])
def test_bad_mirrors_are_named_by_position(mirror, match):
    values = edited("download.mirrors", [mirror])
    with pytest.raises(ParamError, match=match):
        params.check(values)


# --- params.yaml itself --------------------------------------------------------------


def test_load_errors(tmp_path):
    path = tmp_path / "params.yaml"
    with pytest.raises(ParamError, match="not found: run from the project root"):
        params.load(path)
    path.write_text("train: [unclosed\n")
    with pytest.raises(ParamError, match="is not valid YAML") as info:
        params.load(path)
    assert "\n" not in str(info.value)
    path.write_text("")
    with pytest.raises(ParamError, match=r"params\.yaml: got NoneType; allowed: a mapping"):
        params.load(path)
    path.write_bytes(b"render: \xff\xfe\n")
    with pytest.raises(ParamError, match=r"params\.yaml: unreadable"):
        params.load(path)
    with pytest.raises(ParamError, match="unreadable"):
        params.load(tmp_path)  # a folder


def test_load_reads_params_yaml_from_the_working_directory(tmp_path, monkeypatch):
    copy_pipeline(tmp_path)
    set_params(tmp_path, render={"per_row": 7})
    monkeypatch.chdir(tmp_path)
    assert params.load()["render"]["per_row"] == 7


# --- every stage checks the whole file first, without TensorFlow ------------------------

STAGES = ["download", "normalize", "train", "evaluate", "render-errors", "audit-labels"]
# One bad key per section, each named in the error it causes.
BAD = {
    "dataset": ({"dataset": {"classes": ["a"] * 10}}, "dataset.classes"),
    "download": ({"download": {"retries": 21}}, "download.retries"),
    "normalize": ({"normalize": {"sample_index": -1}}, "normalize.sample_index"),
    # a recipe the shipped model does not use: still checked
    "train": ({"train": {"cnn_large": {"epochs": 0}}}, "train.cnn_large.epochs"),
    "evaluate": ({"evaluate": {"batch_size": 0}}, "evaluate.batch_size"),
    "render": ({"render": {"per_row": 0}}, "render.per_row"),
    "audit": ({"audit": {"folds": 1}}, "audit.folds"),
}
HEAVY = ("tensorflow", "keras", "dvclive", "PIL")

PROBE = textwrap.dedent("""
    import runpy, sys
    sys.argv = {argv!r}
    try:
        runpy.run_module("{module}", run_name="__main__")
        code = 0
    except SystemExit as exit:
        code = exit.code
    heavy = sorted(m for m in {heavy!r} if m in sys.modules)
    print(code, ",".join(heavy) or "-")
""")


def project_with(tmp_path, changes: dict):
    repo = copy_pipeline(tmp_path / "p")
    set_params(repo, **changes)
    return repo


@pytest.mark.slow
@pytest.mark.parametrize("section", sorted(BAD))
@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_refuses_a_bad_key_in_any_section_before_tensorflow(tmp_path, stage,
                                                                         section):
    changes, key = BAD[section]
    repo = project_with(tmp_path, changes)
    _, _, module, *args = stage_command(stage, repo)
    # The stage's real __main__ path with dvc.yaml's arguments, then a look at what it
    # imported.
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(argv=[module, *args], module=module, heavy=HEAVY)],
        cwd=repo, env=run_env(), capture_output=True, text=True, timeout=120)
    assert proc.stdout.split() == ["1", "-"], proc.stdout + proc.stderr
    assert proc.stderr.startswith(f"error: {key}: got ") and proc.stderr.count("\n") == 1, \
        proc.stderr
    assert not (repo / "data").exists() and not (repo / "reports").exists()


@pytest.mark.slow
def test_a_bad_render_param_stops_the_first_stage_in_seconds(tmp_path):
    repo = project_with(tmp_path, {"render": {"per_row": 0}})
    started = time.perf_counter()
    proc = subprocess.run(stage_command("download", repo), cwd=repo, env=run_env(),
                          capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 1
    assert proc.stderr == "error: render.per_row: got 0; allowed: an integer from 1 to 1000\n"
    assert proc.stdout == ""
    assert elapsed < 3.0  # importing TensorFlow alone takes ~6s here
    assert not (repo / "data").exists()


@pytest.mark.slow
def test_train_cli_with_a_bad_param_fails_fast_with_one_line(tmp_path):
    repo = project_with(tmp_path, {"train": {"cnn": {"epochs": 0}}})
    started = time.perf_counter()
    proc = subprocess.run(stage_command("train", repo), cwd=repo, env=run_env(),
                          capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 1
    assert proc.stderr == ("error: train.cnn.epochs: got 0; allowed: an integer from 1 to "
                           "10000\n")
    assert proc.stdout == ""
    assert elapsed < 3.0


@pytest.mark.slow
def test_checking_params_in_every_stage_module_imports_no_tensorflow():
    code = textwrap.dedent(f"""
        import sys
        from stages import download, evaluate, normalize, render_errors, train
        from stages.runtime import params
        from stages.runtime.failures import ParamError
        checked = params.load()
        assert set(checked) == set(params.SECTIONS), checked
        raw = params.read()
        raw["render"]["bogus"] = 1
        try:
            params.check(raw)
            raise SystemExit("an unknown key was accepted")
        except ParamError:
            pass
        print(sorted(m for m in {HEAVY!r} if m in sys.modules))
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=run_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_more_than_one_worker_is_for_torch_and_must_divide_the_batch():
    assert SHIPPED["train"]["torch"]["workers"] == 1
    # Keras has no workers (its multi-worker path on TensorFlow is broken:
    # keras-team/keras#20585), C neither.
    assert "train.keras.workers: unknown key" in rejects("train.keras.workers", 2, "workers")
    values = edited("train.torch.workers", 2)
    values["train"]["framework"] = "torch"
    assert params.check(values)["train"].workers == 2
    values["train"]["torch"]["workers"] = 3  # the cnn's batch is 128
    with pytest.raises(ParamError, match=r"^train\.torch\.workers: got 3; allowed: a divisor "
                                         r"of train\.cnn\.batch_size \(128\)"):
        params.check(values)


def test_speed_knobs_reach_train_but_are_no_stage_dependency():
    loaded = params.check(edited("speed.keras_steps_per_execution", 7))
    assert loaded["train"].steps_per_execution == 7
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert "speed" not in {p.split(".")[0] for stage in stages.values()
                           for p in stage.get("params", [])}


def test_workers_out_of_range():
    assert rejects("train.torch.workers", 0, r"^train\.torch\.workers: got 0; allowed: an "
                   r"integer from 1")


@pytest.mark.parametrize("value, match", [
    (1, r"^audit\.folds: got 1; allowed: 0 \(off\) or 2\.\.100 folds$"),
    (101, r"^audit\.folds: got 101"),
    (-1, r"^audit\.folds: got -1"),
    (2.5, r"^audit\.folds: got 2\.5"),
])
def test_audit_folds_is_off_or_at_least_two(value, match):
    rejects("audit.folds", value, match)
    assert params.check(edited("audit.folds", 5))["audit"]["folds"] == 5


def test_the_auditors_are_trained_as_train_would_train_their_model():
    assert params.check(SHIPPED)["audit"] == {"folds": 0, "train": None}  # off
    on = edited("audit.folds", 3)
    checked = params.check(on)
    auditor = SHIPPED["audit"]
    train_like = edited("train.framework", auditor["framework"])
    train_like["train"] |= {"model": auditor["model"], "seed": auditor["seed"]}
    assert checked["audit"]["train"] == params.check(train_like)["train"]
    assert checked["audit"]["train"] != checked["train"]  # the shipped auditor is not train's


def test_a_recipe_the_auditor_cannot_train_is_refused_only_when_it_trains():
    values = edited("train.mlp.ema", 0.999)  # C keeps no average; the shipped auditor is C
    assert params.check(values)["train"].framework == "keras"
    values["audit"]["folds"] = 2
    with pytest.raises(ParamError, match=r"^train\.mlp\.ema: got 0\.999; allowed: 0 with "
                                         r"audit\.framework c"):
        params.check(values)


@pytest.mark.parametrize("key, value, match", [
    ("model", "cnn_large", r"^audit\.model: got 'cnn_large'; allowed: mlp or cnn with "
                           r"audit\.framework c"),
    ("framework", "jax", r"^audit\.framework: got 'jax'"),
    ("seed", -1, r"^audit\.seed: got -1"),
    ("model", DELETE, r"^audit\.model: missing from params\.yaml"),
])
def test_the_auditor_is_checked_by_trains_rules_under_its_own_names(key, value, match):
    rejects(f"audit.{key}", value, match)


@pytest.mark.parametrize("value", [0, 101, "9"])
def test_evaluate_neighbours_is_a_count(value):
    rejects("evaluate.neighbours", value, r"^evaluate\.neighbours: got ")
