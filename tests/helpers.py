"""What the tests share: the fixture, project copies under git + DVC, and runners.

Import from here (`from tests.helpers import ...`); pytest fixtures live in conftest.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import json
import os
import queue
import re
import shutil
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml

from stages.frameworks.c import env as c_env

# What tests share with the benchmarks (testbed/): one reading of dvc.yaml (its vars, every
# path, and its stage commands), the pipeline's files copied, processes run as a user runs
# them, and digits drawn as a hand draws them.
from testbed.drawing import drawn_digit  # noqa: F401
from testbed.pipeline import copy_pipeline, stage_command  # noqa: F401
from testbed.pipeline import paths as dvc_vars  # noqa: F401
from testbed.processes import free_port, run_env, sh  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "data" / "mnist_small.npz"
# sha256 of tests/data/mnist_small.npz: the first 1500 training and 500 test images of
# MNIST, derived from the shared full dataset.
FIXTURE_SHA256 = "910df9240d706b7262f7813a543ad99e800ac000fff7f4c69b7f59534782e2f9"
# What `make` reads in a fresh clone: its recipes, the project, the locks.
MAKE_FILES = ("Makefile", "pyproject.toml", "requirements.lock", "requirements-torch.lock",
              "requirements-gpu.lock")

# Small enough to train in seconds on the fixture, yet every code path of the default runs.
FAST_TRAIN = {"cnn": {"epochs": 2, "batch_size": 64}}
# The cheapest training that still runs every stage: the original network, one epoch.
TINY_TRAIN = {"model": "mlp", "mlp": {"epochs": 1, "batch_size": 64}}



def make_files(dest: Path) -> Path:
    """A fresh clone's files for `make` (no .venv yet), copied into dest."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in MAKE_FILES:
        shutil.copy2(ROOT / name, dest / name)
    return dest

@dataclass(frozen=True)
class Program:
    """A C program as fit.build() built it, and the command it runs under (its toolchain's
    runner: none on this CPU, an emulator for another's)."""

    path: Path
    runner: tuple[str, ...] = ()


def require(toolchain: c_env.Toolchain) -> None:
    """A toolchain this machine lacks fails the test, naming what installs it: a test that
    needs it is never skipped."""
    missing = toolchain.missing()
    if missing:
        pytest.fail(f"the {toolchain.name} toolchain needs {' and '.join(missing)}, not found "
                    f"on PATH: `make system-deps` installs it (as root)", pytrace=False)


def c_program(model: str, toolchain: c_env.Toolchain = c_env.NATIVE) -> Program:
    """`model`'s C program built with `toolchain` (required)."""
    from stages.frameworks.c import fit

    require(toolchain)
    return Program(fit.build(model, toolchain), toolchain.runner)


# The C programs' toolchains (stages/frameworks/c/env.py) as the parameters of a test that
# takes the module's `program` fixture, which builds with the toolchain it is handed:
# `@on_every_toolchain` over a test runs it with each. The toolchains besides the native one
# are `slow`: `make test` installs them (system-deps), `make test-fast` needs a C compiler only.
TOOLCHAINS = [pytest.param(t, id=t.name, marks=[pytest.mark.slow] if t != c_env.NATIVE else [])
              for t in c_env.TOOLCHAINS]
on_every_toolchain = pytest.mark.parametrize("program", TOOLCHAINS, indirect=True)


