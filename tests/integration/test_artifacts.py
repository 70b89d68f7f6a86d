"""The trained model as a registry artifact: found by version, fetched by another machine.

dvc.yaml declares `mnist-classifier` (the model folder, type model, labels from params).
A copy of the session's trained project pushes its results to a local-directory default
remote named in its committed .dvc/config, and registers version v1.0.0 with the real
`gto register` (an annotated git tag `mnist-classifier@v1.0.0`). A bare `git clone` of it,
origin.git, is what another machine sees: git history, tags and the remote's address, no
DVC cache. From origin.git, `dvc.api.artifacts_show` finds the tagged commit and the
model's path, and `dvc artifacts get`, run outside any DVC project, downloads the model
byte for byte from the remote without running a stage. An unknown version is refused by
name.

The remote's url is absolute on purpose: DVC reads a bare or remote git URL from a
temporary clone of its own, against which a relative url (like the project's
../../mnist-dvc-storage) would resolve; there `--remote-config url=...` is needed.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from dvc.api import artifacts_show
from dvc.repo import Repo

from testbed.processes import sh
from tests.projects import copy_project, dvc, set_params

pytestmark = pytest.mark.slow

NAME = "mnist-classifier"
VERSION = "v1.0.0"
TAG = f"{NAME}@{VERSION}"
GTO = Path(sys.executable).parent / "gto"


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder, by path relative to it."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def registry(trained_project, tmp_path_factory):
    """A project with its results pushed and v1.0.0 registered, and its bare clone."""
    root = tmp_path_factory.mktemp("registry")
    a = copy_project(trained_project.repo, root / "A")
    storage = root / "storage"
    dvc(a, "remote", "add", "--default", "storage", str(storage))
    sh(a, "git", "commit", "-qam", "default remote: a local directory")
    assert " files pushed" in dvc(a, "push").stdout
    registered = sh(a, str(GTO), "register", NAME, "--version", VERSION)
    assert f"Created git tag '{TAG}'" in registered.stdout, registered.stdout
    assert sh(a, "git", "cat-file", "-t", TAG).stdout.strip() == "tag"  # annotated
    sha = sh(a, "git", "rev-parse", f"{TAG}^{{commit}}").stdout.strip()
    assert sha == sh(a, "git", "rev-parse", "HEAD").stdout.strip()
    origin = root / "origin.git"
    sh(root, "git", "clone", "-q", "--bare", str(a), str(origin))
    model = file_hashes(trained_project.repo / "data" / "model")
    assert model  # the trained model's files, the bytes every download must match
    return SimpleNamespace(origin=origin, sha=sha, storage=storage, model=model)


def get(registry, cwd: Path, *args, check: bool = True):
    return dvc(cwd, "artifacts", "get", str(registry.origin), NAME, *args, check=check)


@pytest.mark.parametrize("version", [None, VERSION])
def test_artifacts_show_finds_the_tagged_commit_and_model_path(registry, version):
    shown = artifacts_show(NAME, version=version, repo=str(registry.origin))
    assert shown == {"rev": registry.sha, "path": "data/model"}


@pytest.mark.parametrize("rev", [[], ["--rev", VERSION]], ids=["latest", VERSION])
def test_get_downloads_the_model_from_the_remote_without_running_a_stage(
        registry, tmp_path, rev):
    got = get(registry, tmp_path, *rev, "-o", "model")
    assert file_hashes(tmp_path / "model") == registry.model
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no data/, no .dvc/
    assert "Running stage" not in got.stdout + got.stderr
    assert got.stdout.strip() == f"Downloaded {len(registry.model)} file(s) to 'model'"


def test_get_reads_the_dvc_remote_not_the_source_cache(registry, tmp_path):
    away = registry.storage.with_name("storage-away")
    registry.storage.rename(away)
    try:
        failed = get(registry, tmp_path, "-o", "model", check=False)
    finally:
        away.rename(registry.storage)
    assert failed.returncode != 0
    assert f"No such file or directory: '{registry.storage}/files/md5/" in failed.stderr
    assert not (tmp_path / "model").exists()


def test_declared_artifact_has_type_and_labels_from_params(trained_copy):
    def declared():
        with Repo(trained_copy) as repo:
            return repo.artifacts.read()["dvc.yaml"][NAME]

    train = yaml.safe_load((trained_copy / "params.yaml").read_text())["train"]
    artifact = declared()
    assert (artifact.path, artifact.type) == ("data/model", "model")
    assert artifact.labels == [train["framework"], train["model"], "mnist"]
    set_params(trained_copy, train={"framework": "c", "model": "mlp"})
    artifact = declared()  # read again: templated from params, no repro
    assert artifact.labels == ["c", "mlp", "mnist"]
    assert "(mlp, trained by c)" in artifact.desc


def test_unknown_version_is_refused_by_name(registry, tmp_path):
    failed = get(registry, tmp_path, "--rev", "v9.9.9", "-o", "model", check=False)
    assert failed.returncode != 0
    # DVC first tries Studio ("ERROR: Failed to download artifact 'mnist-classifier' via
    # Studio - No studio config"), then the git tags; the last line is the real reason.
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("ERROR: failed to get 'mnist-classifier'"), failed.stderr
    assert last.endswith("Unable to find artifact 'mnist-classifier @ v9.9.9'"), last
    assert not (tmp_path / "model").exists()
