"""Ctrl-C, SIGTERM, SIGKILL, a full disk and a second `dvc repro`: nothing lost, nothing torn.

Real processes, real signals, a real (tiny) tmpfs, real DVC. The project trains the small
`mlp` on the fixture, so an epoch takes a fraction of a second. Every Ctrl-C aimed at
training is sent while the cores are loaded (two runnable threads besides the stage's, busy
loops making up what the other tests' processes do not: tests/watch.py busy_cores): the
interrupt must be clean because train stops only at its own stopping points
(stop_if_interrupted, stages/runtime/failures.py), not because the signal happened to
arrive between two TensorFlow calls.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from stages import download as dl
from stages.runtime import params
from stages.runtime.failures import INTERRUPTED, WriteError
from stages.runtime.outputs import atomic_dir, save_npz
from testbed.pipeline import paths as dvc_vars
from testbed.processes import run_env, sh
from tests.paths import FIXTURE, FIXTURE_SHA256, ROOT
from tests.projects import copy_project, dvc, set_params
from tests.watch import busy_cores, start

pytestmark = pytest.mark.slow

ONE_LINE = INTERRUPTED + "\n"
QUICK_TRAIN = {"model": "mlp", "mlp": {"epochs": 1, "batch_size": 64}}
LONG = {"mlp": {"epochs": 1000}}  # far longer than any test waits: always stopped mid-way
PATHS = dvc_vars()
TRAIN_OUTS = (PATHS["model_dir"], PATHS["curves"])
TRAIN_ARGS = ("--data", PATHS["processed"], "--model-dir", PATHS["model_dir"],
              "--curves", PATHS["curves"])


# --- helpers -------------------------------------------------------------------------


def snapshot(root: Path, *paths: str) -> dict[str, str]:
    """sha256 of every file under the given paths (missing paths simply absent)."""
    digests = {}
    for rel in paths:
        base = root / rel
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        for f in files:
            digests[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return digests


def temporaries(root: Path) -> list[str]:
    """Hidden leftovers of atomic writes anywhere in the workspace (outside .dvc/.git)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*.tmp")
                  if not {".dvc", ".git"} & set(p.relative_to(root).parts))


def cache_is_sound(repo: Path) -> int:
    """Every object in the DVC cache still hashes to its own name; returns the count."""
    count = 0
    for f in (repo / ".dvc/cache/files/md5").rglob("*"):
        if f.is_file():
            name = (f.parent.name + f.name).removesuffix(".dir")
            assert hashlib.md5(f.read_bytes()).hexdigest() == name, f"corrupt cache: {f}"
            count += 1
    return count


def processes_in(repo: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cwd"]):
        try:
            if proc.info["cwd"] and Path(proc.info["cwd"]) == repo:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


@pytest.fixture(scope="module")
def trained(trained_project, tmp_path_factory) -> Path:
    """A copy of the session's trained project, its train stage rerun with the mlp (an
    epoch takes a fraction of a second) and committed: up to date, with a model to keep."""
    repo = copy_project(trained_project.repo, tmp_path_factory.mktemp("interrupt") / "base")
    set_params(repo, train=QUICK_TRAIN)
    dvc(repo, "repro", "train")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "train the mlp")
    return repo


# --- SIGINT during `python -m stages.train` ------------------------------------------


def test_ctrl_c_in_pytorch_training_is_one_line_and_keeps_the_previous_model(trained, tmp_path):
    """PyTorch's loop stops between two batches (its stopping point), as Keras' does
    between two chunks."""
    repo = copy_project(trained, tmp_path / "p")
    before = snapshot(repo, *TRAIN_OUTS)
    set_params(repo, train={"framework": "torch", **LONG})
    with busy_cores():
        proc, lines = start(repo, sys.executable, "-m", "stages.train", *TRAIN_ARGS)
        lines.wait_for("epoch 1/1000 ")
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
    assert code == 130
    assert proc.stderr.read() == ONE_LINE
    assert "Traceback" not in lines.rest()
    assert snapshot(repo, *TRAIN_OUTS) == before  # still the Keras model and its curves
    assert temporaries(repo) == []


