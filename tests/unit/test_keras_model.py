"""stages/frameworks/keras/model.py: the Keras networks train.model can name, and their model
file."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from stages.runtime import params
from stages.runtime.failures import DataError


def test_every_name_params_accepts_is_a_network():
    from stages.frameworks.keras import model as models

    assert tuple(models.MODELS) == params.MODEL_NAMES


def test_mlp_is_the_original_network():
    from stages.frameworks.keras import model as models

    model = models.build("mlp")
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["Flatten", "Dense", "Dropout", "Dense"]
    assert model.layers[1].units == 128 and model.layers[1].activation.__name__ == "relu"
    assert model.layers[2].rate == 0.2
    assert model.layers[3].units == 10 and model.layers[3].activation.__name__ == "softmax"
    assert model.count_params() == 784 * 128 + 128 + 128 * 10 + 10


@pytest.mark.slow
@pytest.mark.parametrize("name", params.MODEL_NAMES)
def test_models_map_images_to_ten_probabilities_and_pass_their_own_file_checks(name, tmp_path):
    from stages.frameworks.keras import model as models

    model = models.build(name)
    assert model.name == name
    x = np.random.default_rng(0).random((4, 28, 28), dtype=np.float32)
    probs = model.predict(x, verbose=0)
    assert probs.shape == (4, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert (probs >= 0).all()
    # Saved, it is far inside the caps its loading checks, and loads back through them.
    models.save(model, tmp_path)
    assert (tmp_path / models.MODEL_FILE).stat().st_size < models.FILE_CAP / 4
    assert np.allclose(models.predict(models.load(tmp_path), x, 4), probs, atol=1e-6)


# --- the model file ------------------------------------------------------------------------


def test_renumbered_shared_ids_keep_their_links():
    from stages.frameworks.keras.model import _renumber_shared_ids

    config = {"a": {"shared_object_id": 987}, "b": [{"shared_object_id": 123},
                                                    {"shared_object_id": 987}]}
    assert _renumber_shared_ids(config) == {
        "a": {"shared_object_id": 1}, "b": [{"shared_object_id": 2}, {"shared_object_id": 1}]}


def test_save_stable_is_byte_stable_and_loads_back_the_same_model(tmp_path):
    from stages.frameworks.keras import model as keras_model
    from stages.frameworks.keras.env import keras

    model = keras_model.build("mlp")
    x = np.random.default_rng(0).random((4, 28, 28), dtype=np.float32)
    probs = model.predict(x, verbose=0)
    keras_model.save_stable(model, tmp_path / "a.keras")
    keras_model.save_stable(model, tmp_path / "b.keras")
    assert (tmp_path / "a.keras").read_bytes() == (tmp_path / "b.keras").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.keras") as zf:
        assert {i.date_time for i in zf.infolist()} == {keras_model.FIXED_ZIP_TIME}
        assert json.loads(zf.read("metadata.json"))["date_saved"] == "1980-01-01@00:00:00"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.keras", "b.keras"]  # no raw
    loaded = keras.models.load_model(tmp_path / "a.keras")
    assert np.array_equal(loaded.predict(x, verbose=0), probs)


def test_save_load_and_predict_through_the_model_folder(tmp_path):
    from stages.frameworks.keras import model as keras_model

    model = keras_model.build("mlp")
    keras_model.save(model, tmp_path)
    x = np.random.default_rng(1).random((25, 28, 28), dtype=np.float32)
    probs = keras_model.predict(keras_model.load(tmp_path), x, 1000)
    assert probs.shape == (25, 10) and probs.dtype == np.float32
    assert np.allclose(probs, model.predict(x, verbose=0), atol=1e-6)
    assert np.allclose(keras_model.predict(model, x, 7), probs, atol=1e-6)  # any batch size


@pytest.mark.parametrize("content, reason", [
    (None, "cannot read the model file"), (b"not a zip", "not a model file of this project"),
    (b"PK\x03\x04" + bytes(50), "not a model file of this project")],
    ids=["missing", "garbage", "broken-zip"])
def test_load_refuses_a_model_it_cannot_read(tmp_path, content, reason):
    from stages.frameworks.keras import model as keras_model

    if content is not None:
        (tmp_path / "model.keras").write_bytes(content)
    with pytest.raises(DataError, match=f"^{tmp_path / 'model.keras'}: {reason}"):
        keras_model.load(tmp_path)
