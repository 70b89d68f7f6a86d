"""stages/evaluate.py: the test set scored once, tables written with the class names."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest

from stages import evaluate
from stages.analysis import scoring
from stages.data.console import draw
from stages.normalize import normalize
from stages.runtime.outputs import round_floats, save_npz
from testbed.pipeline import copy_pipeline, stage_command
from testbed.pipeline import paths as dvc_vars
from testbed.processes import sh
from tests.digits import NAMED_CLASSES, fixture_data
from tests.projects import set_params, shipped_params

PATHS = dvc_vars()
DIGITS = [str(c) for c in range(10)]


def test_listing_is_the_original_format_with_class_names():
    images = np.zeros((3, 28, 28), np.float32)
    images[2, 5, 5] = 1.0
    text = evaluate.listing([(2, 5, 6, "0.9")], images, DIGITS)
    assert text.splitlines()[0] == "index 2: predicted 6, true 5"
    assert text.split("\n", 1)[1] == draw(images[2] * 255)
    named = evaluate.listing([(2, 5, 6, "0.9"), (0, 4, 1, "0.5")], images, NAMED_CLASSES)
    lines = named.splitlines()
    assert lines[0] == f"index 2: predicted {NAMED_CLASSES[6]}, true {NAMED_CLASSES[5]}"
    assert lines[29] == f"index 0: predicted {NAMED_CLASSES[1]}, true {NAMED_CLASSES[4]}"
    assert len(lines) == 2 * 29


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An untrained mlp, saved as the train stage saves it (fixed seed: fixed weights)."""
    from stages.frameworks.keras import model as keras_model
    from stages.frameworks.keras.env import keras

    keras.utils.set_random_seed(0)
    folder = tmp_path_factory.mktemp("model") / "model"
    folder.mkdir()
    keras_model.save(keras_model.build("mlp"), folder)
    (folder / "run_info.json").write_text(json.dumps({"framework": "keras", "model": "mlp"}))
    return folder


# --- through the stage's command line --------------------------------------------------------


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_cli_scores_the_model_and_writes_every_table_with_class_names(tmp_path, model_dir):
    repo = copy_pipeline(tmp_path / "p")
    set_params(repo, dataset={"classes": NAMED_CLASSES}, evaluate={"list_errors": True})
    data = fixture_data()
    save_npz(repo / PATHS["processed"], **normalize(data)[0])
    shutil.copytree(model_dir, repo / PATHS["model_dir"])
    proc = sh(repo, *stage_command("evaluate", repo), timeout=300)

    with np.load(repo / PATHS["predictions"]) as f:
        probs = f["probabilities"]
    y = data["y_test"].astype(np.int64)
    y_pred = probs.argmax(1)
    assert probs.shape == (500, 10) and probs.dtype == np.float32
    metrics = json.loads((repo / PATHS["metrics"]).read_text())
    headline = round_floats(scoring.headline(y, probs))
    assert {k: metrics[k] for k in headline} == headline
    assert metrics["label_errors"] + metrics["ambiguous"] + metrics["model_errors"] == (
        metrics["errors"])
    # Calibrated on the validation split train held out (the shipped cnn's recipe's).
    from stages.analysis import verdicts
    from stages.data.mnist import validation_split
    from stages.frameworks.keras import model as keras_model

    _, val = validation_split(1500, shipped_params()["train"]["cnn"]["val_fraction"], 42)
    val_probs = keras_model.predict(keras_model.load(model_dir),
                                    normalize(data)[0]["x_train"][val], 1000)
    assert metrics["temperature"] == round(
        verdicts.fit_temperature(val_probs, data["y_train"][val].astype(np.int64)), 6)
    assert f"500 samples, {metrics['errors']} wrong" in proc.stdout

    classes = read_csv(repo / PATHS["classes"])
    assert [r["class"] for r in classes] == NAMED_CLASSES  # the comma name is one field
    for got, want in zip(scoring.read_class_rows(classes),
                         scoring.class_table(y, y_pred, NAMED_CLASSES)):
        assert got == pytest.approx(want, abs=5e-7)
    pairs = scoring.read_pair_rows(read_csv(repo / PATHS["pairs"]))
    assert [p["pair"] for p in pairs] == [
        p["pair"] for p in scoring.confusion_pairs(y, y_pred, NAMED_CLASSES)]
    confusion = read_csv(repo / PATHS["confusion"])
    assert [(r["actual"], r["predicted"]) for r in confusion] == [
        (NAMED_CLASSES[t], NAMED_CLASSES[p]) for t, p in zip(y, y_pred)]
    wrong = read_csv(repo / PATHS["misclassified"])
    assert [int(r["index"]) for r in wrong] == np.flatnonzero(y_pred != y).tolist()
    assert len(wrong) == metrics["errors"]
    first = wrong[0]
    assert (f"index {first['index']}: predicted {first['predicted']}, true {first['true']}"
            in proc.stdout)  # list_errors: the original's listing