@pytest.mark.parametrize("model, signum, to_group, code", [
    ("mlp", signal.SIGINT, True, 130),   # Ctrl-C in a terminal: the stage and the program get it
    ("mlp", signal.SIGINT, False, 130),  # the stage alone: it stops the program
    ("mlp", signal.SIGTERM, False, 143),
    ("cnn", signal.SIGINT, True, 130),
], ids=["ctrl-c", "sigint-to-the-stage", "sigterm-to-the-stage", "ctrl-c-cnn"])
def test_interrupting_c_training_is_one_line_and_leaves_no_program_running(
        trained, tmp_path, model, signum, to_group, code):
    """The C program runs as a child of the stage; however the signal arrives, the stage
    ends with its one line, keeps the previous model and leaves no program behind."""
    repo = copy_project(trained, tmp_path / "p")
    before = snapshot(repo, *TRAIN_OUTS)
    set_params(repo, train={"framework": "c", "model": model, model: {"epochs": 10_000}})
    proc, lines = start(repo, sys.executable, "-m", "stages.train", *TRAIN_ARGS)
    lines.wait_for("epoch 2/10000 ")
    programs = [c for c in psutil.Process(proc.pid).children() if c.name() == f"mnist_{model}"]
    assert len(programs) == 1
    if to_group:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    assert proc.wait(timeout=60) == code
    assert proc.stderr.read() == ONE_LINE
    assert "Traceback" not in lines.rest()
    psutil.wait_procs(programs, timeout=10)
    assert not programs[0].is_running()
    assert snapshot(repo, *TRAIN_OUTS) == before
    assert temporaries(repo) == []


@pytest.fixture(scope="module")
def ctrl_c_train(trained, tmp_path_factory):
    repo = copy_project(trained, tmp_path_factory.mktemp("sigint") / "p")
    before = snapshot(repo, *TRAIN_OUTS)
    set_params(repo, train=LONG)
    with busy_cores():
        proc, lines = start(repo, sys.executable, "-m", "stages.train", *TRAIN_ARGS)
        lines.wait_for("epoch 1/1000 ")
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=120)
    return repo, before, code, lines.rest(), proc.stderr.read()


def test_ctrl_c_in_train_exits_130_with_one_line(ctrl_c_train):
    _, _, code, stdout, stderr = ctrl_c_train
    assert code == 130
    assert stderr == ONE_LINE
    assert "Traceback" not in stdout + stderr
    assert not stdout.rstrip().splitlines()[-1].startswith("train: ")  # it did not finish


def test_ctrl_c_in_train_keeps_the_previous_model(ctrl_c_train):
    repo, before, *_ = ctrl_c_train
    model = {k: v for k, v in before.items() if k.startswith(PATHS["model_dir"] + "/")}
    assert set(model) == {f"{PATHS['model_dir']}/model.keras",
                          f"{PATHS['model_dir']}/run_info.json"}
    assert snapshot(repo, PATHS["model_dir"]) == model
    assert temporaries(repo) == []
    # Nothing in data/ but the outputs dvc.yaml names there (and DVC's .gitignore).
    outputs = {Path(p).parts[1] for p in PATHS.values() if Path(p).parts[0] == "data"}
    assert {p.name for p in (repo / "data").iterdir()} == outputs | {".gitignore"}


def test_ctrl_c_in_train_keeps_the_previous_curves(ctrl_c_train):
    repo, before, *_ = ctrl_c_train
    curves = {k: v for k, v in before.items() if k.startswith(PATHS["curves"] + "/")}
    assert f"{PATHS['curves']}/metrics.json" in curves
    assert snapshot(repo, PATHS["curves"]) == curves


