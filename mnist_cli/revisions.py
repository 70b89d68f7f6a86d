"""The pipeline's files as some revision has them, read through DVC: no checkout, no retraining.

A revision is anything DVC's API takes (a commit, branch, tag or experiment name), or None
for the workspace. Files DVC tracks come from the local cache, or from the default remote
when the cache lacks them; files git tracks come from git.
"""

from __future__ import annotations

import contextlib
import functools
import os
import stat
from pathlib import Path

import yaml

from stages.data.npz import load_npz
from stages.runtime.failures import DataError, one_line

WORKSPACE = "workspace"


def label(rev: str | None) -> str:
    return rev if rev else WORKSPACE


# One DVC view per revision for the whole command: opening one reads the repository, its
# config and the revision's index, and a command reads several files of each revision.
@functools.cache
def _filesystem(rev: str | None, repo: str = "."):
    from dvc.api import DVCFileSystem
    from dvc.exceptions import DvcException
    from dvc.scm import SCMError

    if rev is not None:
        _resolve(rev, repo)
    try:
        return DVCFileSystem(repo, rev=rev, config=_remotes(repo))
    except (DvcException, SCMError) as err:
        raise DataError(f"{label(rev)}: {_reason(err)}") from None


def _resolve(rev: str, repo: str) -> str:
    """The commit `rev` names (a commit, branch, tag or experiment name), or one line: the
    file system above would only find every file missing there."""
    from dvc.repo import Repo
    from dvc.scm import RevError, SCMError, resolve_rev

    with Repo(repo) as here:
        try:
            return resolve_rev(here.scm, rev)
        except (RevError, SCMError):
            raise DataError(f"{rev}: no commit, branch, tag or experiment of that name "
                            "(`dvc exp list` names the experiments)") from None


@functools.cache
def _remotes(repo: str) -> dict | None:
    """The workspace's remotes (.dvc/config and config.local), for reading other revisions:
    an older commit may predate the remote, or name one that moved."""
    from dvc.repo import Repo

    with Repo(repo) as here:
        config = here.config
        remotes = {name: dict(options) for name, options in config["remote"].items()}
        default = config["core"].get("remote")
    if not remotes:
        return None
    return {"remote": remotes, **({"core": {"remote": default}} if default else {})}


def _reason(err: Exception) -> str:
    return one_line(err) or type(err).__name__


def _tracked(path: str, rev: str, repo: str):
    """DVC's view of `rev`, once it is known to hold `path` (in git or as a DVC output)."""
    fs = _filesystem(rev, repo)
    try:
        found = fs.exists(path)
    except Exception:  # noqa: BLE001 - listed in the index; whether its data is here is next
        found = True
    if not found:
        raise DataError(f"{path}: not in {rev} (neither in git nor as a DVC output there)")
    return fs


@contextlib.contextmanager
def _missing_data(path: str, rev: str):
    """A DVC output whose data neither the cache nor the remote holds: one line."""
    from dvc.exceptions import DvcException
    from dvc_data.index.index import DataIndexDirError

    try:
        yield
    except (FileNotFoundError, DataIndexDirError):
        raise DataError(f"{path} at {rev}: its data is in neither the DVC cache nor the "
                        "remote (`dvc push` where that revision was made, or `dvc repro` "
                        "there)") from None
    except (DvcException, OSError) as err:
        raise DataError(f"{path} at {rev}: {_reason(err)}") from None


# The most a command reads of one text file of a revision (params, dvc.yaml and dvc.lock,
# metrics, the misclassified table: the largest, for MNIST's 10,000 test images, is far
# smaller), and of a model folder it fetches: what another revision holds is untrusted.
TEXT_CAP = 16 << 20
FOLDER_CAP = 64 << 20


def read_bytes(path: str, rev: str | None, repo: str = ".", cap: int = TEXT_CAP) -> bytes:
    """The bytes of `path` (relative to the repository's root) at `rev`; one line if it
    holds more than `cap`, read no further."""
    if rev is None:  # the workspace: the file as it is on disk, whoever tracks it
        try:
            if not stat.S_ISREG(os.stat(Path(repo) / path).st_mode):  # a FIFO would block
                raise DataError(f"{path}: not a regular file in the {WORKSPACE}")
            with open(Path(repo) / path, "rb") as f:
                data = f.read(cap + 1)
        except OSError as err:
            raise DataError(f"{path}: {err.strerror or err} in the {WORKSPACE}") from None
    else:
        fs = _tracked(path, rev, repo)
        with _missing_data(path, rev), fs.open(path, "rb") as f:
            data = f.read(cap + 1)
    if len(data) > cap:
        raise DataError(f"{path} at {label(rev)}: more than {cap:,} bytes; refused unread")
    return data


def fetch(path: str, rev: str, dest: Path, repo: str = ".", cap: int = FOLDER_CAP) -> Path:
    """Copy the file or folder `path` as `rev` has it to dest (which must not exist), once
    its size (from DVC's index, before any byte is copied) is found within `cap`."""
    fs = _tracked(path, rev, repo)
    with _missing_data(path, rev):
        size = fs.du(path, total=True)
        if size > cap:
            raise DataError(f"{path} at {rev}: {size:,} bytes; a model folder of this "
                            f"project holds at most {cap:,}")
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        fs.get(path, str(dest), recursive=fs.isdir(path))
    return dest


def read_yaml(path: str, rev: str | None, repo: str = ".") -> dict:
    try:
        data = yaml.safe_load(read_bytes(path, rev, repo))
    except (yaml.YAMLError, RecursionError) as err:  # RecursionError: nested past the stack
        raise DataError(f"{path} at {label(rev)}: not valid YAML ({_reason(err)})") from None
    return data if isinstance(data, dict) else {}


def read_npz(path: str, rev: str | None, keys: tuple[str, ...], scratch: Path,
             only: tuple[str, ...] | None = None, repo: str = ".") -> dict:
    """The arrays of the npz at `path` in `rev` (which must hold exactly `keys`; `only`
    some are read), by stages/data/npz.py: no pickles, size caps. Another revision's copy is
    fetched into the folder `scratch` first."""
    if rev is None:
        return load_npz(Path(repo) / path, keys, only)
    dest = Path(scratch) / label(rev).replace("/", "_") / path
    if not dest.exists():
        fetch(path, rev, dest, repo)
    return load_npz(dest, keys, only)


def classes(rev: str | None, repo: str = ".") -> list[str]:
    """`dataset.classes` of params.yaml at `rev`: the names the reports give the labels."""
    section = read_yaml("params.yaml", rev, repo).get("dataset") or {}
    names = section.get("classes")
    if not (isinstance(names, list) and len(names) == 10):
        raise DataError(f"params.yaml at {label(rev)}: dataset.classes must list 10 names")
    return [str(name) for name in names]
