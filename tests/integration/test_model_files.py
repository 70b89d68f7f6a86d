"""Model folders built to break a reader: each refused in one line, in bounded memory and
time, with nothing of theirs executed (stages/frameworks/files.py and each framework's
model.py).

A model folder can come from anyone: `mnist-predict --model-dir`, `--rev`, a registry, a
committee member. The cases below are made by the test from genuine folders (the fixture
project's trained Keras cnn, a PyTorch mlp and a C cnn saved here): inflating archives,
lying headers, configs that name layers or functions from elsewhere, a pickle posing as
safetensors, huge sparse files, FIFOs and links to devices, truncated and empty files, and
run_info.json files that are not one.

One child interpreter per framework loads every case of that framework in turn through
stages.frameworks.predictor (what evaluate, mnist-predict and the committee call), and
reports for each the error line, its time, and its own peak RSS: the high-water mark is
reset before each case (/proc/self/clear_refs), so each peak is that case's alone, the
framework's import included. Then the installed `mnist-predict` is run on one case per
framework: exit status 1 and one `error:` line on stderr, no traceback.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from stages.frameworks import RUN_INFO
from stages.frameworks.c import model as c_model
from testbed.processes import run_env
from tests.hostile import deflate_zeros
from tests.paths import ROOT

pytestmark = pytest.mark.slow

# Each case's peak RSS, the framework's own import included: TensorFlow alone takes more
# than half of Keras' bound; a loader that trusted any of these files would need gigabytes.
MEMORY_BOUND_MIB = {"keras": 850, "torch": 600, "c": 250}
TIME_BOUND_S = 10
HUGE = 10 << 30  # what the sparse files claim to hold, and the bombs to inflate to (scaled)
PREDICT = str(Path(sys.executable).parent / "mnist-predict")

CHILD = r"""
import json, sys, time
from pathlib import Path
from stages import frameworks
from stages.runtime.failures import PipelineError

def peak_mib():
    with open("/proc/self/status") as status:
        return next(int(l.split()[1]) for l in status if l.startswith("VmHWM:")) / 1024

frameworks.network(sys.argv[1])  # the framework imported, as any load of its models does
found = {}
for folder in sys.argv[2:]:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the high-water mark back to what is resident now
    started = time.perf_counter()
    try:
        frameworks.predictor(Path(folder), 1, 1)
        outcome = {"loaded": True}
    except PipelineError as err:
        outcome = {"error": str(err)}
    found[Path(folder).name] = outcome | {"seconds": round(time.perf_counter() - started, 3),
                                          "peak_mib": round(peak_mib(), 1)}
print("CASES " + json.dumps(found))
"""


class Marks:
    """A pickle payload that leaves a file behind if it is ever unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def run_info(framework: str, model: str, model_file: str) -> str:
    return json.dumps({"framework": framework, "model": model, "model_file": model_file})


# --- the genuine folders ------------------------------------------------------------------


@pytest.fixture(scope="module")
def genuine(trained_project, tmp_path_factory):
    """A genuine model folder per framework: the fixture project's trained Keras cnn (with
    its optimizer's state), a PyTorch mlp and a C cnn saved by the project's own save()."""
    root = tmp_path_factory.mktemp("genuine")
    folders = {name: root / name for name in ("keras", "torch", "c")}
    shutil.copytree(trained_project.repo / "data" / "model", folders["keras"])
    folders["c"].mkdir()
    c_model.save(c_model.build("cnn", seed=1), folders["c"])
    (folders["c"] / RUN_INFO).write_text(run_info("c", "cnn", c_model.MODEL_FILE))
    folders["torch"].mkdir()
    subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path\n"
                    "from stages.frameworks.torch import model\n"
                    "model.save(model.build('mlp'), Path(sys.argv[1]))", str(folders["torch"])],
                   cwd=ROOT, env=run_env(), check=True, timeout=120)
    (folders["torch"] / RUN_INFO).write_text(run_info("torch", "mlp", "model.safetensors"))
    return folders


