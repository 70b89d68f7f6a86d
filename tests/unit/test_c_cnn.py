"""stages/frameworks/c: the plain-C convnet (mnist_cnn.c, Keras' cnn) against references.

Its model file is checked here for round trips and one-line refusals; its NumPy forward pass
(what evaluate runs) against Keras on the same weights; a float64 NumPy reference of one
training step (batch-statistics BatchNorm, an explicit dropout mask, smoothed labels)
against central finite differences; and the program, run as a real process, against both:
its gradients and batch statistics against the reference, its predictions against NumPy's
and against themselves on another thread count. The checks marked `on_every_toolchain...`
run with each of the toolchains of stages/frameworks/c/env.py: the native compiler, the same
at AVX2's width (256-bit vectors), clang without OpenMP, GCC's AArch64 cross compiler with
the program run under qemu (whose emulation makes the cnn some 200 times slower: those
checks are the cheap ones, and one short training), and GCC's sanitizers at x86-64's
baseline, whose 128-bit vectors take AArch64's code paths.
The checks marked `on_every_toolchain_and_the_reference` or `fast_and_reference` also
run with the plain reference program (stages/frameworks/c/reference/mnist_cnn.c).
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from stages.frameworks.c import fit, model
from stages.normalize import normalize
from stages.runtime.failures import DataError
from tests.cprograms import (
    fast_and_reference,
    lively_cnn,
    on_every_toolchain_and_the_reference,
    program_for,
    read_idx,
    write_idx,
)
from tests.cprograms import run_program as run
from tests.digits import fixture_data

EPSILON, RATE = model.BN_EPSILON, model.DROPOUT


@pytest.fixture(scope="module")
def program(request):
    """mnist_cnn, built with the toolchain a test is handed (on_every_toolchain), or the
    reference one (REFERENCE), else the native fast one."""
    return program_for("cnn", request)


@pytest.fixture(scope="module")
def digits():
    """The fixture's scaled images and labels: train and test."""
    return normalize(fixture_data())[0]


def offset(field: str) -> int:
    """Where the array `field` starts in a cnn model file."""
    before = model.CNN_SHAPES[:model.CNN._fields.index(field)]
    return model.CNN_HEADER.size + 4 * sum(int(np.prod(s)) for s in before)


# --- the model file ---------------------------------------------------------------------------


def test_model_file_round_trips_byte_for_byte(tmp_path):
    net = lively_cnn(3)
    model.save(net, tmp_path)
    data = (tmp_path / model.MODEL_FILE).read_bytes()
    assert len(data) == model.CNN_SIZE == 588_484 and data[:8] == b"MNISTCNN"
    assert struct.unpack_from("<5I", data, 8) == (1, 32, 64, 128, 10)
    loaded = model.load(tmp_path)
    assert isinstance(loaded, model.CNN) and loaded._fields == model.CNN._fields
    assert all(a.dtype == np.float32 and np.array_equal(a, b) for a, b in zip(loaded, net))
    assert model.encode(loaded) == data
    # C order, Keras' shapes, in get_weights() order: two entries where they must be.
    at = offset("conv2") + 4 * (((1 * 5 + 2) * 32 + 3) * 64 + 4)  # [1][2][3][4] of [5][5][32][64]
    assert struct.unpack_from("<f", data, at)[0] == net.conv2[1, 2, 3, 4]
    assert struct.unpack_from("<f", data, len(data) - 4)[0] == net.dense_bias[-1]
    # The mlp's file is still the mlp's, through the same functions.
    model.save(model.build("mlp", seed=3), tmp_path)
    assert isinstance(model.load(tmp_path), model.MLP)