def test_after_ctrl_c_the_next_repro_completes_and_the_cache_is_sound(ctrl_c_train):
    repo = ctrl_c_train[0]
    sh(repo, "git", "checkout", "params.yaml")
    dvc(repo, "repro", "train")
    assert dvc(repo, "status", "train").stdout.strip() == "Data and pipelines are up to date."
    assert cache_is_sound(repo) >= 5
    shutil.rmtree(repo / PATHS["model_dir"])
    dvc(repo, "checkout", "train")
    assert dvc(repo, "status", "train").stdout.strip() == "Data and pipelines are up to date."
    assert temporaries(repo) == []


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_or_sigterm_while_tensorflow_loads_is_one_line_too(trained, tmp_path, sig, code):
    """Sent as train starts importing TensorFlow (seconds of import code, then tracing)."""
    repo = copy_project(trained, tmp_path / "p")
    before = snapshot(repo, *TRAIN_OUTS)
    set_params(repo, train=LONG)
    with busy_cores():
        proc, lines = start(repo, sys.executable, "-m", "stages.train", *TRAIN_ARGS)
        lines.wait_for("train: mlp in keras on ")  # printed just before TensorFlow is imported
        proc.send_signal(sig)
        assert proc.wait(timeout=120) == code
    assert proc.stderr.read() == ONE_LINE
    assert "Traceback" not in lines.rest()
    assert snapshot(repo, *TRAIN_OUTS) == before
    assert temporaries(repo) == []


# --- Ctrl-C at many moments: always at a stopping point, never inside TensorFlow -----

# Calls train.main() once per trial in one process (TensorFlow loads once) and reports
# where each KeyboardInterrupt was raised: the frames of its traceback, which the CLI's
# one-line error hides.
TRIALS = textwrap.dedent("""
    import json, sys, traceback
    from stages import train

    for trial in range(int(sys.argv[1])):
        try:
            train.main(sys.argv[2:])
            outcome = {"kind": "finished"}
        except BaseException as err:
            frames = traceback.extract_tb(err.__traceback__)
            outcome = {"kind": type(err).__name__, "message": str(err),
                       "frames": [[f.filename, f.name] for f in frames]}
        print("RESULT " + json.dumps(outcome), flush=True)
""")
def in_repo(repo: Path, filename: str) -> str:
    """A traceback's file name, relative to repo when it lies there."""
    path = Path(filename).resolve()
    return path.relative_to(repo.resolve()).as_posix() if path.is_relative_to(
        repo.resolve()) else filename


# Seconds after train's first line. That line comes just before TensorFlow is imported (the
# first trial only) or configured; then come the model's build, the tracing of the compiled
# steps (in the first chunk), chunks of 4 batches, validation and dvclive at each epoch's end.
DELAYS = (0.0, 0.2, 0.4, 0.7, 1.0, 1.4, 1.9, 2.5)