def variant(genuine: Path, root: Path, name: str) -> tuple[Path, Path]:
    """A copy of a genuine folder named after its case, and its model file."""
    folder = root / name
    shutil.copytree(genuine, folder)
    files = [p for p in folder.iterdir() if p.name != RUN_INFO]
    return folder, files[0]


def adder(genuine: Path, root: Path, cases: dict, target: str | None = None):
    """A function (name, damage, pattern) that adds the case `name` to `cases`: a variant of
    the genuine folder whose file `target` (default: its model file) `damage` changes, and
    the pattern its refusal must match."""
    def add(name: str, damage, pattern: str) -> None:
        folder, model_file = variant(genuine, root, name)
        damage(folder / target if target else model_file)
        cases[name] = pattern
    return add


def sparse(path: Path, size: int = HUGE) -> None:
    path.unlink()
    with open(path, "wb") as f:
        f.truncate(size)  # a hole: no disk used, `size` bytes to whoever reads it


def replace_member(path: Path, name: str, data: bytes | None = None,
                   declared: int | None = None, extra: dict | None = None) -> None:
    """Rewrite the .keras archive at path with member `name` replaced by `data` (raw
    deflate when `declared` is given: the size its header claims), and `extra` members."""
    with zipfile.ZipFile(path) as src:
        members = {info.filename: src.read(info) for info in src.infolist()}
    if data is not None and declared is None:
        members[name] = data
    members |= extra or {}
    rebuilt = path.with_suffix(".tmp")
    with zipfile.ZipFile(rebuilt, "w") as dst:
        for member, content in members.items():
            if member == name and declared is not None:
                continue
            dst.writestr(member, content)
    if declared is not None:
        append_raw_member(rebuilt, name, data, declared)
    rebuilt.replace(path)


def append_raw_member(path: Path, name: str, deflated: bytes, declared: int) -> None:
    """Add a member whose deflated bytes are given as they are and whose header declares
    `declared` bytes inflated (and a CRC of zeros), whatever they inflate to."""
    import struct
    import zlib

    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
    data = path.read_bytes()
    directory_at = struct.unpack("<I", data[-6:-2])[0]
    body, directory = data[:directory_at], data[directory_at:-22]
    crc = zlib.crc32(b"")
    raw_name = name.encode()
    size32 = min(declared, 0xFFFFFFFF)
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, crc, len(deflated),
                        size32, len(raw_name), 0) + raw_name
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0x21, crc,
                          len(deflated), size32, len(raw_name), 0, 0, 0, 0, 0o644 << 16,
                          len(body)) + raw_name
    new_directory = directory + central
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(infos) + 1, len(infos) + 1,
                      len(new_directory), len(body) + len(local) + len(deflated), 0)
    path.write_bytes(body + local + deflated + new_directory + end)


# --- the cases ----------------------------------------------------------------------------


def common_cases(genuine: Path, root: Path) -> dict[str, str]:
    """run_info.json cases (any framework's folder): case name -> the reason's pattern."""
    cases = {}
    info_case = adder(genuine, root, cases, RUN_INFO)

    info_case("run-info-missing", Path.unlink, r"cannot read the model's run info \(No such")
    info_case("run-info-huge", lambda p: p.write_text("{" + " " * (2 << 20) + "}"),
              r"[\d,]+ bytes; a model's run info of this project has at most [\d,]+$")
    info_case("run-info-fifo", lambda p: (p.unlink(), os.mkfifo(p)), "not a regular file")
    info_case("run-info-device", lambda p: (p.unlink(), p.symlink_to("/dev/zero")),
              "not a regular file")
    info_case("run-info-not-json", lambda p: p.write_text("{framework: keras"),
              "cannot read the model's run info")
    info_case("run-info-a-list", lambda p: p.write_text("[]"), "framework None is none of")
    info_case("run-info-nested-50k-deep", lambda p: p.write_text("[" * 50_000),
              "cannot read the model's run info")
    info_case("run-info-other-framework", lambda p: p.write_text('{"framework": "jax"}'),
              "framework 'jax' is none of keras, torch, c")
    return cases


