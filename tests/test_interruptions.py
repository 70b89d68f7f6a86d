"""Ctrl-C, SIGKILL, a full disk and a second `dvc repro`: nothing lost, nothing half-written.

Real processes, real signals, a real (tiny) tmpfs, real DVC: the project trains the small
`mlp` without augmentation so that an epoch takes a fraction of a second on the fixture.
"""

from __future__ import annotations

import hashlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from conftest import FIXTURE, FIXTURE_SHA256, ROOT, dvc, make_project, run_env, set_params, sh
from stages import download as dl
from stages.common import WriteError, atomic_dir, save_npz

pytestmark = pytest.mark.slow

QUICK_TRAIN = {"model": "mlp", "rotation": 0.0, "shift": 0.0, "zoom": 0.0, "epochs": 1,
               "batch_size": 64}
LONG = {"epochs": 1000}  # far longer than any test waits: always killed mid-training
TRAIN_OUTS = ("data/model", "reports/train/metrics.json", "reports/train/plots")


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


class Lines:
    """Read a child's stdout on a thread, so a test can wait for a line with a timeout."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.seen, self._q = proc, [], queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self._q.put(line)
        self._q.put(None)

    def wait_for(self, prefix: str, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"exited {self.proc.wait()} before {prefix!r}:\n"
                                     + "".join(self.seen) + self.proc.stderr.read())
            self.seen.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no line {prefix!r} within {timeout}s:\n" + "".join(self.seen))

    def rest(self) -> str:
        chunks = []
        while (line := self._q.get(timeout=60)) is not None:
            chunks.append(line)
        return "".join(self.seen + chunks)


def start(repo: Path, *args) -> tuple[subprocess.Popen, Lines]:
    proc = subprocess.Popen(args, cwd=repo, env=run_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    return proc, Lines(proc)


def processes_in(repo: Path) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cwd"]):
        try:
            if proc.info["cwd"] and Path(proc.info["cwd"]) == repo:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def copy_project(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, symlinks=True)
    return dest


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A committed project whose download, normalize and train (1 epoch) are done."""
    repo = make_project(tmp_path_factory.mktemp("interrupt") / "base", train=QUICK_TRAIN)
    dvc(repo, "repro", "train")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "trained")
    return repo


# --- SIGINT during `python -m stages.train` ------------------------------------------


@pytest.fixture(scope="module")
def ctrl_c_train(trained, tmp_path_factory):
    repo = copy_project(trained, tmp_path_factory.mktemp("sigint") / "p")
    before = snapshot(repo, *TRAIN_OUTS)
    set_params(repo, train=LONG)
    proc, lines = start(repo, sys.executable, "-m", "stages.train")
    lines.wait_for("epoch 1/1000 ")
    proc.send_signal(signal.SIGINT)
    code = proc.wait(timeout=120)
    return repo, before, code, lines.rest(), proc.stderr.read()


def test_ctrl_c_in_train_exits_130_with_one_line(ctrl_c_train):
    _, _, code, stdout, stderr = ctrl_c_train
    assert code == 130
    assert stderr == "error: interrupted; no output was replaced\n"
    assert "Traceback" not in stdout + stderr
    assert not stdout.rstrip().splitlines()[-1].startswith("train: ")  # it did not finish


def test_ctrl_c_in_train_keeps_the_previous_model(ctrl_c_train):
    repo, before, *_ = ctrl_c_train
    model = {k: v for k, v in before.items() if k.startswith("data/model/")}
    assert set(model) == {"data/model/model.keras", "data/model/run_info.json"}
    assert snapshot(repo, "data/model") == model
    assert temporaries(repo) == []
    assert sorted(p.name for p in (repo / "data").iterdir()) == [
        ".gitignore", "model", "processed", "raw"]


def test_ctrl_c_in_train_keeps_the_previous_curves(ctrl_c_train):
    repo, before, *_ = ctrl_c_train
    curves = {k: v for k, v in before.items() if k.startswith("reports/train/")}
    assert snapshot(repo, "reports/train/metrics.json", "reports/train/plots") == curves


def test_after_ctrl_c_the_next_repro_completes_and_the_cache_is_sound(ctrl_c_train):
    repo = ctrl_c_train[0]
    sh(repo, "git", "checkout", "params.yaml")
    dvc(repo, "repro", "train")
    assert dvc(repo, "status", "train").stdout.strip() == "Data and pipelines are up to date."
    assert cache_is_sound(repo) >= 5
    shutil.rmtree(repo / "data/model")
    dvc(repo, "checkout", "train")
    assert dvc(repo, "status", "train").stdout.strip() == "Data and pipelines are up to date."
    assert temporaries(repo) == []


# --- Ctrl-C during `dvc repro` -------------------------------------------------------


def test_ctrl_c_during_dvc_repro_train(trained, tmp_path):
    repo = copy_project(trained, tmp_path / "p")
    before = snapshot(repo, *TRAIN_OUTS)
    set_params(repo, train=LONG)
    proc, lines = start(repo, sys.executable, "-m", "dvc", "repro", "train")
    lines.wait_for("epoch 1/1000 ")
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C on a terminal does
    code = proc.wait(timeout=120)
    stderr = proc.stderr.read()
    lines.rest()
    assert code != 0
    assert "error: interrupted; no output was replaced" in stderr
    assert "Traceback" not in stderr
    assert processes_in(repo) == []
    # DVC removed the stage's outputs before running it; nothing half-made took their place.
    assert not (repo / "data/model").exists()
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
    assert not (repo / "data/model").exists()
    # A kill leaves at most the hidden, pid-tagged build folder beside an output, never a
    # file inside one; the next write of that output sweeps it away.
    assert all(Path(t).parent == Path("reports") for t in temporaries(repo))

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
    shutil.rmtree(repo / "data/model")
    (repo / "reports/train/metrics.json").unlink()
    dvc(repo, "checkout", "train")
    assert snapshot(repo, *TRAIN_OUTS) == before


# --- killed in the middle of writing an output ---------------------------------------

WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from stages.common import atomic_dir, atomic_path, run

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
    assert code == 130 and stderr == "error: interrupted; no output was replaced\n"
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
    assert code == 130 and stderr == "error: interrupted; no output was replaced\n"
    assert list(tmp_path.iterdir()) == []  # no output, no temporary


# --- a disk that fills up ------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A real 64 KiB tmpfs; skipped only where mounting is impossible (no root/caps)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
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
    cfg = dl.validate({"url": str(FIXTURE), "sha256": FIXTURE_SHA256,
                       "mirrors": [FIXTURE.as_uri()], "format": "npz", "timeout": 5,
                       "retries": 3, "backoff": 0})
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
    (repo / "data/raw").mkdir(parents=True)
    shutil.copy2(FIXTURE, repo / "data/raw/mnist.npz")
    (repo / "data/processed").symlink_to(small_disk)  # the output folder is the tiny disk
    proc = sh(repo, sys.executable, "-m", "stages.normalize", check=False, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == "error: no space left on device writing data/processed/mnist.npz\n"
    assert list(small_disk.iterdir()) == []  # no partial file, no temporary
    assert not (repo / "reports/data.json").exists()
