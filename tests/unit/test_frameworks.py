"""stages/frameworks/__init__.py: one seam for every framework, and the frameworks agree.

The parity tests load one Keras network's weights into its PyTorch twin and compare the
probabilities: the same architecture, layer for layer, to float tolerance.
"""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import pytest

from stages import frameworks
from stages.frameworks.trainers import trainer
from stages.normalize import normalize
from stages.runtime import params
from stages.runtime.failures import DataError
from testbed.processes import sh
from tests.digits import fixture_data
from tests.paths import ROOT


def test_each_framework_is_in_both_registries_with_its_own_modules():
    for framework in params.FRAMEWORKS:
        network = frameworks.network(framework)
        trained = trainer(framework)
        package = f"stages.frameworks.{framework}"
        assert network.framework == framework and trained.network == network
        assert network.configure.__module__ == network.versions.__module__ == f"{package}.env"
        assert {f.__module__ for f in (network.save, network.load, network.predict)} == {
            f"{package}.model"}
        model = sys.modules[f"{package}.model"]
        supported = params.C_MODELS if framework == "c" else params.MODEL_NAMES
        assert network.model_file == model.MODEL_FILE and tuple(model.MODELS) == supported
        assert trained.fit.__module__ == f"{package}.fit"
        # Only PyTorch trains in several processes (train.torch.workers).
        assert (trained.launch is not None) == (framework == "torch")
        if trained.launch:
            assert trained.launch.__module__ == f"{package}.launcher"


def test_the_registries_refuse_a_framework_they_do_not_have():
    for registry in (frameworks.network, trainer):
        with pytest.raises(DataError, match="^framework 'jax' is none of keras, torch, c$"):
            registry("jax")


@pytest.fixture(scope="module", params=[*((f, "mlp") for f in params.FRAMEWORKS), ("c", "cnn")],
                ids=lambda p: "-".join(p))
def model_dir(request, tmp_path_factory):
    """An untrained mlp of each framework, and the C cnn, saved as the train stage saves
    them."""
    framework, name = request.param
    folder = tmp_path_factory.mktemp(framework)
    frameworks.network(framework).save(sys.modules[f"stages.frameworks.{framework}.model"]
                                       .build(name), folder)
    (folder / frameworks.RUN_INFO).write_text(json.dumps({"framework": framework}))
    return folder


PREDICT = textwrap.dedent("""
    import sys
    import numpy as np
    from stages import frameworks
    x = np.load(sys.argv[2])
    np.save(sys.argv[3], frameworks.predict(sys.argv[1], x, int(sys.argv[4]), 1, 1))
""")


@pytest.mark.slow
def test_predict_reads_which_framework_made_the_model_and_gives_probabilities(
        model_dir, tmp_path):
    """In a fresh process, as evaluate runs it: predict() pins the framework's threads,
    which a process can do only before the framework has run anything. The batch size
    bounds memory only: this process's predictions in batches of 7 are the same."""
    x = normalize(fixture_data())[0]["x_test"][:25]
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "p.npy"
    sh(ROOT, sys.executable, "-c", PREDICT, str(model_dir), str(tmp_path / "x.npy"), str(out),
       "1000", timeout=300)
    probs = np.load(out)
    assert probs.shape == (25, 10) and probs.dtype == np.float32
    assert np.allclose(probs.sum(1), 1, atol=1e-5)
    network = frameworks.network(frameworks.framework_of(model_dir))
    loaded = network.load(model_dir)
    assert np.allclose(network.predict(loaded, x, 1000), probs, atol=1e-6)
    assert np.allclose(network.predict(loaded, x, 7), probs, atol=1e-6)


def test_a_run_info_from_before_the_framework_key_means_keras(tmp_path):
    (tmp_path / frameworks.RUN_INFO).write_text(json.dumps({"model": "cnn"}))
    assert frameworks.framework_of(tmp_path) == "keras"


@pytest.mark.parametrize("content, message", [
    (None, "cannot read the model's run info"),
    ("{not json", "cannot read the model's run info"),
    ('{"framework": "jax"}', "framework 'jax' is none of keras, torch"),
    ("[1, 2]", "framework None is none of keras, torch"),
])
def test_framework_of_refuses_a_folder_that_is_not_a_model(tmp_path, content, message):
    if content is not None:
        (tmp_path / frameworks.RUN_INFO).write_text(content)
    with pytest.raises(DataError, match=f"^{tmp_path / frameworks.RUN_INFO}: {message}"):
        frameworks.framework_of(tmp_path)