def test_ctrl_c_at_any_moment_stops_at_a_stopping_point_of_train(trained, tmp_path):
    repo = copy_project(trained, tmp_path / "p")
    before = snapshot(repo, *TRAIN_OUTS)
    # The default cnn (augmentation, validation split): the most TensorFlow code to trace.
    set_params(repo, train={"model": "cnn", "cnn": {"epochs": 1000, "batch_size": 64}},
               speed={"keras_steps_per_execution": 4})
    outcomes, latencies = [], []
    with busy_cores():
        proc, lines = start(repo, sys.executable, "-c", TRIALS, str(len(DELAYS)), *TRAIN_ARGS)
        for delay in DELAYS:
            # A trial that ends before it starts training (it should not) reports at once.
            if lines.wait_for(("train: cnn in keras on ", "RESULT ")).startswith("train: "):
                time.sleep(delay)
                proc.send_signal(signal.SIGINT)
                sent = time.monotonic()
                lines.wait_for("RESULT ", timeout=120)
                latencies.append(time.monotonic() - sent)
            outcomes.append(json.loads(lines.seen[-1].removeprefix("RESULT ")))
        code = proc.wait(timeout=60)
    stops = set()
    for outcome in outcomes:
        *callers, (raised_in, raiser) = [(in_repo(repo, f), name)
                                         for f, name in outcome.get("frames", [["?", "?"]])]
        # Raised by the stopping point, called from train's own code; no frame of TensorFlow,
        # Keras or dvclive is on the way: the interrupt never ran inside them.
        assert (raised_in, raiser) == ("stages/runtime/failures.py", "stop_if_interrupted"), outcome
        assert callers[-1][0] in ("stages/train.py", "stages/frameworks/keras/fit.py")
        assert all(f in ("<string>", "stages/train.py", "stages/frameworks/keras/fit.py")
                   for f, _ in callers), outcome
        assert outcome["kind"] == "Interrupted" and outcome["message"] == "SIGINT", outcome
        stops.add(callers[-1][1])
    assert stops <= {"train_and_save", "fit"}
    assert code == 0, proc.stderr.read()
    # Each stop came within a chunk, an epoch's end or TensorFlow's import; seconds at most.
    assert max(latencies) < 60, latencies
    assert snapshot(repo, *TRAIN_OUTS) == before
    assert temporaries(repo) == []


# --- Ctrl-C during `dvc repro` -------------------------------------------------------


# DVC runs a stage's cmd through $SHELL (or /bin/sh when it is unset, as under cron or CI).
# bash execs a one-command `-c` script, so DVC sees the stage's own exit code; dash (Debian's
# /bin/sh) stays in between and dies of the same Ctrl-C, so DVC reports the signal (-2).
# Either way the stage itself stops at its own stopping point and says its one line.
@pytest.mark.parametrize("shell, exit_says", [("/bin/bash", "exited with 130"),
                                              ("/bin/sh", "exited with -2")])
def test_ctrl_c_during_dvc_repro_train(trained, tmp_path, shell, exit_says):
    if shell == "/bin/sh" and Path(shell).resolve().name != "dash":
        pytest.fail(f"{shell} is {Path(shell).resolve()}, not dash: update the expectation")
    repo = copy_project(trained, tmp_path / "p")
    before = snapshot(repo, *TRAIN_OUTS)
    set_params(repo, train=LONG)
    env = run_env() | {"SHELL": shell}
    with busy_cores():
        proc, lines = start(repo, sys.executable, "-m", "dvc", "repro", "train", env=env)
        lines.wait_for("epoch 1/1000 ")
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C on a terminal does
        code = proc.wait(timeout=120)
    stderr = proc.stderr.read()
    lines.rest()
    assert code != 0
    # The stage's own line, then DVC's one line on the failed stage; no traceback.
    first, dvc_says = stderr.splitlines()
    assert first == INTERRUPTED
    assert dvc_says.startswith("ERROR: failed to reproduce 'train'")
    assert dvc_says.endswith(exit_says)
    assert processes_in(repo) == []
    # DVC removed the stage's outputs before running it; nothing half-made took their place.
    assert not (repo / PATHS["model_dir"]).exists()
    assert temporaries(repo) == []
    # The previous complete outputs are intact in the cache: dvc.lock still points to them.
    dvc(repo, "checkout", "--force", "train")
    assert snapshot(repo, *TRAIN_OUTS) == before
    sh(repo, "git", "checkout", "params.yaml")
    assert dvc(repo, "status", "train").stdout.strip() == "Data and pipelines are up to date."
    assert cache_is_sound(repo) >= 5


# --- SIGKILL during `dvc repro`, and a second `dvc repro` meanwhile ------------------


