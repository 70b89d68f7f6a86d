"""stages/models.py: the networks train.model can name."""

from __future__ import annotations

import numpy as np
import pytest

from stages import params


def test_every_name_params_accepts_is_a_network():
    from stages import models

    assert tuple(models.MODELS) == params.MODEL_NAMES


def test_mlp_is_the_original_network():
    from stages import models

    model = models.build("mlp")
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["Flatten", "Dense", "Dropout", "Dense"]
    assert model.layers[1].units == 128 and model.layers[1].activation.__name__ == "relu"
    assert model.layers[2].rate == 0.2
    assert model.layers[3].units == 10 and model.layers[3].activation.__name__ == "softmax"
    assert model.count_params() == 784 * 128 + 128 + 128 * 10 + 10


@pytest.mark.slow
@pytest.mark.parametrize("name", params.MODEL_NAMES)
def test_models_map_images_to_ten_probabilities(name):
    from stages import models

    model = models.build(name)
    assert model.name == name
    x = np.random.default_rng(0).random((4, 28, 28), dtype=np.float32)
    probs = model.predict(x, verbose=0)
    assert probs.shape == (4, 10) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert (probs >= 0).all()