# --- Keras and PyTorch: the same networks ----------------------------------------------------


def keras_weights_into_torch(keras_net, torch_net) -> None:
    """Copy every Keras layer's weights into the PyTorch module at the same place.

    Both list their weighted layers in the same order. Conv kernels go from Keras' [h, w,
    in, out] to [out, in, h, w]; dense kernels are transposed, and the first dense layer
    after a conv map has its rows reordered from Keras' (h, w, c) flattening to PyTorch's
    (c, h, w).
    """
    import torch

    keras_layers = [layer for layer in keras_net.layers if layer.get_weights()]
    torch_layers = [m for m in torch_net.modules()
                    if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d,
                                      torch.nn.modules.batchnorm._BatchNorm))]
    assert len(keras_layers) == len(torch_layers)
    channels = None  # of the last conv map, until a dense layer has flattened it
    for k, t in zip(keras_layers, torch_layers):
        w = k.get_weights()
        if isinstance(t, torch.nn.Conv2d):
            tensors = {"weight": w[0].transpose(3, 2, 0, 1)}
            channels = w[0].shape[-1]
        elif isinstance(t, torch.nn.Linear):
            kernel = w[0]
            if channels:  # rows in Keras' (h, w, c) order -> PyTorch's (c, h, w)
                side = int(round((kernel.shape[0] // channels) ** 0.5))
                kernel = kernel.reshape(side, side, channels, -1).transpose(2, 0, 1, 3)
                kernel = kernel.reshape(channels * side * side, -1)
                channels = None
            tensors = {"weight": kernel.T} | ({"bias": w[1]} if len(w) > 1 else {})
        else:  # BatchNorm: gamma, beta, moving mean, moving variance
            tensors = dict(zip(("weight", "bias", "running_mean", "running_var"), w))
        for name, value in tensors.items():
            getattr(t, name).data.copy_(torch.from_numpy(np.ascontiguousarray(value)))


@pytest.mark.parametrize("name", params.MODEL_NAMES)
def test_keras_and_torch_networks_have_the_same_weights(name):
    from stages.frameworks.keras import model as keras_model
    from stages.frameworks.torch import model as torch_model

    keras_net, torch_net = keras_model.build(name), torch_model.build(name)
    assert sum(int(np.prod(w.shape)) for w in keras_net.trainable_weights) == sum(
        p.numel() for p in torch_net.parameters())
    assert sum(int(np.prod(w.shape)) for w in keras_net.non_trainable_weights) == sum(
        b.numel() for n, b in torch_net.named_buffers() if not n.endswith("num_batches_tracked"))


@pytest.mark.parametrize("name", params.MODEL_NAMES)
def test_the_same_weights_give_the_same_probabilities_in_both_frameworks(name):
    from stages.frameworks.keras import model as keras_model
    from stages.frameworks.torch import model as torch_model

    keras_net = keras_model.build(name)
    rng = np.random.default_rng(1)
    # Random BatchNorm statistics too, so that every weight of the forward pass matters.
    keras_net.set_weights([
        rng.uniform(0.5, 1.5, w.shape).astype(np.float32) if "variance" in w.path
        else rng.normal(0, 0.1 if "moving" in w.path or "beta" in w.path else 1,
                        w.shape).astype(np.float32) * (1 if "kernel" not in w.path else
                                                       (2 / np.prod(w.shape[:-1])) ** 0.5)
        for w in keras_net.weights])
    torch_net = torch_model.build(name)
    keras_weights_into_torch(keras_net, torch_net)
    x = normalize(fixture_data())[0]["x_test"][:64]
    keras_probs = keras_model.predict(keras_net, x, 64)
    torch_probs = torch_model.predict(torch_net, x, 64)
    assert keras_probs.max(1).mean() < 0.99  # not saturated: the comparison has teeth
    assert np.abs(keras_probs - torch_probs).max() < 1e-5
    assert np.array_equal(keras_probs.argmax(1), torch_probs.argmax(1))
