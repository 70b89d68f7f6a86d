"""The locks (tools/lock.py) and the resolver check (tools/check_wheels.py).

The locks are read as pip reads them: the TensorFlow packages' markers are exact
complements on every platform and Python, the locks agree on every shared pin, and the CPU
lock holds none of PyTorch's CUDA runtime. The resolver check runs for real, with uv and pip,
against a package index the test serves on 127.0.0.1, whose packages it builds: a wheel for
any platform, one for Linux x86_64 only, and two source archives, one that builds into a
pure-Python wheel and one into a platform wheel.
"""

from __future__ import annotations

import functools
import http.server
import io
import os
import tarfile
import threading
import zipfile
from pathlib import Path

import pytest
from packaging.markers import Marker

from tests.paths import ROOT
from tools import check_wheels, lock
from tools.pythons import supported

LOCKS = ("requirements.lock", "requirements-torch.lock", "requirements-gpu.lock")


def pins(name: str) -> dict[str, tuple[str, Marker | None]]:
    """A lock's pins: name -> (version, marker or None)."""
    out = {}
    for line in (ROOT / name).read_text().splitlines():
        if "==" in line and not line.startswith((" ", "#")):
            requirement, _, marker = line.partition(";")
            package, version = requirement.strip().split("==")
            out[package] = (version, Marker(marker) if marker.strip() else None)
    return out


def environments():
    """Every platform the locks serve, at every supported Python, as markers see them."""
    for system, machine in (("linux", "x86_64"), ("linux", "aarch64"), ("darwin", "arm64"),
                            ("darwin", "x86_64"), ("win32", "AMD64")):
        for python in supported():
            yield {"sys_platform": system, "platform_machine": machine,
                   "python_version": python, "python_full_version": f"{python}.0",
                   "implementation_name": "cpython", "platform_system": system.title()}


@pytest.mark.parametrize("name", ["requirements.lock", "requirements-torch.lock"])
def test_exactly_one_tensorflow_package_on_every_platform_and_python(name):
    locked = pins(name)
    for env in environments():
        chosen = [p for p in ("tensorflow", "tensorflow-cpu") if locked[p][1].evaluate(env)]
        expected = "tensorflow-cpu" if env["sys_platform"] == "linux" and \
            env["platform_machine"] == "x86_64" else "tensorflow"
        assert chosen == [expected], env


def test_the_locks_agree_on_every_shared_pin():
    main, torch, gpu = (pins(name) for name in LOCKS)
    assert {k: torch[k] for k in main} == main
    shared = set(gpu) & set(torch) - {"tensorflow"}  # the GPU lock's has no marker: Linux only
    assert shared and {k: gpu[k][0] for k in shared} == {k: torch[k][0] for k in shared}
    assert gpu["tensorflow"][0] == torch["tensorflow"][0] == torch["tensorflow-cpu"][0]


def test_the_cpu_lock_leaves_pytorchs_cuda_runtime_to_the_gpu_lock():
    main, torch, gpu = (pins(name) for name in LOCKS)
    cuda = {p for p in gpu if lock.CUDA_RUNTIME.match(p)}
    assert {"triton", "nvidia-cudnn-cu13", "nvidia-cudnn-cu12"} <= cuda
    assert {p for p in torch if lock.CUDA_RUNTIME.match(p)} == \
        {p for p in main if lock.CUDA_RUNTIME.match(p)}  # only what the main lock needs


def test_without_drops_a_requirement_with_its_annotations_only():
    text = ("a==1\n    # via b\nnvidia-x==2 ; sys_platform == 'linux'\n    # via\n"
            "    #   torch\nnvidia-kept==3\n    # via dvclive\nz==4\n")
    assert lock.without(text, lock.CUDA_RUNTIME, keep={"nvidia-kept"}) == (
        "a==1\n    # via b\nnvidia-kept==3\n    # via dvclive\nz==4\n")
    assert lock.pinned(text) == {"a", "nvidia-x", "nvidia-kept", "z"}


# --- the resolver check, against an index of the test's own -----------------------------------