@pytest.mark.parametrize("damage, message", [
    (lambda d: d[:-4], "588480 bytes; a model file has 588484"),
    (lambda d: d[:20], "20 bytes; a MNISTCNN model file has 588484"),
    (lambda d: b"MNISTCNX" + d[8:], "not a model file of the C program"),
    (lambda d: d[:8] + struct.pack("<I", 2) + d[12:], "version 2"),
    (lambda d: d[:12] + struct.pack("<I", 16) + d[16:], r"sizes \(16, 64, 128, 10\)"),
    (lambda d: d[:-4] + struct.pack("<f", float("nan")), "not finite"),
    (lambda d: d[:offset("conv3") + 8] + struct.pack("<f", float("inf"))
     + d[offset("conv3") + 12:], "not finite"),
    (lambda d: d[:offset("bn2_var") + 4] + struct.pack("<f", -0.5) + d[offset("bn2_var") + 8:],
     "BatchNorm 2 has a negative moving variance"),
], ids=["truncated", "header only", "wrong magic", "wrong version", "wrong sizes",
        "NaN weight", "infinite weight", "negative variance"])
def test_a_damaged_model_file_is_refused_in_one_line(tmp_path, damage, message):
    model.save(lively_cnn(0), tmp_path)
    path = tmp_path / model.MODEL_FILE
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError, match=message) as err:
        model.load(tmp_path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_negative_gammas_and_a_zero_variance_are_weights_like_any(tmp_path):
    net = lively_cnn(1)._replace(bn1_gamma=-np.ones(32, np.float32),
                             bn3_var=np.zeros(128, np.float32))
    model.save(net, tmp_path)
    assert model.encode(model.load(tmp_path)) == model.encode(net)


def test_build_is_keras_initialisation():
    from stages.frameworks.keras import model as keras_model

    keras_weights = keras_model.build("cnn").get_weights()
    net = model.build("cnn", seed=4)
    assert [a.shape for a in net] == [w.shape for w in keras_weights] == list(model.CNN_SHAPES)
    for name, ours, theirs in zip(model.CNN._fields, net, keras_weights):
        assert ours.dtype == np.float32, name
        if ours.ndim == 1:  # gamma 1, beta 0, moving mean 0, moving variance 1, bias 0
            assert np.array_equal(ours, theirs), name
        else:  # Glorot-uniform over the same fans: the same bound, filled
            *window, fan_in, fan_out = theirs.shape
            fans = int(np.prod(window, dtype=np.int64))
            limit = np.sqrt(6 / (fans * fan_in + fans * fan_out))
            # Keras' draw (whatever its generator's state) and ours within the one bound;
            # ours fills it (seeded, so this does not depend on what ran before).
            assert np.abs(theirs).max() <= limit * 1.001, name
            assert 0.9 * limit < np.abs(ours).max() <= limit * 1.001, name
            assert ours.std() == pytest.approx(limit / np.sqrt(3), rel=0.1), name
    assert model.encode(model.build("cnn", seed=4)) == model.encode(net)
    assert model.encode(model.build("cnn", seed=5)) != model.encode(net)


# --- the forward pass -------------------------------------------------------------------------


def test_numpy_predicts_as_keras_on_the_same_weights(digits, tmp_path):
    from stages.frameworks.keras import model as keras_model

    keras_net = keras_model.build("cnn")
    keras_net.set_weights(list(lively_cnn(5)))
    net = model.CNN(*keras_net.get_weights())  # the layouts agree: no reordering
    model.save(net, tmp_path)
    net = model.load(tmp_path)
    x = digits["x_test"][:300]
    keras_probs = keras_model.predict(keras_net, x, 100)
    # Neither saturated nor flat: the comparison has teeth.
    assert 0.25 < keras_probs.max(1).mean() < 0.99
    assert len(np.unique(keras_probs.argmax(1))) >= 3
    probs = model.predict(net, x, 1000)
    assert probs.shape == (300, 10) and probs.dtype == np.float32
    assert np.abs(probs - keras_probs).max() < 1e-5
    assert np.array_equal(probs.argmax(1), keras_probs.argmax(1))
    # The batch size bounds memory only.
    assert np.abs(model.predict(net, x, 7) - probs).max() < 1e-6
    assert model.predict(net, x[:0], 100).shape == (0, 10)


# --- the arithmetic ---------------------------------------------------------------------------


def windows(x, side):
    """x's side×side windows, NHWC -> N, H', W', kh, kw, C."""
    return sliding_window_view(x, (side, side), axis=(1, 2)).transpose(0, 1, 2, 4, 5, 3)


def conv(x, kernel):
    """Valid cross-correlation, NHWC by HWIO."""
    return np.tensordot(windows(x, kernel.shape[0]), kernel, axes=((3, 4, 5), (0, 1, 2)))


def conv_backward(x, kernel, d_out):
    """The gradients of conv(x, kernel) for the kernel and for x."""
    side = kernel.shape[0]
    d_kernel = np.tensordot(windows(x, side), d_out, axes=((0, 1, 2), (0, 1, 2)))
    padded = np.pad(d_out, ((0, 0), (side - 1,) * 2, (side - 1,) * 2, (0, 0)))
    return d_kernel, conv(padded, kernel[::-1, ::-1].transpose(0, 1, 3, 2))


def pool(z):
    """2×2 max-pooling; and which of each window's four (row-major) is the first largest."""
    n, h, w, c = z.shape
    blocks = z.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(
        n, h // 2, w // 2, c, 4)
    return blocks.max(-1), blocks.argmax(-1)


def pool_backward(d_pooled, first, shape):
    n, h, w, c = shape
    routed = d_pooled[..., None] * (np.arange(4) == first[..., None])
    return routed.reshape(n, h // 2, w // 2, c, 2, 2).transpose(0, 1, 4, 2, 5, 3).reshape(shape)


def batch_norm(h, gamma, beta):
    """Training-mode BatchNorm: the batch's mean and biased variance over (N, H, W)."""
    mean, var = h.mean((0, 1, 2)), h.var((0, 1, 2))
    normalized = (h - mean) / np.sqrt(var + EPSILON)
    return gamma * normalized + beta, normalized, mean, var


def batch_norm_backward(d_out, normalized, var, gamma):
    d_gamma, d_beta = (d_out * normalized).sum((0, 1, 2)), d_out.sum((0, 1, 2))
    d_in = gamma / np.sqrt(var + EPSILON) * (
        d_out - d_out.mean((0, 1, 2)) - normalized * (d_out * normalized).mean((0, 1, 2)))
    return d_in, d_gamma, d_beta


def reference(net: model.CNN, x, y, mask, smoothing,
              gradients: bool = True) -> tuple[float, model.CNN | None]:
    """One training step's mean smoothed cross-entropy of a batch, float64 NumPy, and a
    CNN laid out as the program's gradient file: the loss's gradient in each trainable
    slot, each BatchNorm's batch mean and biased batch variance in its moving ones. With
    gradients=False, the forward pass alone: the loss, and None."""
    w = model.CNN(*(np.asarray(a, np.float64) for a in net))
    n = len(x)
    a0 = np.asarray(x, np.float64).reshape(n, 28, 28, 1)
    z1 = conv(a0, w.conv1)
    p1, first1 = pool(z1)
    b1, hat1, mean1, var1 = batch_norm(p1, w.bn1_gamma, w.bn1_beta)
    a1 = np.maximum(b1, 0)
    z2 = conv(a1, w.conv2)
    p2, first2 = pool(z2)
    b2, hat2, mean2, var2 = batch_norm(p2, w.bn2_gamma, w.bn2_beta)
    a2 = np.maximum(b2, 0)
    a2_padded = np.pad(a2, ((0, 0), (1, 1), (1, 1), (0, 0)))
    z3 = conv(a2_padded, w.conv3)
    b3, hat3, mean3, var3 = batch_norm(z3, w.bn3_gamma, w.bn3_beta)
    a3 = np.maximum(b3, 0)
    dropped = a3.reshape(n, model.FEATURES) * mask / (1 - RATE)
    logits = dropped @ w.dense + w.dense_bias
    shifted = logits - logits.max(1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(1, keepdims=True))
    target = np.full(logits.shape, smoothing / 10)
    target[np.arange(n), y] += 1 - smoothing
    loss = -(target * log_p).sum(1).mean()
    if not gradients:
        return loss, None

    d_logits = (np.exp(log_p) - target) / n
    d_dense, d_bias = dropped.T @ d_logits, d_logits.sum(0)
    d_a3 = ((d_logits @ w.dense.T) * mask / (1 - RATE)).reshape(a3.shape)
    d_z3, d_gamma3, d_beta3 = batch_norm_backward(d_a3 * (b3 > 0), hat3, var3, w.bn3_gamma)
    d_conv3, d_a2_padded = conv_backward(a2_padded, w.conv3, d_z3)
    d_b2 = d_a2_padded[:, 1:-1, 1:-1] * (b2 > 0)
    d_p2, d_gamma2, d_beta2 = batch_norm_backward(d_b2, hat2, var2, w.bn2_gamma)
    d_conv2, d_a1 = conv_backward(a1, w.conv2, pool_backward(d_p2, first2, z2.shape))
    d_p1, d_gamma1, d_beta1 = batch_norm_backward(d_a1 * (b1 > 0), hat1, var1, w.bn1_gamma)
    d_conv1, _ = conv_backward(a0, w.conv1, pool_backward(d_p1, first1, z1.shape))
    return loss, model.CNN(d_conv1, d_gamma1, d_beta1, mean1, var1,
                           d_conv2, d_gamma2, d_beta2, mean2, var2,
                           d_conv3, d_gamma3, d_beta3, mean3, var3, d_dense, d_bias)


def batch(digits, n=8):
    return digits["x_train"][:n], digits["y_train"][:n].astype(np.uint8)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_reference_agrees_with_central_differences(digits, smoothing):
    x, y = batch(digits)
    rng = np.random.default_rng(1)
    mask = (rng.random((len(x), model.FEATURES)) >= RATE).astype(np.float64)
    net = lively_cnn(7, readout=0.03)  # about ln 10 after BatchNorm on the batch
    loss, grads = reference(net, x, y, mask, smoothing)
    assert np.log(10) / 3 < loss < 3 * np.log(10)
    # The batch statistics are the batch's: BatchNorm's output is centred and scaled.
    assert np.all(grads.bn3_var > 0) and not np.allclose(grads.bn1_mean, net.bn1_mean)
    for name in model.TRAINABLE:
        which = model.CNN._fields.index(name)
        grad = getattr(grads, name)
        assert np.abs(grad).max() > 0, name
        # The steepest entry, and three anywhere.
        picks = [np.unravel_index(np.abs(grad).argmax(), grad.shape)]
        picks += [tuple(rng.integers(0, s) for s in grad.shape) for _ in range(3)]
        for at in picks:
            arrays = [np.asarray(a, np.float64).copy() for a in net]
            h = 1e-6
            arrays[which][at] += h
            up = reference(model.CNN(*arrays), x, y, mask, smoothing, gradients=False)[0]
            arrays[which][at] -= 2 * h
            down = reference(model.CNN(*arrays), x, y, mask, smoothing, gradients=False)[0]
            assert (up - down) / (2 * h) == pytest.approx(grad[at], rel=1e-4, abs=1e-8), (
                name, at)


# --- the program ------------------------------------------------------------------------------


@pytest.mark.slow
@on_every_toolchain_and_the_reference
@pytest.mark.parametrize("smoothing, images", [(0.0, 8), (0.1, 64)])
def test_the_programs_backward_pass_agrees_with_the_reference(program, digits, tmp_path,
                                                             smoothing, images):
    """8 images, and 64: a batch whose conv1 positions (64 x 576) split into the weight
    gradient's four ranges at places other than a chunk's or an image's boundary."""
    net = lively_cnn(5, readout=0.03)  # moving statistics unlike the batch's: using them shows
    model.save(net, tmp_path)
    x, y = batch(digits, images)
    proc = run(program, "grad", "--model", tmp_path / model.MODEL_FILE,
               "--images", write_idx(tmp_path / "x.idx", x),
               "--labels", write_idx(tmp_path / "y.idx", y), "--seed", 11,
               "--label-smoothing", smoothing, "--out", tmp_path / "g.bin",
               "--mask", tmp_path / "m.idx", "--threads", 1)
    mask = read_idx(tmp_path / "m.idx")
    assert mask.dtype == np.uint8 and mask.shape == (images, model.FEATURES)
    assert set(np.unique(mask)) <= {0, 1} and 0.65 < mask.mean() < 0.75  # dropout 0.3 on
    data = (tmp_path / "g.bin").read_bytes()
    assert data[:model.CNN_HEADER.size] == model.encode(net)[:model.CNN_HEADER.size]
    c_grads = model.decode(data, "gradients")
    loss, grads = reference(net, x, y, mask.astype(np.float64), smoothing)
    assert float(proc.stdout.split("loss=")[1].split()[0]) == pytest.approx(loss, rel=1e-5)
    for name, c, ref in zip(model.CNN._fields, c_grads, grads):
        scale = np.abs(ref).max()
        assert scale > 0, name
        tolerance = 1e-4 if name in model.TRAINABLE else 1e-5  # statistics: forward only
        assert np.abs(c - ref).max() < tolerance * scale, name


@pytest.mark.slow
@fast_and_reference
def test_the_program_predicts_as_numpy_whatever_the_thread_count(program, digits, tmp_path):
    net = lively_cnn(6)
    model.save(net, tmp_path)
    x = digits["x_test"][:300]
    images = write_idx(tmp_path / "x.idx", x)
    outputs = []
    for threads in (1, 2):
        out = tmp_path / f"p{threads}.idx"
        run(program, "predict", "--model", tmp_path / model.MODEL_FILE, "--images", images,
            "--out", out, "--threads", threads)
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]
    probs = read_idx(tmp_path / "p1.idx")
    assert probs.shape == (300, 10)
    expected = model.predict(net, x, 1000)
    assert 0.25 < expected.max(1).mean() < 0.99
    assert np.abs(probs - expected).max() < 1e-5


@pytest.mark.slow
def test_the_program_predicts_as_keras_on_weights_exported_from_keras(program, digits,
                                                                      tmp_path):
    from stages.frameworks.keras import model as keras_model

    keras_net = keras_model.build("cnn")
    keras_net.set_weights(list(lively_cnn(5)))
    model.save(model.CNN(*keras_net.get_weights()), tmp_path)
    x = digits["x_test"][:300]
    run(program, "predict", "--model", tmp_path / model.MODEL_FILE,
        "--images", write_idx(tmp_path / "x.idx", x), "--out", tmp_path / "p.idx")
    keras_probs = keras_model.predict(keras_net, x, 100)
    assert 0.25 < keras_probs.max(1).mean() < 0.99  # inference-mode BatchNorm, unsaturated
    probs = read_idx(tmp_path / "p.idx")
    assert np.abs(probs - keras_probs).max() < 1e-5
    assert np.array_equal(probs.argmax(1), keras_probs.argmax(1))


# --- training ---------------------------------------------------------------------------------


def train(program, tmp_path, digits, name, *options, n=400):
    images = tmp_path / "x.idx"
    if not images.exists():
        write_idx(images, digits["x_train"][:n])
        write_idx(tmp_path / "y.idx", digits["y_train"][:n].astype(np.uint8))
        write_idx(tmp_path / "vx.idx", digits["x_test"][:200])
        write_idx(tmp_path / "vy.idx", digits["y_test"][:200].astype(np.uint8))
    out = tmp_path / name
    proc = run(program, "train", "--images", images, "--labels", tmp_path / "y.idx",
               "--out", out, *options)
    return out.read_bytes(), proc.stdout


@pytest.mark.slow
@fast_and_reference
def test_training_gives_the_same_bits_whatever_the_thread_count(program, digits, tmp_path):
    """Every knob on: augmentation, cosine decay, label smoothing, validation, restore_best;
    a last batch shorter than the others (400 = 3 x 128 + 16)."""
    recipe = ("--epochs", 3, "--batch-size", 128, "--schedule", "cosine", "--rotation", 10,
              "--shift", 0.1, "--zoom", 0.1, "--label-smoothing", 0.1, "--restore-best", 1,
              "--val-images", tmp_path / "vx.idx", "--val-labels", tmp_path / "vy.idx",
              "--learning-rate", 0.002, "--seed", 3)
    one, report = train(program, tmp_path, digits, "a.bin", *recipe, "--threads", 1)
    assert one == train(program, tmp_path, digits, "b.bin", *recipe, "--threads", 2)[0]
    assert one == train(program, tmp_path, digits, "c.bin", *recipe, "--threads", 3)[0]
    assert one != train(program, tmp_path, digits, "d.bin", *recipe[:-1], 4, "--threads", 2)[0]
    net = model.decode(one, "the trained model")
    assert isinstance(net, model.CNN)
    assert not np.array_equal(net.bn2_mean, np.zeros_like(net.bn2_mean))  # statistics moved
    epochs = [fit.fields(line) for line in report.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 3 and all("val_accuracy" in e for e in epochs)
    assert float(epochs[2]["loss"]) < float(epochs[0]["loss"])  # it learns
    # The fast program times each layer; the reference keeps timers out of its arithmetic.
    layers = [line.split()[1] for line in report.splitlines() if line.startswith("layer ")]
    assert layers == ([] if program.kind == "reference" else
                      ["conv1", "conv2", "conv3", "dense"])
    summary = fit.fields(report.splitlines()[-1])
    # 3 epochs of 400 images: forward + backward, conv1 without an input gradient.
    per_image = 2 * (3 * (64 * 800 * 64 + 16 * 576 * 128 + 2048 * 10) + 2 * 576 * 25 * 32)
    assert float(summary["executed_gflop"]) > 3 * 400 * per_image * 1e-9


@pytest.mark.slow
@on_every_toolchain_and_the_reference
def test_a_short_training_learns_and_its_model_predicts_as_numpy(program, digits, tmp_path):
    """The cheapest training that shows learning, for every toolchain (under emulation too):
    64 images, 2 epochs of 4 steps. It shows in the training accuracy (batch statistics,
    dropout on): after 8 steps BatchNorm's moving statistics, which predictions use, still lag
    the weights, so held-out accuracy means nothing yet. The model it writes predicts as
    NumPy does with its weights, on 1 thread and on 2 alike."""
    trained, report = train(program, tmp_path, digits, "m.bin", "--epochs", 2,
                            "--batch-size", 16, "--rotation", 0, "--shift", 0, "--zoom", 0,
                            "--threads", 2, n=64)
    epochs = [fit.fields(line) for line in report.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2
    assert float(epochs[1]["loss"]) < float(epochs[0]["loss"]) / 2
    assert float(epochs[1]["accuracy"]) > 0.7  # chance: 0.1
    x = digits["x_test"][:50]
    images = write_idx(tmp_path / "tx.idx", x)
    for threads in (1, 2):
        run(program, "predict", "--model", tmp_path / "m.bin", "--images", images,
            "--out", tmp_path / f"p{threads}.idx", "--threads", threads)
    assert (tmp_path / "p1.idx").read_bytes() == (tmp_path / "p2.idx").read_bytes()
    expected = model.predict(model.decode(trained, "the trained model"), x, 50)
    assert np.abs(read_idx(tmp_path / "p1.idx") - expected).max() < 1e-5


@pytest.mark.slow
@on_every_toolchain_and_the_reference
@pytest.mark.parametrize("args, message", [
    (("--epochs", 0), "--epochs"),
    (("--batch-size", 2049), "--batch-size: 2049 is out of range 1..2048"),
    (("--schedule", "linear"), "--schedule"),
    (("--label-smoothing", 1), "--label-smoothing"),
    (("--frobnicate", 1), "--frobnicate"),
])
def test_bad_options_are_refused_in_one_line_before_any_work(program, digits, tmp_path,
                                                            args, message):
    write_idx(tmp_path / "x.idx", digits["x_train"][:50])
    write_idx(tmp_path / "y.idx", digits["y_train"][:50].astype(np.uint8))
    proc = run(program, "train", "--images", tmp_path / "x.idx", "--labels",
               tmp_path / "y.idx", "--out", tmp_path / "m.bin", *args, check=False)
    assert proc.returncode == 1 and proc.stdout == "", proc.stderr  # 1: not a sanitizer's end
    assert proc.stderr.startswith("mnist_cnn: error: ") and proc.stderr.count("\n") == 1
    assert message in proc.stderr
    assert not (tmp_path / "m.bin").exists()


@pytest.mark.slow
@on_every_toolchain_and_the_reference
@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:-4], "588480 bytes; a model file of this program has 588484"),
    (lambda data: b"MNISTMLP" + data[8:], "no MNISTCNN header"),
    (lambda data: data[:8] + struct.pack("<I", 2) + data[12:], "header field 0 is 2"),
    (lambda data: data[:offset("conv2")] + struct.pack("<f", float("inf"))
     + data[offset("conv2") + 4:], "is not a finite number"),
    (lambda data: data[:offset("bn3_var")] + struct.pack("<f", -1.0)
     + data[offset("bn3_var") + 4:], "BatchNorm 3's moving variance is negative"),
])
def test_the_program_refuses_a_damaged_model_file_in_one_line(program, digits, tmp_path,
                                                              damage, message):
    (tmp_path / "m.bin").write_bytes(damage(model.encode(lively_cnn(1))))
    proc = run(program, "predict", "--model", tmp_path / "m.bin",
               "--images", write_idx(tmp_path / "x.idx", digits["x_test"][:5]),
               "--out", tmp_path / "p.idx", check=False)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("mnist_cnn: error: ") and message in proc.stderr
    assert not (tmp_path / "p.idx").exists()


