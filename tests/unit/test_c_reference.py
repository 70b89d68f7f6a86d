"""The fast C programs (stages/frameworks/c/mnist_*.c) against the plain references a learner
reads (stages/frameworks/c/reference/), as llm.c's test_gpt2.c checks its fast code against
train_gpt2.c: the same weights and batch give the same class probabilities, loss, dropout
mask and every gradient within float tolerance, for both networks; and the same seed trains
along the same path.

The references pass the float64 checks of test_c.py and test_c_cnn.py themselves (their
`program` fixture runs them too): gradients against NumPy and finite differences, the same
bits for any thread count, a short training that learns, the one-line refusals.
"""

from __future__ import annotations

import numpy as np
import pytest

from stages.frameworks.c import model
from stages.normalize import normalize
from tests.cprograms import REFERENCE, c_program, lively_cnn, read_idx, write_idx
from tests.cprograms import run_program as run
from tests.digits import fixture_data

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits():
    return normalize(fixture_data())[0]


@pytest.fixture(scope="module", params=["mlp", "cnn"])
def pair(request):
    """(network, fast program, reference program)."""
    name = request.param
    return name, c_program(name), c_program(name, program=REFERENCE)


def weights(name: str):
    """Weights under which every part of the network shows: nonzero biases for the mlp,
    BatchNorm far from the identity for the cnn."""
    if name == "mlp":
        net = model.build("mlp", seed=7)
        return net._replace(b1=np.linspace(-0.05, 0.05, 128).astype(np.float32),
                            b2=np.linspace(-0.1, 0.1, 10).astype(np.float32))
    return lively_cnn(5, readout=0.03)


def grad(program, model_file, x_file, y_file, out, smoothing):
    proc = run(program, "grad", "--model", model_file, "--images", x_file, "--labels", y_file,
               "--seed", 11, "--label-smoothing", smoothing, "--out", out / "g.bin",
               "--mask", out / "m.idx", "--threads", 2)
    loss = float(proc.stdout.split("loss=")[1].split()[0])
    return loss, read_idx(out / "m.idx"), model.decode((out / "g.bin").read_bytes(), "grads")


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_same_batch_gives_the_same_loss_mask_and_gradients(pair, digits, tmp_path,
                                                                smoothing):
    name, fast, reference = pair
    net = weights(name)
    model.save(net, tmp_path)
    x = write_idx(tmp_path / "x.idx", digits["x_train"][:48])
    y = write_idx(tmp_path / "y.idx", digits["y_train"][:48].astype(np.uint8))
    found = {}
    for who, program in (("fast", fast), ("reference", reference)):
        (tmp_path / who).mkdir()
        found[who] = grad(program, tmp_path / model.MODEL_FILE, x, y, tmp_path / who,
                          smoothing)
    (fast_loss, fast_mask, fast_grads), (ref_loss, ref_mask, ref_grads) = found.values()
    assert np.array_equal(fast_mask, ref_mask)  # the same random numbers
    assert 0.5 < fast_mask.mean() < 0.95  # dropout on
    assert fast_loss == pytest.approx(ref_loss, rel=1e-5)
    for field, a, b in zip(type(net)._fields, fast_grads, ref_grads):
        scale = np.abs(b).max()
        assert scale > 0, field
        assert np.abs(a - b).max() <= 1e-4 * scale, field


def test_the_same_weights_give_the_same_probabilities(pair, digits, tmp_path):
    name, fast, reference = pair
    model.save(weights(name), tmp_path)
    x = write_idx(tmp_path / "x.idx", digits["x_test"][:200])
    probabilities = []
    for who, program in (("fast", fast), ("reference", reference)):
        run(program, "predict", "--model", tmp_path / model.MODEL_FILE, "--images", x,
            "--out", tmp_path / f"{who}.idx", "--threads", 2)
        probabilities.append(read_idx(tmp_path / f"{who}.idx").astype(np.float32))
    assert probabilities[0].shape == (200, 10)
    assert np.abs(probabilities[0] - probabilities[1]).max() < 1e-5


def test_the_same_seed_trains_along_the_same_path(pair, digits, tmp_path):
    """Same initial weights, batches, masks and augmentation draws: the epoch losses agree
    to float rounding's drift, and both models end close (the last bits differ: the sums
    run in other orders)."""
    name, fast, reference = pair
    n = 600 if name == "mlp" else 192
    x = write_idx(tmp_path / "x.idx", digits["x_train"][:n])
    y = write_idx(tmp_path / "y.idx", digits["y_train"][:n].astype(np.uint8))
    lines, nets = {}, {}
    for who, program in (("fast", fast), ("reference", reference)):
        out = run(program, "train", "--images", x, "--labels", y, "--out", tmp_path / who,
                  "--epochs", 2, "--batch-size", 32, "--rotation", 5, "--shift", 0.05,
                  "--seed", 3, "--threads", 2).stdout
        lines[who] = [float(line.split("loss=")[1].split()[0])
                      for line in out.splitlines() if line.startswith("epoch ")]
        nets[who] = model.decode((tmp_path / who).read_bytes(), who)
    assert len(lines["fast"]) == 2
    assert lines["fast"] == pytest.approx(lines["reference"], rel=2e-3)
    assert lines["reference"][1] < lines["reference"][0]  # it learns
    for field, a, b in zip(type(nets["fast"])._fields, nets["fast"], nets["reference"]):
        assert np.abs(a - b).max() <= 2e-2 * np.abs(b).max() + 1e-6, field