def run_program(program: Program, *args, check: bool = True, timeout: float = 300):
    """One of the C programs with `args`, under its runner, output captured; with check, its
    exit status must be 0."""
    proc = subprocess.run([*program.runner, str(program.path), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def write_idx(path: Path, array: np.ndarray) -> Path:
    from stages.data import idx

    path.write_bytes(idx.encode(array))
    return path


def read_idx(path: Path) -> np.ndarray:
    """An idx file the C programs wrote: uint8 or big-endian float32, its dimensions."""
    data = path.read_bytes()
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.uint8 if data[2] == 0x08 else np.dtype(">f4")
    return np.frombuffer(data, dtype, offset=4 + 4 * ndim).reshape(dims)


def dvc(repo: Path, *args, check: bool = True, timeout: float = 900, env: dict | None = None):
    return sh(repo, sys.executable, "-m", "dvc", *args, check=check, timeout=timeout, env=env)


def run_queue(repo: Path, log: Path, jobs: int = 2, timeout: float = 300) -> str:
    """`dvc queue start -j jobs`, then poll `dvc queue status` until nothing is queued or
    running, then stop the workers; the last status table.

    `dvc queue start` returns at once, but leaves a detached process behind that keeps the
    stdout and stderr it inherited while its workers live (one may idle on after "shutting
    down due to empty queue"): into the file `log`, not a pipe a test would wait on until
    its timeout."""
    with open(log, "w") as out:
        subprocess.run([sys.executable, "-m", "dvc", "queue", "start", "-j", str(jobs)],
                       cwd=repo, env=run_env(), stdout=out, stderr=subprocess.STDOUT,
                       check=True, timeout=120)
    deadline = time.monotonic() + timeout
    try:
        while True:
            status = dvc(repo, "queue", "status").stdout
            rows = [line.split() for line in status.splitlines()[1:] if line.strip()]
            if not any(len(r) > 1 and r[-1] in ("Queued", "Running") for r in rows):
                return status
            if time.monotonic() > deadline:
                raise AssertionError(f"queue still busy after {timeout}s:\n{status}")
            time.sleep(2)
    finally:
        dvc(repo, "queue", "stop", check=False, timeout=60)


def merge(base: dict, changes: dict) -> dict:
    """base updated by changes, nested mappings merged key by key (a copy)."""
    out = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def shipped_params() -> dict:
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def train_cfg(framework: str = "keras", **recipe) -> dict:
    """train's checked settings as the stage gets them: the shipped shared keys on one
    thread per pool, the mlp with `recipe` changed."""
    from stages.runtime import params

    shipped, one = shipped_params(), {"intra_op_threads": 1, "inter_op_threads": 1}
    section = merge(shipped["train"], {"framework": framework, "model": "mlp", "mlp": recipe,
                                       "keras": one, "torch": one})
    return params.train(section, params.speed(shipped["speed"] | {"c_threads": 1}))


def toy_digits(n: int = 200, seed: int = 0):
    """Separable toy data, class d lighting pixel (d, d): the fit data (80%) as train gets
    it, and the held-out 20% images and labels."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n).astype(np.uint8)
    x = np.zeros((n, 28, 28), np.float32)
    x[np.arange(n), y, y] = 1.0
    cut = n * 4 // 5
    data = {"x_train": x[:cut], "y_train": y[:cut], "x_val": x[cut:], "y_val": y[cut:]}
    return data, x[cut:], y[cut:]


def set_params(repo: Path, **sections) -> None:
    """Change params.yaml in repo: set_params(repo, train={"cnn": {"epochs": 1}})."""
    path = repo / "params.yaml"
    path.write_text(yaml.safe_dump(merge(yaml.safe_load(path.read_text()), sections),
                                   sort_keys=False))


def fixture_params(**sections) -> dict:
    """The sections make_project changes: the fixture as the only source, fast training."""
    defaults = {
        "download": {"url": FIXTURE.as_uri(), "sha256": FIXTURE_SHA256, "format": "npz",
                     "mirrors": [], "retries": 0},
        "train": FAST_TRAIN,
    }
    return merge(defaults, sections)


def make_project(dest: Path, **sections) -> Path:
    """A fresh git + DVC project holding this repo's pipeline, fed by the fixture."""
    copy_pipeline(dest)
    sh(dest, "git", "init", "-q", "-b", "main")
    dvc(dest, "init", "-q")
    dvc(dest, "config", "core.analytics", "false")
    set_params(dest, **fixture_params(**sections))
    sh(dest, "git", "add", "-A")
    sh(dest, "git", "commit", "-qm", "project under test")
    return dest


def status(repo: Path) -> dict:
    """`dvc status --json`: the stages whose deps or params changed, by name."""
    import json

    return json.loads(dvc(repo, "status", "--json").stdout)


def edit_module(repo: Path, name: str) -> None:
    """Append a comment to stages/<name>.py (name: "train", "frameworks/keras/fit"...): its
    hash changes, its behaviour does not."""
    with open(repo / "stages" / f"{name}.py", "a") as f:
        f.write("# edited by a test: a comment changes no result\n")


def stages_run(output: str) -> list[str]:
    """Names of the stages `dvc repro` actually ran, in order."""
    return [line.split("'")[1] for line in output.splitlines()
            if line.startswith("Running stage '")]


def ran_training(output: str) -> bool:
    """Did the train stage run (its per-epoch lines) in this dvc output?"""
    return "Running stage 'train'" in output or any(
        line.lower().startswith("epoch ") for line in output.splitlines())


def out_hashes(repo: Path) -> dict[str, str]:
    """sha256 of every file of every stage output in dvc.lock, by path under repo."""
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    paths = sorted({out["path"] for stage in lock["stages"].values()
                    for out in stage.get("outs", [])})
    files = []
    for rel in paths:
        path = repo / rel
        assert path.exists(), f"output {rel} is missing in {repo}"
        files += sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return {p.relative_to(repo).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


def reseeded_on_a_remote(src: Path, dest: Path, seed: int) -> tuple[Path, Path]:
    """A copy of the trained project src at dest with a local default remote (dest's
    sibling "remote"): HEAD~1 holds src's results, HEAD the results of `seed` (retrained
    through evaluate), each commit's pushed when it was made: `dvc push --all-commits`
    pushes only HEAD's outputs in DVC 3 (treeverse/dvc#10617). The repo and the remote."""
    repo = copy_project(src, dest)
    remote = dest.parent / "remote"
    dvc(repo, "remote", "add", "-d", "store", str(remote))
    sh(repo, "git", "commit", "-qam", "a remote")
    dvc(repo, "push")
    set_params(repo, train={"seed": seed})
    dvc(repo, "repro", "evaluate")
    sh(repo, "git", "commit", "-qam", f"seed {seed}")
    dvc(repo, "push")
    return repo, remote


def small_mnist(n_train: int = 12, n_test: int = 5, seed: int = 0) -> dict[str, np.ndarray]:
    """A tiny random dataset in Keras' MNIST layout (uint8 images, labels 0..9)."""
    rng = np.random.default_rng(seed)
    return {
        "x_train": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, n_train, dtype=np.uint8),
        "x_test": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def gz_idx(array: np.ndarray) -> bytes:
    """A gzip-compressed idx file holding array, as MNIST's originals are served."""
    import gzip

    from stages.data import idx

    return gzip.compress(idx.encode(array), mtime=0)


# Fashion-MNIST's class names, two of them changed to hold a comma (CSV quoting) and HTML
# markup (page escaping): names every report must show as they are written.
NAMED_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat, long", "Sandal",
                 "<Shirt> & co", "Sneaker", "Bag", "Ankle boot"]


def fixture_data() -> dict[str, np.ndarray]:
    """The fixture's four arrays (1500 training, 500 test images)."""
    with np.load(FIXTURE) as f:
        return {k: f[k] for k in f.files}


def centroid_probabilities(data: dict[str, np.ndarray]) -> np.ndarray:
    """Deterministic, realistic-looking predictions without a network: a softmax over
    the negative distances to each class's mean training image (~80% right)."""
    x = data["x_train"].reshape(len(data["x_train"]), -1).astype(np.float64) / 255
    means = np.stack([x[data["y_train"] == d].mean(axis=0) for d in range(10)])
    t = data["x_test"].reshape(len(data["x_test"]), -1).astype(np.float64) / 255
    logits = -((t[:, None, :] - means[None]) ** 2).sum(axis=2)
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def probabilities_for(cases: list[tuple[int, int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """(true, predicted, confidence) per test image -> y_true (uint8), probabilities N×10
    (the rest of each row spread evenly over the other nine classes)."""
    y = np.array([t for t, _, _ in cases], dtype=np.uint8)
    p = np.zeros((len(cases), 10), dtype=np.float32)
    for i, (_, pred, conf) in enumerate(cases):
        p[i] = (1 - conf) / 9
        p[i, pred] = conf
    return y, p


class MakesMarker:
    """Unpickling this creates the file `marker`: proof that something was unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def copy_project(src: Path, dest: Path) -> Path:
    """A copy of a whole project (work tree, .git, .dvc and its cache) at dest.

    DVC's cache keeps copies, not links, so the copy shares nothing with src: a test can
    change a trained project for the price of a file copy instead of a training.
    """
    shutil.copytree(src, dest, symlinks=True)
    return dest


# --- sources over the limits: refusals measured in a child interpreter -------------------
# Sources that declare more than MNIST's layout allows, or never end, must be refused from
# their headers or at a size cap, in bounded memory and seconds. Every check that could
# exhaust memory runs in a child interpreter (probe) that reports its own peak RSS (VmHWM)
# and time; zip and gzip bombs are built from one compressed megabyte of zeros repeated, so
# the tests stay light.

# A child that imports numpy and stages.download peaks at ~40 MiB; the largest array any of
# these refusals may legitimately hold is 47 MB (60,000 images, uint8). Every bomb inflates
# to 2 GiB and every claim is gigabytes, so a loader that trusted them would pass this
# bound by far.
MEMORY_BOUND_MIB = 200
TIME_BOUND_S = 20  # a bound, not a benchmark: each refusal takes well under a few seconds
BOMB_BYTES = 2 << 30  # what each bomb inflates to
MIB = 1 << 20
FULL_TRAIN = (60_000, 28, 28)
FULL_IMAGES = 60_000 * 28 * 28

PROBE = """
import json, resource, sys, time
started = time.perf_counter()
args = sys.argv[1:]
from stages.runtime.failures import PipelineError
try:
{code}
    outcome = {{"result": repr(result)}}
except PipelineError as err:
    outcome = {{"error": type(err).__name__, "message": str(err)}}
outcome["seconds"] = round(time.perf_counter() - started, 3)
try:  # this process's own high-water mark: ru_maxrss would carry the parent's over exec
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
outcome["peak_mib"] = round(peak / 1024, 1)
print("PROBE " + json.dumps(outcome))
"""


def probe(code: str, *args) -> dict:
    """Run `code` (which sets `result`) in a fresh interpreter; its outcome, peak RSS and
    time. A child measures only itself: this test process's memory does not count."""
    import json
    import textwrap
    import time

    env = run_env()
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                "ALL_PROXY"):
        env.pop(var, None)
    env["no_proxy"] = env["NO_PROXY"] = "127.0.0.1,localhost"
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", PROBE.format(code=textwrap.indent(code, "    ")), *map(str, args)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        stdin=subprocess.DEVNULL)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    outcome = json.loads(lines[-1][len("PROBE "):])
    outcome["wall"] = round(time.perf_counter() - started, 3)
    print(f"\nprobe: {outcome}")  # shown with -s: the measured peak and time
    return outcome


def refused_in_bounds(outcome: dict, kind: str, source, pattern: str) -> str:
    """The child was refused with `kind`, in one line naming the source, in bounds."""
    import re

    assert outcome.get("error") == kind, outcome
    message = outcome["message"]
    assert message.startswith(str(source)) and "\n" not in message, message
    assert re.search(pattern, message), message
    assert outcome["peak_mib"] < MEMORY_BOUND_MIB, outcome
    assert outcome["wall"] < TIME_BOUND_S, outcome
    return message


def deflate_zeros(size: int) -> bytes:
    """Raw deflate blocks inflating to `size` zero bytes (a multiple of 1 MiB): one fully
    flushed, self-contained compressed MiB repeated, ~1 KB per MiB."""
    import zlib

    assert size % MIB == 0
    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = compressor.compress(bytes(MIB)) + compressor.flush(zlib.Z_FULL_FLUSH)
    return block * (size // MIB)


def deflate(data: bytes) -> bytes:
    """Raw deflate blocks of data, not final: more blocks may follow."""
    import zlib

    compressor = zlib.compressobj(9, zlib.DEFLATED, -15)
    return compressor.compress(data) + compressor.flush(zlib.Z_FULL_FLUSH)


FINAL_BLOCK = b"\x03\x00"  # an empty final deflate block: the end of a stream


def crc_of(head: bytes, zeros: int) -> int:
    """CRC-32 of head followed by `zeros` zero bytes, computed a MiB at a time."""
    import zlib

    crc, block = zlib.crc32(head), bytes(MIB)
    for _ in range(zeros // MIB):
        crc = zlib.crc32(block, crc)
    return zlib.crc32(bytes(zeros % MIB), crc)


# --- child processes a test watches line by line, and a loaded machine ------------------

@contextlib.contextmanager
def busy_cores(n: int = 2):
    """n processes spinning on a core each, for the duration of the block: a loaded machine.

    Under load, every step of the stage takes longer and a signal lands at moments an idle
    machine rarely shows (inside TensorFlow's import, tracing, a chunk's conversion).
    """
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


class Lines:
    """Read a child's stdout on a thread, so a test can wait for a line with a timeout."""

    def __init__(self, proc: subprocess.Popen, stream: str = "stdout"):
        self.proc, self.seen, self._q = proc, [], queue.Queue()
        self._stream = getattr(proc, stream)
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self._stream:
            self._q.put(line)
        self._q.put(None)

    def wait_for(self, prefix: str | tuple[str, ...], timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._q.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                raise AssertionError(f"exited {self.proc.wait()} before {prefix!r}:\n"
                                     + "".join(self.seen) + (self.proc.stderr.read()
                                     if self._stream is not self.proc.stderr else ""))
            self.seen.append(line)
            if line.startswith(prefix):
                return line
        raise AssertionError(f"no line {prefix!r} within {timeout}s:\n" + "".join(self.seen))

    def rest(self) -> str:
        chunks = []
        while (line := self._q.get(timeout=60)) is not None:
            chunks.append(line)
        return "".join(self.seen + chunks)


def workers_of(process) -> dict:
    """The data-parallel worker processes under `process` (a psutil.Process), by rank:
    torch.distributed's launcher sets RANK in each one's environment."""
    import psutil

    found = {}
    for child in [process, *process.children(recursive=True)]:
        try:
            rank = child.environ().get("RANK")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if rank is not None:
            found[int(rank)] = child
    return found


def start(repo: Path, *args, env: dict | None = None) -> tuple[subprocess.Popen, Lines]:
    proc = subprocess.Popen(args, cwd=repo, env=env or run_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    return proc, Lines(proc)


# --- property tests ------------------------------------------------------------------------


def property_settings(max_examples: int = 60):
    """Hypothesis settings for properties whose examples write files: no per-example
    deadline (disk and zip work vary with the machine's load), no too-slow health check."""
    from hypothesis import HealthCheck, settings

    return settings(max_examples=max_examples, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


def png_bomb(path: Path, side: int = 20_000) -> Path:
    """A valid 1-bit PNG of side×side black pixels (400 Mpx at the default): ~50 MB of rows
    deflated to ~50 KB, written row by row, so making it costs no memory."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    deflate, row = zlib.compressobj(9), b"\0" * (1 + (side + 7) // 8)
    body = b"".join(deflate.compress(row) for _ in range(side)) + deflate.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body)
                     + chunk(b"IEND", b""))
    return path


# --- a page in a real headless Chromium (the error page, mnist-errors-diff's page) ---------
#
# A test copy of the page gets a small harness script at the top of <head> (the page itself
# has no script). It records JavaScript errors, failed resource loads, Content-Security-
# Policy violations and console errors, and on the load event writes a JSON verdict (images
# found, images not rendered: naturalWidth 0) into the DOM, which `chromium --dump-dom`
# prints. Chromium's own log (--enable-logging=stderr) is read too: any CONSOLE line from
# the page fails the test. Chromium is Debian's `chromium` package (`make system-deps`);
# without it these tests fail, never skip.

HARNESS = """<script>
(function () {
  var problems = [];
  window.addEventListener('error', function (e) {
    var t = e.target;
    if (t && t !== window && t.tagName) {
      problems.push('failed to load <' + t.tagName.toLowerCase() + '> ' +
                    String(t.src || t.href || '').slice(0, 80));
    } else {
      problems.push('error: ' + e.message);
    }
  }, true);
  window.addEventListener('unhandledrejection', function (e) {
    problems.push('unhandled rejection: ' + e.reason);
  });
  document.addEventListener('securitypolicyviolation', function (e) {
    problems.push('CSP violation: ' + e.violatedDirective + ' ' + e.blockedURI);
  });
  ['error', 'warn'].forEach(function (level) {
    var original = console[level];
    console[level] = function () {
      problems.push('console.' + level + ': ' + Array.prototype.join.call(arguments, ' '));
      return original.apply(console, arguments);
    };
  });
  window.addEventListener('load', function () {
    var images = Array.prototype.slice.call(document.images);
    var broken = images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
    var out = document.createElement('pre');
    out.id = 'harness-result';
    out.textContent = JSON.stringify({
      images: images.length,
      broken: broken.map(function (i) { return i.alt || String(i.src).slice(0, 60); }),
      problems: problems
    });
    document.body.appendChild(out);
  });
})();
</script>
"""


def find_chromium() -> str | None:
    for name in (os.environ.get("CHROMIUM", ""), "chromium", "chromium-browser"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def need_chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.fail("chromium not found: `make test` installs Debian's chromium package")
    return path


def harnessed(page: str) -> str:
    """The test copy: the harness first in <head>, and the CSP allowing inline script."""
    from stages.analysis.page import CSP

    csp = f'content="{CSP}"'
    assert page.count(csp) == 1 and page.count("<head>") == 1
    page = page.replace(csp, f'content="{CSP}; script-src \'unsafe-inline\'"')
    return page.replace("<head>", "<head>\n" + HARNESS, 1)


def load_in_chromium(page: str, tmp_path: Path) -> dict:
    """Open a harnessed copy of `page` from a file: URL; the harness verdict plus the
    CONSOLE lines of Chromium's log."""
    chromium = need_chromium()
    copy = tmp_path / "page-under-test.html"
    copy.write_text(harnessed(page), encoding="utf-8")
    env = dict(os.environ, HOME=str(tmp_path))
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--no-first-run", "--no-default-browser-check",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
         "--dump-dom", copy.as_uri()],
        capture_output=True, text=True, timeout=180, env=env)
    found = re.search(r'<pre id="harness-result">(.*?)</pre>', proc.stdout, re.S)
    assert found, f"no harness result (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    result = json.loads(html.unescape(found.group(1)))
    result["console"] = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return result