def dist_info(name: str, tag: str) -> dict[str, str]:
    info = f"{name}-1.0.dist-info"
    return {f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
            f"{info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: test\n"
                             f"Root-Is-Purelib: {str(tag.endswith('none-any')).lower()}\n"
                             f"Tag: {tag}\n",
            f"{info}/RECORD": ""}


def write_wheel(folder: Path, name: str, tag: str) -> None:
    with zipfile.ZipFile(folder / f"{name}-1.0-{tag}.whl", "w") as wheel:
        for path, text in dist_info(name, tag).items():
            wheel.writestr(path, text)


# A PEP 517 backend in the source archive itself: it needs nothing installed to build, and
# builds a wheel with the tag the archive was made for.
BACKEND = '''
import zipfile
FILES = {files!r}
def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name = "{name}-1.0-{tag}.whl"
    with zipfile.ZipFile(wheel_directory + "/" + name, "w") as wheel:
        for path, text in FILES.items():
            wheel.writestr(path, text)
    return name
'''


def write_sdist(folder: Path, name: str, tag: str) -> None:
    files = {
        "pyproject.toml": '[build-system]\nrequires = []\nbuild-backend = "backend"\n'
                          'backend-path = ["."]\n',
        "backend.py": BACKEND.format(files=dist_info(name, tag), name=name, tag=tag),
        "PKG-INFO": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
    }
    with tarfile.open(folder / f"{name}-1.0.tar.gz", "w:gz") as sdist:
        for path, text in files.items():
            data = text.encode()
            member = tarfile.TarInfo(f"{name}-1.0/{path}")
            member.size = len(data)
            sdist.addfile(member, io.BytesIO(data))


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    """A PEP 503 index on 127.0.0.1: its /simple/ URL."""
    root = tmp_path_factory.mktemp("index")
    files = root / "files"
    files.mkdir()
    write_wheel(files, "anywhere", "py3-none-any")
    write_wheel(files, "linuxonly", "py3-none-manylinux_2_28_x86_64")
    write_sdist(files, "puresrc", "py3-none-any")
    write_sdist(files, "nativesrc", "cp311-cp311-linux_x86_64")
    for dist in files.iterdir():
        project = root / "simple" / dist.name.split("-")[0]
        project.mkdir(parents=True, exist_ok=True)
        (project / "index.html").write_text(
            f'<html><body><a href="../../files/{dist.name}">{dist.name}</a></body></html>')
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/simple/"
    server.shutdown()


def checked(index: str, requirements: str, platform: str, pure: dict | None = None) -> str:
    """check_wheels.check on requirements, with uv and pip reading only this index."""
    env = os.environ | {"UV_DEFAULT_INDEX": index, "UV_NO_CACHE": "1", "UV_OFFLINE": "0",
                        "PIP_INDEX_URL": index, "PIP_NO_CACHE_DIR": "1",
                        "UV_HTTP_TIMEOUT": "30", "PIP_DEFAULT_TIMEOUT": "30"}
    return check_wheels.check(requirements, platform, "3.12", env, {} if pure is None else pure)


@pytest.mark.slow
def test_wheels_for_the_platform_pass_and_a_missing_one_is_named(index):
    assert checked(index, "anywhere==1.0\nlinuxonly==1.0\n", "x86_64-manylinux_2_28") == ""
    problem = checked(index, "anywhere==1.0\nlinuxonly==1.0\n", "aarch64-manylinux_2_28")
    assert "linuxonly==1.0" in problem and "platform" in problem
    assert "\n" not in problem


@pytest.mark.slow
def test_a_source_archive_passes_only_if_it_builds_into_a_pure_python_wheel(index):
    pure = {}
    assert checked(index, "anywhere==1.0\npuresrc==1.0\n", "aarch64-apple-darwin", pure) == ""
    assert pure == {("puresrc", "1.0"): True}
    assert checked(index, "puresrc==1.0\nnativesrc==1.0\n", "aarch64-manylinux_2_28", pure) \
        == "nativesrc==1.0: only a source archive, and it is not pure Python"
    assert pure == {("puresrc", "1.0"): True, ("nativesrc", "1.0"): False}
