"""stages/frameworks/c: the plain-C program (mnist_mlp.c) against references, as llm.c's
test_gpt2.c.

The program is built here with the project's own flags (stages/frameworks/c/fit.py) and run
as a real process. Its backward pass is checked against a NumPy reference that finite differences
check in turn; its forward pass against Keras on the same weights; its training for
determinism (same seed: same bytes, whatever the thread count), and its inputs for the
one-line refusals every stage gives. The checks marked `on_every_toolchain...` run with each of
the toolchains of stages/frameworks/c/env.py: the native compiler, the same at AVX2's width,
clang without OpenMP, GCC's AArch64 cross compiler with the program run under qemu, and
GCC's sanitizers at x86-64's baseline (a memory error or undefined behaviour fails the
check with its report).
The checks marked `on_every_toolchain_and_the_reference` also run with the plain
reference program (stages/frameworks/c/reference/mnist_mlp.c): it must pass them too.
"""

from __future__ import annotations

import dataclasses
import struct
import subprocess

import numpy as np
import pytest

from stages.data import idx
from stages.frameworks.c import env, fit, model
from stages.normalize import normalize
from stages.runtime.failures import DataError, PipelineError
from tests.cprograms import (
    TOOLCHAINS,
    Program,
    c_program,
    on_every_toolchain_and_the_reference,
    program_for,
    read_idx,
    require,
    write_idx,
)
from tests.cprograms import run_program as run
from tests.digits import fixture_data
from tests.projects import train_cfg

HIDDEN, RATE = 128, 0.2


@pytest.fixture(scope="module")
def program(request):
    """mnist_mlp, built with the toolchain a test is handed (on_every_toolchain), or the
    reference one (REFERENCE), else the native fast one."""
    return program_for("mlp", request)


@pytest.fixture(scope="module")
def digits():
    """The fixture's scaled images and labels: train and test."""
    data = normalize(fixture_data())[0]
    return data


# --- the model file ---------------------------------------------------------------------------


def test_model_file_round_trips_byte_for_byte(tmp_path):
    net = model.build("mlp", seed=3)
    model.save(net, tmp_path)
    data = (tmp_path / model.MODEL_FILE).read_bytes()
    assert len(data) == model.SIZE == 407_104 and data[:8] == b"MNISTMLP"
    loaded = model.load(tmp_path)
    assert all(np.array_equal(a, b) for a, b in zip(net, loaded))
    assert model.encode(loaded) == data


@pytest.mark.parametrize("damage, message", [
    (lambda d: b"NOTAMODEL" + d[9:], "not a model file of the C program"),
    (lambda d: d[:8] + struct.pack("<I", 2) + d[12:], "version 2"),
    (lambda d: d[:-4], "407100 bytes; a model file has 407104"),
    (lambda d: d[:-4] + struct.pack("<f", float("nan")), "not finite"),
])
def test_a_damaged_model_file_is_refused_in_one_line(tmp_path, damage, message):
    model.save(model.build("mlp"), tmp_path)
    path = tmp_path / model.MODEL_FILE
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError, match=message) as err:
        model.load(tmp_path)
    assert "\n" not in str(err.value)


@pytest.mark.slow
@on_every_toolchain_and_the_reference
def test_the_program_reads_the_file_python_writes_and_predicts_as_numpy(program, digits,
                                                                       tmp_path):
    net = model.build("mlp", seed=5)
    model.save(net, tmp_path)
    x = digits["x_test"][:200]
    images = write_idx(tmp_path / "x.idx", x)
    run(program, "predict", "--model", tmp_path / model.MODEL_FILE, "--images", images,
        "--out", tmp_path / "p.idx")
    probs = read_idx(tmp_path / "p.idx")
    assert probs.shape == (200, 10)
    assert np.abs(probs - model.predict(net, x, 64)).max() < 1e-6


# --- the arithmetic ---------------------------------------------------------------------------


def reference(net: model.MLP, x, y, mask, smoothing):
    """Mean smoothed cross-entropy of one batch and its gradients, float64 NumPy."""
    w1, b1, w2, b2 = (np.asarray(a, np.float64) for a in net)
    flat = x.reshape(len(x), -1).astype(np.float64)
    pre = flat @ w1 + b1
    hidden = np.maximum(pre, 0) * mask / (1 - RATE)
    logits = hidden @ w2 + b2
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    target = np.full(p.shape, smoothing / 10)
    target[np.arange(len(y)), y] += 1 - smoothing
    loss = -(target * np.log(p)).sum(1).mean()
    d_logits = (p - target) / len(y)
    d_hidden = (d_logits @ w2.T) * mask / (1 - RATE) * (pre > 0)
    grads = (flat.T @ d_hidden, d_hidden.sum(0), hidden.T @ d_logits, d_logits.sum(0))
    return loss, grads


