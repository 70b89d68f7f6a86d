"""stages/train.py: the validation split, batches, the loss, stable saving, and fitting."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from stages import params, train
from stages.errors import DataError
from stages.normalize import normalize
from stages.outputs import save_npz
from tests.helpers import (
    TINY_TRAIN,
    copy_pipeline,
    dvc_vars,
    fixture_data,
    merge,
    set_params,
    sh,
    shipped_params,
    stage_command,
)

PATHS = dvc_vars()


def train_cfg(**recipe) -> dict:
    """train's checked settings: the shipped shared keys, mlp with `recipe` changed."""
    section = merge(shipped_params()["train"], {"model": "mlp", "mlp": recipe,
                                                "intra_op_threads": 1,
                                                "inter_op_threads": 1})
    return params.train(section)


# --- the validation split ------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.5])
def test_split_is_a_seeded_partition_in_dataset_order(fraction):
    train_idx, val_idx = train.split(1000, fraction, seed=7)
    assert len(val_idx) == round(1000 * fraction)
    assert np.array_equal(np.sort(np.concatenate([train_idx, val_idx])), np.arange(1000))
    assert np.all(np.diff(train_idx) > 0) and np.all(np.diff(val_idx) > 0)
    again = train.split(1000, fraction, seed=7)
    assert np.array_equal(again[0], train_idx) and np.array_equal(again[1], val_idx)
    if fraction:
        assert not np.array_equal(train.split(1000, fraction, seed=8)[1], val_idx)


@pytest.mark.parametrize("n, fraction", [(3, 0.01), (1, 0.5)])
def test_split_refuses_a_fraction_that_leaves_no_usable_split(n, fraction):
    with pytest.raises(DataError, match=f"val_fraction {fraction} leaves no usable split of "
                                        f"{n} images"):
        train.split(n, fraction, seed=0)


# --- batches -------------------------------------------------------------------------------


