"""Two hosts with a network between them: the object store and data-parallel training
across a link (as root, minutes).

The test hosts of testbed/hosts.py (network namespaces joined by a veth pair) on
full MNIST:

1. The object store: a project through normalize on host A pushes its outputs to SeaweedFS
   on A (`make object-store`, bound to A's address); a clone on host B pulls them across
   the link. Seconds and bytes of each, and the MB/s.
2. Data-parallel training: the mlp in PyTorch (`--epochs` of its recipe, default 3) trained
   by the train stage's command by one worker on A, by two workers on A, and by one worker
   on each host (the documented two-machine commands): images/s of each. Both hosts share
   this machine's cores, so the two-host run measures what the link and the all-reduce
   across it cost, not what a second machine would add.

    python -m benchmarks.hosts [--data PATH] [--epochs N]     (as root)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

from benchmarks.common import (
    argument_parser,
    check_data,
    header,
    train_seconds,
    trained_images,
)
from testbed.hosts import Hosts, clone_on
from testbed.objectstore import ObjectStore
from testbed.pipeline import copy_pipeline, stage_command
from testbed.processes import run_env, sh

PORT = 29500


def params_for(repo: Path, data: Path, epochs: int, workers: int) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["download"].update(url=str(data.resolve()), sha256=None, format="npz", mirrors=[])
    params["train"].update(framework="torch", model="mlp")
    params["train"]["mlp"]["epochs"] = epochs
    params["train"]["torch"]["workers"] = workers
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e6


def on(host, repo: Path, args: list[str], env: dict) -> subprocess.CompletedProcess:
    proc = host.run(args, cwd=repo, env=env, timeout=3600)
    if proc.returncode:
        sys.exit(f"benchmark step failed on {host}: {' '.join(args)}\n{proc.stderr[-3000:]}")
    return proc


def transfer(a, b, store: ObjectStore, root: Path, data: Path) -> dict:
    env = store.env(run_env())
    repo = copy_pipeline(root / "A")
    sh(repo, "git", "init", "-q", "-b", "main")
    dvc = [sys.executable, "-m", "dvc"]
    on(a, repo, dvc + ["init", "-q"], env)
    params_for(repo, data, 1, 1)
    on(a, repo, dvc + ["repro", "normalize"], env)
    on(a, repo, dvc + ["remote", "add", "-d", "team", "s3://mnist/bench"], env)
    on(a, repo, dvc + ["remote", "modify", "team", "endpointurl", store.endpoint], env)
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "normalized")
    started = time.perf_counter()
    on(a, repo, dvc + ["push"], env)
    pushed = time.perf_counter() - started
    size = megabytes(repo / ".dvc" / "cache")
    other = clone_on(b, repo, root / "B", run_env())
    started = time.perf_counter()
    on(b, other, dvc + ["pull", "download", "normalize"], env)
    pulled = time.perf_counter() - started
    size_b = megabytes(root / "B-cache")
    return {"pushed_megabytes": round(size, 1), "push_seconds": round(pushed, 2),
            "push_mb_per_s": round(size / pushed, 1), "pulled_megabytes": round(size_b, 1),
            "pull_seconds": round(pulled, 2), "pull_mb_per_s": round(size_b / pulled, 1),
            "files": sum(1 for p in (repo / ".dvc" / "cache").rglob("*") if p.is_file())}


def train(a, b, repo_a: Path, repo_b: Path, data: Path, epochs: int, layout: str) -> dict:
    """One training of the train stage's command: 'one host, 1 worker', 'one host, 2
    workers' or 'two hosts, 1 worker each'."""
    workers = 1 if layout.endswith("1 worker") else 2
    for repo in (repo_a, repo_b):
        params_for(repo, data, epochs, workers)
    command = stage_command("train")
    env = run_env()
    if layout.startswith("two hosts"):
        node_0 = env | {"MNIST_NODES": "2", "MNIST_MASTER_ADDR": a.address,
                        "MNIST_MASTER_PORT": str(PORT)}
        stage = a.popen(command, cwd=repo_a, env=node_0, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE, text=True)
        join = b.popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                        "--node-rank", "1", "--nproc-per-node", "1", "--master-addr",
                        a.address, "--master-port", str(PORT), *command[1:]],
                       cwd=repo_b, env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
        out, err = stage.communicate(timeout=3600)
        if stage.returncode or join.wait(timeout=600):
            sys.exit(f"two-host training failed:\n{err[-3000:]}\n{join.stderr.read()[-3000:]}")
    else:
        out = on(a, repo_a, command, env).stdout
    seconds = train_seconds(out)
    images = trained_images(out) * epochs
    return {"layout": layout, "train_seconds": round(seconds, 1),
            "images_per_s": round(images / seconds)}


def run(data: Path, epochs: int) -> dict:
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="mnist-hosts-"))
    with Hosts("bn") as (a, b), ObjectStore(root / "store", a) as store:
        result = {"object_store": transfer(a, b, store, root, data)}
        repo_a, repo_b = root / "A", root / "B"
        layouts = ("one host, 1 worker", "one host, 2 workers", "two hosts, 1 worker each")
        result["training"] = [train(a, b, repo_a, repo_b, data, epochs, layout)
                              for layout in layouts * 2]  # twice each, alternating
    single = [r["images_per_s"] for r in result["training"] if r["layout"] == layouts[0]]
    for r in result["training"]:
        r["vs_one_worker"] = round(r["images_per_s"] / max(single), 2)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argument_parser("benchmarks.hosts", __doc__)
    parser.add_argument("--epochs", type=int, default=3,
                        help="epochs of the mlp's recipe for each training (default: 3)")
    args = parser.parse_args(argv)
    check_data(args.data)
    header()
    print(f"\ntwo test hosts (benchmarks/hosts.py): the object store, and the mlp in "
          f"PyTorch for {args.epochs} epochs on one host and across both")
    print(json.dumps(run(args.data, args.epochs), indent=2))


if __name__ == "__main__":
    main()