@pytest.mark.slow
@on_every_toolchain_and_the_reference
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_backward_pass_agrees_with_numpy_and_finite_differences(program, digits,
                                                                   tmp_path, smoothing):
    net = model.build("mlp", seed=7)
    net = net._replace(b1=np.full(HIDDEN, 0.01, np.float32),
                       b2=np.linspace(-0.1, 0.1, 10).astype(np.float32))
    model.save(net, tmp_path)
    x, y = digits["x_train"][:8], digits["y_train"][:8].astype(np.uint8)
    proc = run(program, "grad", "--model", tmp_path / model.MODEL_FILE,
               "--images", write_idx(tmp_path / "x.idx", x),
               "--labels", write_idx(tmp_path / "y.idx", y), "--seed", 11,
               "--label-smoothing", smoothing, "--out", tmp_path / "g.bin",
               "--mask", tmp_path / "m.idx")
    mask = read_idx(tmp_path / "m.idx").astype(np.float64)
    assert mask.shape == (8, HIDDEN) and 0.6 < mask.mean() < 0.95  # dropout really on
    c_grads = model.decode((tmp_path / "g.bin").read_bytes(), "gradients")
    loss, grads = reference(net, x, y, mask, smoothing)
    assert float(proc.stdout.split("loss=")[1]) == pytest.approx(loss, rel=1e-5)
    for name, c, ref in zip(model.MLP._fields, c_grads, grads):
        scale = np.abs(ref).max()
        assert scale > 0, name
        assert np.abs(c - ref).max() < 1e-5 * scale + 1e-7, name

    # The reference itself against central differences, on weights that matter.
    rng = np.random.default_rng(0)
    used = np.flatnonzero(x.reshape(8, -1).max(0))
    for which, pick in ((0, lambda: (rng.choice(used), rng.integers(HIDDEN))),
                        (1, lambda: (rng.integers(HIDDEN),)),
                        (2, lambda: (rng.integers(HIDDEN), rng.integers(10))),
                        (3, lambda: (rng.integers(10),))):
        for _ in range(4):
            at = pick()
            arrays = [np.asarray(a, np.float64).copy() for a in net]
            h = 1e-6
            arrays[which][at] += h
            up = reference(model.MLP(*arrays), x, y, mask, smoothing)[0]
            arrays[which][at] -= 2 * h
            down = reference(model.MLP(*arrays), x, y, mask, smoothing)[0]
            assert (up - down) / (2 * h) == pytest.approx(grads[which][at], rel=1e-4,
                                                          abs=1e-9)


@pytest.mark.slow
def test_the_forward_pass_matches_keras_on_the_same_weights(program, digits, tmp_path):
    from stages.frameworks.keras import model as keras_model

    keras_net = keras_model.build("mlp")
    rng = np.random.default_rng(2)
    keras_net.set_weights([rng.normal(0, 0.05, w.shape).astype(np.float32)
                           for w in keras_net.weights])
    kernel1, bias1, kernel2, bias2 = keras_net.get_weights()
    model.save(model.MLP(kernel1, bias1, kernel2, bias2), tmp_path)
    x = digits["x_test"][:500]
    run(program, "predict", "--model", tmp_path / model.MODEL_FILE,
        "--images", write_idx(tmp_path / "x.idx", x), "--out", tmp_path / "p.idx")
    c_probs = read_idx(tmp_path / "p.idx")
    keras_probs = keras_model.predict(keras_net, x, 100)
    assert keras_probs.max(1).mean() < 0.99  # not saturated: the comparison has teeth
    assert np.abs(c_probs - keras_probs).max() < 1e-5
    assert np.array_equal(c_probs.argmax(1), keras_probs.argmax(1))


# --- training ---------------------------------------------------------------------------------


def train(program, tmp_path, digits, name, *options, n=1000):
    images = tmp_path / "x.idx"
    if not images.exists():
        write_idx(images, digits["x_train"][:n])
        write_idx(tmp_path / "y.idx", digits["y_train"][:n].astype(np.uint8))
    out = tmp_path / name
    proc = run(program, "train", "--images", images, "--labels", tmp_path / "y.idx",
               "--out", out, *options)
    return out.read_bytes(), proc.stdout