@pytest.mark.parametrize("n,batch", [(10, 3), (12, 4), (5, 8)])
def test_batch_order_covers_every_image_once_with_one_short_last_batch(n, batch):
    parts = train.batch_order(n, batch, np.random.default_rng(0))
    flat = np.concatenate([p.ravel() for p in parts])
    assert np.array_equal(np.sort(flat), np.arange(n))
    assert all(p.shape[1] == batch for p in parts[:1] if n >= batch)
    assert sum(p.size for p in parts) == n
    if n % batch:
        assert parts[-1].shape == (1, n % batch)
    else:
        assert len(parts) == 1 and parts[0].shape == (n // batch, batch)


def test_batch_order_is_a_fresh_seeded_shuffle_each_epoch():
    rng = np.random.default_rng(5)
    first, second = (np.concatenate([p.ravel() for p in train.batch_order(50, 8, rng)])
                     for _ in range(2))
    assert not np.array_equal(first, second)
    again = np.random.default_rng(5)
    assert np.array_equal(np.concatenate([p.ravel() for p in train.batch_order(50, 8, again)]),
                          first)


# --- the loss ------------------------------------------------------------------------------


def test_label_smoothing_moves_the_loss_minimum_to_the_smoothed_targets():
    labels = np.array([3, 7], np.int32)
    sure = np.full((2, 10), 1e-6, np.float32)
    sure[[0, 1], labels] = 1 - 9e-6
    smooth = np.full((2, 10), 0.01, np.float32)
    smooth[[0, 1], labels] = 0.91

    plain = train.training_loss(0.0)
    assert float(plain(labels, sure)) < 1e-4 < float(plain(labels, smooth))
    smoothed = train.training_loss(0.1)
    # Minimal (the targets' entropy) at 0.91 / 0.01 exactly; higher when over-confident.
    entropy = -(0.91 * np.log(0.91) + 9 * 0.01 * np.log(0.01))
    assert np.isclose(float(smoothed(labels, smooth)), entropy, atol=1e-5)
    assert float(smoothed(labels, sure)) > entropy + 0.5
    # Smoothed towards each image's own label: the same shape one class over costs dearly.
    assert float(smoothed(labels, np.roll(smooth, 1, axis=1))) > entropy + 3


# --- saving --------------------------------------------------------------------------------


def test_renumbered_shared_ids_keep_their_links():
    config = {"a": {"shared_object_id": 987}, "b": [{"shared_object_id": 123},
                                                    {"shared_object_id": 987}]}
    assert train._renumber_shared_ids(config) == {
        "a": {"shared_object_id": 1}, "b": [{"shared_object_id": 2}, {"shared_object_id": 1}]}


def test_save_stable_is_byte_stable_and_loads_back_the_same_model(tmp_path):
    import keras

    from stages import models

    model = models.build("mlp")
    x = np.random.default_rng(0).random((4, 28, 28), dtype=np.float32)
    probs = model.predict(x, verbose=0)
    train.save_stable(model, tmp_path / "a.keras")
    train.save_stable(model, tmp_path / "b.keras")
    assert (tmp_path / "a.keras").read_bytes() == (tmp_path / "b.keras").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.keras") as zf:
        assert {i.date_time for i in zf.infolist()} == {train.FIXED_ZIP_TIME}
        assert json.loads(zf.read("metadata.json"))["date_saved"] == "1980-01-01@00:00:00"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.keras", "b.keras"]  # no raw
    loaded = keras.models.load_model(tmp_path / "a.keras")
    assert np.array_equal(loaded.predict(x, verbose=0), probs)


def test_run_info_records_what_the_bits_depend_on():
    import keras
    import tensorflow as tf

    cfg = train_cfg()
    info = train.run_info(cfg)
    assert {k: info[k] for k in ("model", "seed", "intra_op_threads", "inter_op_threads")} == \
        {k: cfg[k] for k in ("model", "seed", "intra_op_threads", "inter_op_threads")}
    assert (info["tensorflow"], info["keras"], info["numpy"]) == (
        tf.__version__, keras.__version__, np.__version__)
    assert json.loads(json.dumps(info)) == info  # plain JSON values only


# --- fitting -------------------------------------------------------------------------------


@pytest.mark.slow
def test_fit_learns_and_is_reproducible_in_process(tmp_path, monkeypatch):
    """A few steps on separable toy data: loss falls, and the same seed gives same weights."""
    monkeypatch.chdir(tmp_path)
    import tensorflow as tf

    # Threads are fixed once per process (the stage does it first thing); here only the
    # determinism switch matters, and fit() seeds itself.
    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 200).astype(np.uint8)
    x = np.zeros((200, 28, 28), np.float32)
    x[np.arange(200), y, y] = 1.0  # class d lights pixel (d, d)
    data = {"x_train": x[:160], "y_train": y[:160], "x_val": x[160:], "y_val": y[160:]}
    cfg = train_cfg(epochs=8, learning_rate=0.01, batch_size=8, val_fraction=0.2,
                    restore_best=True)
    cfg["steps_per_execution"] = 4
    first = train.fit(cfg, dict(data), tmp_path / "curves")
    acc = (first.predict(x[160:], verbose=0).argmax(1) == y[160:]).mean()
    assert acc > 0.9
    second = train.fit(cfg, dict(data), tmp_path / "curves2")
    for a, b in zip(first.get_weights(), second.get_weights()):
        assert np.array_equal(a, b)
    lines = (tmp_path / "curves/plots/metrics/train/loss.tsv").read_text().splitlines()
    losses = [float(line.split("\t")[1]) for line in lines[1:]]
    assert len(losses) == 8 and losses[-1] < losses[0]
    val = (tmp_path / "curves/plots/metrics/eval/accuracy.tsv").read_text().splitlines()
    assert len(val) == 1 + 8


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
def test_cli_trains_the_chosen_model_and_writes_model_curves_and_run_info(tmp_path):
    repo = project(tmp_path, mlp={"val_fraction": 0.1})
    proc = sh(repo, *stage_command("train", repo), timeout=300)
    assert "train: mlp on 1350 images, 150 held out for validation" in proc.stdout
    assert "epoch 1/1 " in proc.stdout
    model_dir = repo / PATHS["model_dir"]
    assert sorted(p.name for p in model_dir.iterdir()) == ["model.keras", "run_info.json"]
    info = json.loads((model_dir / "run_info.json").read_text())
    assert info["model"] == "mlp" and info["seed"] == shipped_params()["train"]["seed"]
    accuracy = (repo / PATHS["curves"] / "plots/metrics/eval/accuracy.tsv").read_text()
    assert len(accuracy.splitlines()) == 2  # header and one epoch
    # no temporaries left beside the outputs
    assert sorted(p.name for p in model_dir.parent.iterdir()) == sorted(
        [model_dir.name, (repo / PATHS["processed"]).parent.name])
    assert [p.name for p in (repo / PATHS["curves"]).parent.iterdir()] == [
        (repo / PATHS["curves"]).name]