def test_sigkill_during_dvc_repro_and_a_concurrent_repro(trained, tmp_path):
    repo = copy_project(trained, tmp_path / "p")
    before = snapshot(repo, *TRAIN_OUTS)
    set_params(repo, train=LONG)
    first, lines = start(repo, sys.executable, "-m", "dvc", "repro", "train")
    lines.wait_for("epoch 1/1000 ")

    # A second `dvc repro` in the same workspace is refused while the first trains.
    second = dvc(repo, "repro", "train", check=False, timeout=120)
    assert second.returncode != 0
    assert "is busy, it is being blocked by" in second.stderr
    assert f"(PID {first.pid})" in second.stderr and "rwlock" in second.stderr
    assert "Running stage" not in second.stdout
    assert first.poll() is None  # the first one is unharmed and still training

    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=60)
    deadline = time.monotonic() + 10
    while processes_in(repo) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_in(repo) == []  # the stage died with it
    assert not (repo / PATHS["model_dir"]).exists()
    # A kill leaves at most the hidden, pid-tagged build folder beside an output, never a
    # file inside one; the next write of that output sweeps it away.
    assert all(Path(t).parent == Path(PATHS["curves"]).parent for t in temporaries(repo))

    # The next repro gets past the dead process's stale lock and completes.
    sh(repo, "git", "checkout", "params.yaml")
    again = dvc(repo, "repro", "train")
    assert "had been killed. Auto removed it from the lock file" in again.stderr
    # (restored from the run-cache, train did not write: a leftover stays until it does,
    # ignored by git)
    leftovers = temporaries(repo)
    assert not any(t in sh(repo, "git", "status", "--porcelain").stdout for t in leftovers)
    assert dvc(repo, "status", "train").stdout.strip() == "Data and pipelines are up to date."
    assert snapshot(repo, *TRAIN_OUTS) == before
    assert cache_is_sound(repo) >= 5
    shutil.rmtree(repo / PATHS["model_dir"])
    (repo / PATHS["curves"] / "metrics.json").unlink()
    dvc(repo, "checkout", "train")
    assert snapshot(repo, *TRAIN_OUTS) == before


# --- killed in the middle of writing an output ---------------------------------------

WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from stages.runtime.failures import run
    from stages.runtime.outputs import atomic_dir, atomic_path

    def main():
        kind, target = sys.argv[1], Path(sys.argv[2])
        if kind == "file":
            with atomic_path(target) as tmp, open(tmp, "wb") as f:
                f.write(b"new" * 100_000)
                f.flush()
                print("halfway", flush=True)
                time.sleep(120)
        else:
            with atomic_dir(target) as tmp:
                (tmp / "model.keras").write_bytes(b"new" * 100_000)
                print("halfway", flush=True)
                time.sleep(120)
                (tmp / "run_info.json").write_text("{}")

    run(main)
