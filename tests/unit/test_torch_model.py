"""stages/frameworks/torch/model.py: the PyTorch networks and their safetensors model file."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch  # make test installs PyTorch (make torch)

from stages.runtime import params
from stages.runtime.failures import DataError


def images(n=25, seed=0):
    return np.random.default_rng(seed).random((n, 28, 28), dtype=np.float32)


def test_every_name_params_accepts_is_a_network():
    from stages.frameworks.torch import model as torch_model

    assert tuple(torch_model.MODELS) == params.MODEL_NAMES
    assert all(torch_model.build(name).name == name for name in params.MODEL_NAMES)


def test_mlp_is_the_original_network_with_keras_initial_weights():
    from stages.frameworks.torch import model as torch_model

    model = torch_model.build("mlp")
    assert (model.fc1.in_features, model.fc1.out_features) == (784, 128)
    assert (model.fc2.in_features, model.fc2.out_features) == (128, 10)
    assert model.dropout.p == 0.2
    assert sum(p.numel() for p in model.parameters()) == 784 * 128 + 128 + 128 * 10 + 10
    # Glorot-uniform weights within sqrt(6 / (fan_in + fan_out)), zero biases (Keras').
    for layer in (model.fc1, model.fc2):
        limit = (6 / (layer.in_features + layer.out_features)) ** 0.5
        w = layer.weight.detach()
        assert w.abs().max() <= limit and w.abs().max() > 0.9 * limit
        assert torch.count_nonzero(layer.bias) == 0


def test_batchnorm_follows_keras_conventions():
    from stages.frameworks.torch import model as torch_model

    norms = [m for m in torch_model.build("cnn_large").modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 5
    assert all((m.eps, m.momentum) == (1e-3, 0.01) for m in norms)


@pytest.mark.parametrize("name", params.MODEL_NAMES)
def test_networks_map_images_to_ten_probabilities_whatever_the_batch_size(name):
    from stages.frameworks.torch import model as torch_model

    model = torch_model.build(name)
    x = images()
    probs = torch_model.predict(model, x, 1000)
    assert probs.shape == (25, 10) and probs.dtype == np.float32
    assert np.allclose(probs.sum(1), 1, atol=1e-5) and (probs >= 0).all()
    assert np.allclose(torch_model.predict(model, x, 7), probs, atol=1e-6)


@pytest.mark.parametrize("name", params.MODEL_NAMES)
def test_the_model_file_is_byte_stable_tensors_only_and_loads_back(tmp_path, name):
    from stages.frameworks.torch import model as torch_model

    model = torch_model.build(name)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        torch_model.save(model, tmp_path / folder)
    data = (tmp_path / "a" / torch_model.MODEL_FILE).read_bytes()
    assert data == (tmp_path / "b" / torch_model.MODEL_FILE).read_bytes()
    # safetensors: an 8-byte header length, a JSON header, then the raw tensor bytes and
    # nothing else, so no byte of it is code (no pickle).
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    assert header.pop("__metadata__") == {"model": name}
    state = model.state_dict()
    assert set(header) == set(state)
    assert 8 + length + sum(v.numel() * v.element_size() for v in state.values()) == len(data)
    loaded = torch_model.load(tmp_path / "a")
    assert not loaded.training  # ready to predict
    assert np.array_equal(torch_model.predict(loaded, images(), 100),
                          torch_model.predict(model, images(), 100))


def test_load_refuses_what_is_not_one_of_its_model_files(tmp_path):
    from safetensors.torch import save_file

    from stages.frameworks.torch import model as torch_model

    path = tmp_path / torch_model.MODEL_FILE
    with pytest.raises(DataError, match=f"^{path}: cannot read the model file"):
        torch_model.load(tmp_path)  # missing
    path.write_bytes(b"not a model at all")
    with pytest.raises(DataError, match=f"^{path}: not a safetensors model file"):
        torch_model.load(tmp_path)
    torch.save(torch_model.build("mlp").state_dict(), path)  # a pickle, never unpickled
    with pytest.raises(DataError, match=f"^{path}: not a safetensors model file"):
        torch_model.load(tmp_path)
    save_file({"w": torch.zeros(2)}, path, metadata={"model": "resnet"})
    with pytest.raises(DataError, match=r"names no network of this project \('resnet'\)"):
        torch_model.load(tmp_path)
    save_file(torch_model.build("mlp").state_dict(), path, metadata={"model": "cnn"})
    with pytest.raises(DataError, match=f"^{path}: its tensors are not those of the cnn"):
        torch_model.load(tmp_path)  # the tensors are not that network's