@pytest.mark.slow
@on_every_toolchain_and_the_reference
def test_training_gives_the_same_bits_for_a_seed_whatever_the_thread_count(
        program, digits, tmp_path):
    recipe = ("--epochs", 2, "--batch-size", 32, "--seed", 4)
    one, report = train(program, tmp_path, digits, "a.bin", *recipe, "--threads", 1)
    assert one == train(program, tmp_path, digits, "b.bin", *recipe, "--threads", 1)[0]
    assert one == train(program, tmp_path, digits, "c.bin", *recipe, "--threads", 2)[0]
    assert one == train(program, tmp_path, digits, "d.bin", *recipe, "--threads", 3)[0]
    assert one != train(program, tmp_path, digits, "e.bin", "--epochs", 2, "--seed", 5)[0]
    epochs = [line for line in report.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == ["1/2", "2/2"]
    losses = [float(fit.fields(line)["loss"]) for line in epochs]
    assert losses[1] < losses[0] < np.log(10)  # it learns


@pytest.mark.slow
@on_every_toolchain_and_the_reference
def test_a_model_file_is_replaced_whole_or_kept_as_it_was(program, digits, tmp_path):
    """The program writes MODEL.partial and renames it over MODEL (mnist.h write_file): a
    finished write leaves no partial file, and one that fails keeps the previous model."""
    first, _ = train(program, tmp_path, digits, "m.bin", "--epochs", 1, n=200)
    second, _ = train(program, tmp_path, digits, "m.bin", "--epochs", 1, "--seed", 5, n=200)
    assert second != first and sorted(p.name for p in tmp_path.iterdir()) == [
        "m.bin", "x.idx", "y.idx"]
    (tmp_path / "m.bin.partial").mkdir()  # where the new file would be written
    proc = run(program, "train", "--images", tmp_path / "x.idx", "--labels", tmp_path / "y.idx",
               "--out", tmp_path / "m.bin", "--epochs", 1, check=False, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("mnist_mlp: error: ") and proc.stderr.count("\n") == 1
    assert (tmp_path / "m.bin").read_bytes() == second


@pytest.mark.slow
@on_every_toolchain_and_the_reference
def test_every_recipe_knob_trains_deterministically_across_threads(program, digits, tmp_path):
    """Augmentation, cosine decay, label smoothing, a validation split and restore_best."""
    write_idx(tmp_path / "vx.idx", digits["x_test"][:300])
    write_idx(tmp_path / "vy.idx", digits["y_test"][:300].astype(np.uint8))
    recipe = ("--epochs", 3, "--batch-size", 50, "--schedule", "cosine", "--rotation", 10,
              "--shift", 0.1, "--zoom", 0.1, "--label-smoothing", 0.1, "--restore-best", 1,
              "--val-images", tmp_path / "vx.idx", "--val-labels", tmp_path / "vy.idx",
              "--learning-rate", 0.002)
    one, report = train(program, tmp_path, digits, "a.bin", *recipe, "--threads", 1)
    two, again = train(program, tmp_path, digits, "b.bin", *recipe, "--threads", 2)
    # Same weights, same reported numbers (only the seconds differ).
    assert one == two
    assert [fit.fields(line) for line in report.splitlines()[:3]] == [
        fit.fields(line) for line in again.splitlines()[:3]]
    plain, _ = train(program, tmp_path, digits, "c.bin", "--epochs", 3, "--batch-size", 50)
    assert one != plain
    epochs = [fit.fields(line) for line in report.splitlines() if line.startswith("epoch ")]
    assert all("val_accuracy" in e for e in epochs)
    assert float(epochs[-1]["val_accuracy"]) > 0.7  # 1000 images, 3 epochs


@pytest.mark.slow
@on_every_toolchain_and_the_reference
@pytest.mark.parametrize("args, message", [
    (("--epochs", 0), "--epochs"),
    (("--batch-size", "x"), "--batch-size"),
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
    assert proc.stderr.startswith("mnist_mlp: error: ") and proc.stderr.count("\n") == 1
    assert message in proc.stderr
    assert not (tmp_path / "m.bin").exists()


def damaged_inputs(digits):
    x = idx.encode(digits["x_train"][:50])
    y = idx.encode(digits["y_train"][:50].astype(np.uint8))
    bad_label = bytearray(y)
    bad_label[-1] = 10
    return {
        "wrong magic": (b"\0\0\x08\x03" + x[4:], y),
        "truncated images": (x[:-1], y),
        "too many bytes": (x + b"\0", y),
        "labels for other images": (x, idx.encode(digits["y_train"][:49].astype(np.uint8))),
        "label 10": (x, bytes(bad_label)),
        "a header claiming 4e9 images": (x[:4] + struct.pack(">I", 4_000_000_000) + x[8:], y),
        "not a number": (x[:-4] + struct.pack(">f", float("nan")), y),
    }


@pytest.mark.slow
@on_every_toolchain_and_the_reference
@pytest.mark.parametrize("case", [
    "wrong magic", "truncated images", "too many bytes", "labels for other images",
    "label 10", "a header claiming 4e9 images", "not a number"])
def test_damaged_data_is_refused_in_one_line_and_writes_nothing(program, digits, tmp_path,
                                                               case):
    images, labels = damaged_inputs(digits)[case]
    (tmp_path / "x.idx").write_bytes(images)
    (tmp_path / "y.idx").write_bytes(labels)
    proc = run(program, "train", "--images", tmp_path / "x.idx", "--labels",
               tmp_path / "y.idx", "--out", tmp_path / "m.bin", check=False, timeout=60)
    assert proc.returncode == 1, (case, proc.stderr)
    assert proc.stderr.startswith("mnist_mlp: error: ") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "m.bin").exists()


# --- through the seam -------------------------------------------------------------------------


@pytest.mark.slow
def test_fit_reports_epochs_like_every_framework_and_returns_the_weights(digits, tmp_path,
                                                                         capsys):
    cfg = dataclasses.replace(train_cfg("c", epochs=2, batch_size=32, val_fraction=0.1,
                                        restore_best=True), intra_op_threads=2)
    n = 1200
    data = {"x_train": digits["x_train"][:n], "y_train": digits["y_train"][:n],
            "x_val": digits["x_test"][:200], "y_val": digits["y_test"][:200]}
    net = fit.fit(cfg, data, tmp_path / "curves")
    out = capsys.readouterr().out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("epoch ")] == [
        "1/2", "2/2"]
    assert "eval/accuracy=" in out and "GFLOP/s on 2 thread(s)" in out
    accuracy = (tmp_path / "curves/plots/metrics/eval/accuracy.tsv").read_text().splitlines()
    assert len(accuracy) == 3
    probs = model.predict(net, digits["x_test"][:200], 50)
    assert (probs.argmax(1) == digits["y_test"][:200]).mean() > 0.8
    info = env.versions()
    assert info["cc_version"] and info["openmp"] in (True, False)
    assert "-march=native" in info["cflags"] and "program_sha256" not in info


@pytest.mark.slow
def test_the_program_is_built_once_per_source_and_flags(tmp_path, monkeypatch):
    first = fit.build()
    built_at = first.stat().st_mtime_ns
    assert fit.build() == first and first.stat().st_mtime_ns == built_at
    edited = tmp_path / "mnist_mlp.c"
    edited.write_text(fit.SOURCES["mlp"].read_text() + "\n/* edited */\n")
    monkeypatch.setitem(fit.SOURCES, "mlp", edited)
    monkeypatch.setattr(fit, "BUILD_DIR", tmp_path / "build")
    other = fit.build()
    assert other != first and other.parent.parent == tmp_path / "build"
    assert [p.name for p in other.parent.iterdir()] == ["mnist_mlp"]  # no temporaries
    header = tmp_path / "mnist.h"  # the headers the programs include are part of the key
    header.write_text(fit.HEADERS[0].read_text() + "\n/* edited */\n")
    monkeypatch.setattr(fit, "HEADERS", (header, *fit.HEADERS[1:]))
    assert fit.build() not in (first, other)


def test_no_compiler_is_one_line_naming_how_to_install_one(monkeypatch):
    monkeypatch.setenv("CC", "no-such-cc")
    with pytest.raises(PipelineError, match=r"needs a C compiler \(no-such-cc\), none found "
                                            r"on PATH: run `make c-compiler` or set CC"):
        env.compiler()


@pytest.mark.slow
def test_a_source_that_does_not_compile_is_one_line(tmp_path, monkeypatch):
    broken = tmp_path / "mnist_mlp.c"
    broken.write_text("int main(void) { return undefined_name; }\n")
    monkeypatch.setitem(fit.SOURCES, "mlp", broken)
    monkeypatch.setattr(fit, "BUILD_DIR", tmp_path / "build")
    with pytest.raises(PipelineError, match="could not build mnist_mlp.c: .*undefined_name"):
        fit.build()


def fused_multiply_adds(program, cc: str) -> int:
    """Fused multiply-add instructions in the program's disassembly by the objdump of the
    compiler that built it (x86-64: vfmadd*/vfnmadd*; AArch64: fmla/fmadd)."""
    objdump = subprocess.run([cc, "-print-prog-name=objdump"], capture_output=True, text=True,
                             timeout=60, check=True).stdout.strip()
    text = subprocess.run([objdump, "-d", str(program)], capture_output=True, text=True,
                          timeout=120, check=True).stdout
    return sum(1 for line in text.splitlines()
               if any(m in line for m in ("vfmadd", "vfnmadd", "\tfmla", "\tfmadd")))


@pytest.mark.slow
@pytest.mark.parametrize("toolchain", TOOLCHAINS)
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_both_programs_compute_with_fused_multiply_adds(name, toolchain):
    """-std=c11 alone makes GCC keep a*b+c as two roundings (ISO C's FP_CONTRACT off):
    the flags ask for the fused instruction, and each build really has it; but the sanitized
    one, for x86-64's baseline, which has no such instruction (its bits are its own)."""
    assert "-ffp-contract=fast" in toolchain.cflags
    program = c_program(name, toolchain)
    fused = fused_multiply_adds(program.path, toolchain.compiler())
    assert (fused == 0) if toolchain == env.SANITIZED else (fused >= 10)


@pytest.mark.slow
@pytest.mark.parametrize("bug, report", [
    ("float *v = malloc(4 * sizeof *v); memset(v, 0, (argc + 4) * sizeof *v); v[0] = 1;",
     "AddressSanitizer: heap-buffer-overflow"),
    ("int big = 2147483647 - 1 + argc; printf(\"%d\\n\", big + argc);",
     "runtime error: signed integer overflow"),
], ids=["heap overflow", "signed overflow"])
def test_the_sanitized_toolchain_ends_a_program_at_its_first_error_with_its_report(
        tmp_path, bug, report):
    """What makes its tests catch a memory error or undefined behaviour anywhere: a program
    built and run as the toolchain builds and runs the C programs ends at the first one, with
    the sanitizer's report and an exit status of its own, never 1 (the programs' refusals)."""
    require(env.SANITIZED)
    source = tmp_path / "bug.c"
    source.write_text("#include <stdio.h>\n#include <stdlib.h>\n#include <string.h>\n"
                      f"int main(int argc, char **argv) {{ {bug} return 0; }}\n")
    subprocess.run([env.SANITIZED.compiler(), *env.SANITIZED.cflags, "-o", str(tmp_path / "bug"),
                    str(source)], check=True, capture_output=True, timeout=120)
    proc = run(Program(tmp_path / "bug", env.SANITIZED.runner), check=False)
    assert proc.returncode == env.SANITIZER_EXIT != 1, proc.stderr
    assert report in proc.stderr and "bug.c:4" in proc.stderr and proc.stdout == ""


@pytest.mark.slow
def test_a_compiler_without_openmp_builds_the_single_threaded_program_in_one_go(
        digits, tmp_path, monkeypatch, capsys):
    """CC=clang as Debian installs it, without libomp-dev (as Apple's clang, which refuses
    -fopenmp): one compile without the flag, no compiler error shown, OpenMP recorded off for
    run_info.json, and a program that runs on one thread whatever --threads asks."""
    require(env.CLANG)
    monkeypatch.setenv("CC", "clang")
    monkeypatch.setattr(fit, "BUILD_DIR", tmp_path / "build")
    assert not env.has_openmp(env.compiler()), (
        "this clang has OpenMP (libomp-dev installed?): a build without it goes untested")
    program = fit.build()
    built = capsys.readouterr().out.splitlines()
    assert len(built) == 1 and built[0].startswith("built mnist_mlp.c in ")
    assert "clang" in built[0] and env.OPENMP not in built[0]
    info = env.versions()
    assert info["openmp"] is False and env.OPENMP not in info["cflags"]
    assert "clang" in info["cc_version"] and "-march=native" in info["cflags"]
    images = write_idx(tmp_path / "x.idx", digits["x_train"][:100])
    labels = write_idx(tmp_path / "y.idx", digits["y_train"][:100].astype(np.uint8))
    proc = run(Program(program), "train", "--images", images, "--labels", labels,
               "--out", tmp_path / "m.bin", "--epochs", 1, "--threads", 2)
    assert fit.fields(proc.stdout.splitlines()[-1])["threads"] == "1"