@pytest.mark.slow
@fast_and_reference
def test_ema_keeps_validates_and_saves_an_average_of_every_parameter(program, digits,
                                                                     tmp_path):
    """--ema d: the saved model is avg = d avg + (1 - d) p over the steps (BatchNorm's moving
    statistics included), validated in place of the trained weights; its bits still do not
    depend on the threads."""
    recipe = ("--epochs", 2, "--batch-size", 100, "--seed", 9, "--val-images",
              tmp_path / "vx.idx", "--val-labels", tmp_path / "vy.idx")
    trained, plain = train(program, tmp_path, digits, "p.bin", *recipe)
    averaged, report = train(program, tmp_path, digits, "a.bin", *recipe, "--ema", 0.9,
                             "--threads", 1)
    assert averaged == train(program, tmp_path, digits, "b.bin", *recipe, "--ema", 0.9,
                             "--threads", 2)[0]
    net, avg = model.decode(trained, "plain"), model.decode(averaged, "averaged")
    for name in model.CNN._fields:  # every array differs from the trained one, statistics too
        assert not np.array_equal(getattr(net, name), getattr(avg, name)), name
    # 8 steps with d = 0.9: the average trails the trained weights, closer to the
    # initial ones (same seed, same initialisation).
    start = model.decode(train(program, tmp_path, digits, "s.bin", "--epochs", 1,
                               "--learning-rate", 1e-9, "--seed", 9, "--rotation", 0,
                               "--shift", 0, "--zoom", 0)[0], "start")
    assert (np.abs(avg.conv2 - start.conv2).mean() < np.abs(net.conv2 - start.conv2).mean())
    val = [fit.fields(line)["val_accuracy"] for line in report.splitlines()
           if line.startswith("epoch ")]
    assert val != [fit.fields(line)["val_accuracy"] for line in plain.splitlines()
                   if line.startswith("epoch ")]