def c_cases(genuine: Path, root: Path, marker: Path) -> dict[str, str]:
    cases = {}
    case = adder(genuine, root, cases)

    case("c-sparse-10GiB", sparse, rf"{HUGE:,} bytes; a model file of this project has at "
         rf"most {c_model.CNN_SIZE:,}")
    case("c-fifo", lambda p: (p.unlink(), os.mkfifo(p)), "not a regular file")
    case("c-link-to-dev-zero", lambda p: (p.unlink(), p.symlink_to("/dev/zero")),
         "not a regular file")
    case("c-a-folder", lambda p: (p.unlink(), p.mkdir()), "not a regular file")
    case("c-empty", lambda p: p.write_bytes(b""), "not a model file of the C program")
    case("c-truncated", lambda p: p.write_bytes(p.read_bytes()[:1000]),
         f"1000 bytes; a model file has {c_model.CNN_SIZE}$")
    case("c-a-pickle", lambda p: p.write_bytes(pickle.dumps(Marks(str(marker)))),
         "not a model file of the C program")
    return cases


def torch_cases(genuine: Path, root: Path, marker: Path) -> dict[str, str]:
    cases = {}
    case = adder(genuine, root, cases)
    genuine_file = next(p for p in genuine.iterdir() if p.suffix == ".safetensors")
    data = genuine_file.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])

    def with_header(edit):
        def write(path: Path) -> None:
            changed = json.loads(json.dumps(header))
            edit(changed)
            raw = json.dumps(changed).encode()
            path.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + length:])
        return write

    def grow(h):  # a shape and offsets that claim far more than the network's tensor
        h["fc1.weight"]["shape"] = [1_000_000, 784]
        h["fc1.weight"]["data_offsets"][1] = h["fc1.weight"]["data_offsets"][0] + 4 * 784_000_000

    case("torch-a-pickle", lambda p: p.write_bytes(pickle.dumps(Marks(str(marker)))),
         "not a safetensors model file of this project")
    case("torch-header-claims-2^62-bytes",
         lambda p: p.write_bytes((1 << 62).to_bytes(8, "little") + data[8:]),
         "not a safetensors model file of this project")
    case("torch-header-not-json", lambda p: p.write_bytes(
        (16).to_bytes(8, "little") + b"{not json at all" + data[8 + length:]),
        "its safetensors header is not JSON")
    case("torch-shape-lies", with_header(grow), r"tensor fc1\.weight is F32 \[1000000, 784\]")
    case("torch-header-nested-100k-deep", lambda p: p.write_bytes(
        (100_000).to_bytes(8, "little") + b"[" * 100_000 + data[8 + length:]),
        "its safetensors header is not JSON")
    case("torch-other-network", with_header(lambda h: h.update(__metadata__={"model": "vit"})),
         r"names no network of this project \('vit'\)")
    case("torch-metadata-a-list", with_header(lambda h: h.update(__metadata__=[["model"]])),
         r"names no network of this project \(None\)")
    case("torch-name-a-list", with_header(lambda h: h.update(__metadata__={"model": ["mlp"]})),
         r"names no network of this project \(\['mlp'\]\)")
    case("torch-extra-tensor", with_header(lambda h: h.update(extra=h["fc2.bias"])),
         "its tensors are not those of the mlp")
    case("torch-offsets-not-ints", with_header(
        lambda h: h["fc2.bias"].update(data_offsets="0-40")), "header entry is not")
    case("torch-truncated", lambda p: p.write_bytes(data[:len(data) // 2]),
         "bytes; the mlp's model file has")
    case("torch-sparse-10GiB", sparse, rf"{HUGE:,} bytes; a model file of this project has")
    case("torch-empty", lambda p: p.write_bytes(b""), "not a safetensors model file")
    return cases


def keras_cases(genuine: Path, root: Path, marker: Path) -> dict[str, str]:
    import h5py

    cases = {}
    case = adder(genuine, root, cases)
    genuine_file = genuine / "model.keras"
    with zipfile.ZipFile(genuine_file) as z:
        config = json.loads(z.read("config.json"))
        weights = z.read("model.weights.h5")

    def with_config(edit):
        def write(path: Path) -> None:
            changed = json.loads(json.dumps(config))
            edit(changed["config"]["layers"])
            replace_member(path, "config.json", json.dumps(changed).encode())
        return write

    def foreign_layer(layers):  # a "layer" that is a shell command, were it ever built
        layers[2] = {"module": "os", "class_name": "system", "registered_name": None,
                     "config": {"command": f"touch {marker}"}}

    def lambda_layer(layers):
        layers[2] = {"module": "keras.layers", "class_name": "Lambda", "registered_name":
                     None, "config": {"name": "x", "function": {
                         "class_name": "__lambda__", "config": {
                             "code": f"__import__('pathlib').Path('{marker}').touch()",
                             "defaults": None, "closure": None}}}}

    def wide(layers):  # a Dense of a billion units: gigabytes, were it built
        dense = next(layer for layer in layers if layer["class_name"] == "Dense")
        dense["config"]["units"] = 1_000_000_000

    def huge_dataset(path: Path) -> None:
        """The weights file with one more array, gzip-compressed: a few KB on disk,
        gigabytes to read."""
        import io

        buffer = io.BytesIO(weights)
        with h5py.File(buffer, "a") as h5:
            h5["layers/dense/vars"].create_dataset("2", shape=(50_000, 10_000), dtype="f4",
                                                   compression="gzip", fillvalue=0)
        replace_member(path, "model.weights.h5", buffer.getvalue())

    bomb = deflate_zeros(64 << 20)  # 64 MiB of zeros in ~64 KB: declared as HUGE
    case("keras-weights-inflate-to-10GiB",
         lambda p: replace_member(p, "model.weights.h5", bomb, declared=HUGE),
         r"model\.weights\.h5 inflates to [\d,]+ bytes; at most")
    case("keras-weights-understate-their-size",
         lambda p: replace_member(p, "model.weights.h5", bomb, declared=len(weights)),
         "not a model file of this project")
    case("keras-extra-member",
         lambda p: replace_member(p, "", extra={"payload.py": b"import os"}),
         r"holds \['config\.json', 'metadata\.json', 'model\.weights\.h5', 'payload\.py'\]")
    case("keras-layer-from-another-module", with_config(foreign_layer),
         "config.json is not this project's cnn")
    case("keras-lambda-layer", with_config(lambda_layer), "config.json is not this project's cnn")
    case("keras-a-billion-units", with_config(wide), "config.json is not this project's cnn")
    case("keras-other-network", lambda p: replace_member(p, "config.json", json.dumps(
        {"class_name": "Sequential", "config": {"name": "resnet", "layers": []}}).encode()),
        r"names no network of this project \('resnet'\)")
    case("keras-config-a-list", lambda p: replace_member(p, "config.json", json.dumps(
        {"class_name": "Sequential", "config": [["name", "cnn"]]}).encode()),
        r"names no network of this project \('None'\)")
    case("keras-name-a-list", lambda p: replace_member(p, "config.json", json.dumps(
        {"class_name": "Sequential", "config": {"name": ["cnn"]}}).encode()),
        r"names no network of this project \(\"\['cnn'\]\"\)")
    case("keras-config-not-json", lambda p: replace_member(p, "config.json", b"{layers"),
         "not a model file of this project")
    case("keras-config-nested-100k-deep",
         lambda p: replace_member(p, "config.json", b"[" * 100_000),
         "not a model file of this project")
    case("keras-weights-with-a-huge-array", huge_dataset, "its weights are not the cnn's arrays")
    case("keras-not-a-zip", lambda p: p.write_bytes(pickle.dumps(Marks(str(marker)))),
         "not a model file of this project")
    case("keras-empty", lambda p: p.write_bytes(b""), "not a model file of this project")
    case("keras-sparse-10GiB", sparse, rf"{HUGE:,} bytes; a model file of this project has")
    return cases


def load_each(framework: str, folders: list[Path]) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, framework, *map(str, folders)],
                          cwd=ROOT, env=run_env(), capture_output=True, text=True,
                          timeout=60 + TIME_BOUND_S * len(folders), stdin=subprocess.DEVNULL)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("CASES ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1][len("CASES "):])


@pytest.mark.parametrize("framework", ["c", "torch", "keras"])
def test_every_hostile_folder_is_refused_in_one_line_within_bounds(genuine, tmp_path,
                                                                   framework):
    marker = tmp_path / "executed.marker"
    cases = common_cases(genuine[framework], tmp_path) | {
        "c": c_cases, "torch": torch_cases, "keras": keras_cases}[framework](
        genuine[framework], tmp_path, marker)
    found = load_each(framework, [genuine[framework], *(tmp_path / name for name in cases)])
    # The genuine folder loads, in the same bounds: what the cases are measured against.
    assert found.pop(genuine[framework].name).get("loaded"), found
    print(f"\n{framework}: case, seconds, peak MiB, line")
    for name, pattern in cases.items():
        outcome = found[name]
        print(f"{name}\t{outcome['seconds']}\t{outcome['peak_mib']}\t{outcome.get('error')}")
        assert "error" in outcome, (name, outcome)
        line = outcome["error"]
        assert "\n" not in line and str(tmp_path / name) in line, (name, line)
        assert re.search(pattern, line), (name, pattern, line)
        assert outcome["peak_mib"] < MEMORY_BOUND_MIB[framework], (name, outcome)
        assert outcome["seconds"] < TIME_BOUND_S, (name, outcome)
    assert not marker.exists()  # no payload ran


@pytest.mark.parametrize("framework, case", [("c", "c-fifo"),
                                             ("torch", "torch-a-pickle"),
                                             ("keras", "keras-layer-from-another-module")])
def test_mnist_predict_refuses_a_hostile_folder_in_one_line(genuine, tmp_path, framework,
                                                            case):
    from PIL import Image

    marker = tmp_path / "executed.marker"
    builders = {"c": c_cases, "torch": torch_cases, "keras": keras_cases}
    builders[framework](genuine[framework], tmp_path, marker)
    image = tmp_path / "digit.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(image)
    proc = subprocess.run([PREDICT, "--model-dir", str(tmp_path / case), str(image)],
                          cwd=tmp_path, env=run_env(), capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert str(tmp_path / case) in lines[0] and proc.stdout == ""
    assert not marker.exists()


# --- what other revisions hold ------------------------------------------------------------


def test_another_revisions_oversized_model_folder_and_tables_are_refused_unread(
        reader_project, tmp_path):
    """A commit whose model folder holds a file beyond any network's size, and whose
    metrics are a file of tens of megabytes: `mnist-predict --rev` refuses the folder from
    DVC's index, before copying a byte, and the committee refuses the metrics unread."""
    from mnist_cli import revisions
    from testbed.processes import sh
    from tests.projects import copy_project, dvc

    repo = copy_project(reader_project, tmp_path / "project")
    model_file = repo / "data" / "model" / c_model.MODEL_FILE
    model_file.unlink()
    with open(model_file, "wb") as f:
        f.truncate(revisions.FOLDER_CAP + 1)
    metrics = repo / "reports" / "metrics.json"
    metrics.write_text('{"accuracy": 0.5, "pad": "' + " " * revisions.TEXT_CAP + '"}')
    dvc(repo, "commit", "--force", "train", "evaluate")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "a model folder and metrics no run of ours writes")

    image = tmp_path / "digit.png"
    from PIL import Image

    Image.fromarray(np.zeros((28, 28), np.uint8)).save(image)
    proc = subprocess.run([PREDICT, "--rev", "HEAD", str(image)], cwd=repo, env=run_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert re.fullmatch(r"error: data/model at HEAD: [\d,]+ bytes; a model folder of this "
                        rf"project holds at most {revisions.FOLDER_CAP:,}\n", proc.stderr)
    committee = subprocess.run([str(Path(sys.executable).parent / "mnist-committee"),
                                "HEAD~1", "HEAD"], cwd=repo, env=run_env(),
                               capture_output=True, text=True, timeout=300)
    assert committee.returncode == 1
    assert re.fullmatch(rf"error: reports/metrics\.json at HEAD: more than "
                        rf"{revisions.TEXT_CAP:,} bytes; refused unread\n", committee.stderr)