""")


def killed_writer(kind: str, target: Path, sig: int) -> tuple[int, str, int]:
    env = run_env()
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.Popen([sys.executable, "-c", WRITER, kind, str(target)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "halfway\n"
    proc.send_signal(sig)
    code = proc.wait(timeout=30)
    return code, proc.stderr.read(), proc.pid


def test_sigkill_mid_file_write_keeps_the_old_file_and_the_next_write_sweeps(tmp_path):
    target = tmp_path / "data" / "processed" / "mnist.npz"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"previous complete file")
    code, _, pid = killed_writer("file", target, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert target.read_bytes() == b"previous complete file"
    # The dead writer's temporary stays: hidden, beside the output, tagged with its pid.
    stale = [p.name for p in target.parent.iterdir() if p.name != "mnist.npz"]
    assert len(stale) == 1 and stale[0].startswith(f".mnist.npz.{pid}.")
    save_npz(target, a=np.arange(3))  # the next write of that output sweeps it away
    assert sorted(p.name for p in target.parent.iterdir()) == ["mnist.npz"]


def test_ctrl_c_mid_file_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("{}\n")
    code, stderr, _ = killed_writer("file", target, signal.SIGINT)
    assert code == 130 and stderr == ONE_LINE
    assert target.read_text() == "{}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_sigkill_mid_directory_write_leaves_nothing_inside_the_output(tmp_path):
    target = tmp_path / "data" / "model"
    target.mkdir(parents=True)
    (target / "model.keras").write_bytes(b"previous")
    (target / "run_info.json").write_text("{}")
    before = snapshot(tmp_path, "data/model")
    code, _, pid = killed_writer("dir", target, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert snapshot(tmp_path, "data/model") == before  # nothing stray inside the DVC out
    stale = [p for p in target.parent.iterdir() if p.name != "model"]
    assert len(stale) == 1 and stale[0].name.startswith(f".model.{pid}.") and stale[0].is_dir()
    with atomic_dir(target) as tmp:
        (tmp / "model.keras").write_bytes(b"next")
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]
    assert sorted(p.name for p in target.iterdir()) == ["model.keras"]


def test_ctrl_c_mid_directory_write(tmp_path):
    target = tmp_path / "model"
    code, stderr, _ = killed_writer("dir", target, signal.SIGINT)
    assert code == 130 and stderr == ONE_LINE
    assert list(tmp_path.iterdir()) == []  # no output, no temporary


# --- a disk that fills up ------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A real 64 KiB tmpfs (these machines run the tests as root, which may mount one)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, f"cannot mount a tmpfs here: {proc.stderr.strip()}"
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_disk_in_save_npz_is_a_one_line_error_and_keeps_the_old_file(small_disk):
    target = small_disk / "mnist.npz"
    save_npz(target, a=np.zeros(10, np.uint8))
    before = target.read_bytes()
    with pytest.raises(WriteError) as info:
        save_npz(target, a=np.zeros(200_000, np.uint8))
    assert str(info.value) == f"no space left on device writing {target}"
    assert target.read_bytes() == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["mnist.npz"]


def test_full_disk_in_atomic_dir_keeps_the_old_directory(small_disk):
    target = small_disk / "model"
    with atomic_dir(target) as tmp:
        (tmp / "w").write_bytes(b"old")
    with pytest.raises(WriteError, match="^no space left on device writing .*model$"):
        with atomic_dir(target) as tmp:
            (tmp / "w").write_bytes(b"x" * 200_000)
    assert (target / "w").read_bytes() == b"old"
    assert sorted(p.name for p in small_disk.iterdir()) == ["model"]


def test_full_disk_during_download_is_not_retried_nor_blamed_on_the_source(small_disk,
                                                                           capsys):
    out = small_disk / "raw" / "mnist.npz"
    cfg = params.download({"url": str(FIXTURE), "sha256": FIXTURE_SHA256, "format": "npz",
                           "mirrors": [FIXTURE.as_uri()], "timeout": 5, "retries": 3,
                           "backoff": 0})
    with pytest.raises(WriteError) as info:
        dl.download(cfg, output=out)
    assert str(info.value) == f"no space left on device writing {out}"
    assert capsys.readouterr().err == ""  # no retry, no 'trying the next source'
    assert list(out.parent.iterdir()) == []


def test_full_disk_through_the_normalize_cli(small_disk, tmp_path):
    repo = tmp_path / "p"
    shutil.copytree(ROOT / "stages", repo / "stages",
                    ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(ROOT / "params.yaml", repo / "params.yaml")
    (repo / PATHS["raw"]).parent.mkdir(parents=True)
    shutil.copy2(FIXTURE, repo / PATHS["raw"])
    (repo / Path(PATHS["processed"]).parent).symlink_to(small_disk)  # the tiny disk
    proc = sh(repo, sys.executable, "-m", "stages.normalize", "--raw", PATHS["raw"],
              "--out", PATHS["processed"], "--report", PATHS["data_report"],
              "--sample", PATHS["sample"], check=False, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == f"error: no space left on device writing {PATHS['processed']}\n"
    assert list(small_disk.iterdir()) == []  # no partial file, no temporary
    assert not (repo / PATHS["data_report"]).exists()
