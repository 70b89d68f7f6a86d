"""`make test-pythons`: the project on every supported Python this machine has.

For each Python from pyproject.toml's range found here (`python3.X` on PATH, or a version
pyenv installed): a venv of its own, built from the locks as `make torch` builds .venv
(timed, from an empty folder); the fixture pipeline through a real `dvc repro`, trained by
each framework; then the not-slow suite. Prints one Markdown row per Python and whether its
outputs are the same bytes as the first Python's, and keeps the details in
build/pythons/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "build" / "pythons"
# The trainings each Python runs: the default cnn in each framework, on the fixture.
FRAMEWORKS = ("keras", "torch", "c")
STEP_TIMEOUT = 3600  # seconds for one venv build or one suite run: a bound, not an estimate


def supported() -> list[str]:
    """Every 3.x that pyproject.toml's requires-python (">=3.A,<3.B") admits, oldest first."""
    text = (ROOT / "pyproject.toml").read_text()
    low, high = (int(n) for n in re.search(r'requires-python = ">=3\.(\d+),<3\.(\d+)"',
                                             text).groups())
    return [f"3.{minor}" for minor in range(low, high)]


def runs(python: str, version: str) -> bool:
    try:
        proc = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                              capture_output=True, text=True, timeout=60)
    except OSError:
        return False
    return proc.returncode == 0 and proc.stdout.strip() == version


def interpreter(version: str) -> str | None:
    """python3.X on PATH if it runs, else pyenv's newest 3.X.*, else None."""
    on_path = shutil.which(f"python{version}")
    if on_path and runs(on_path, version):
        return on_path
    pyenv = shutil.which("pyenv")
    if pyenv:
        root = subprocess.run([pyenv, "root"], capture_output=True, text=True).stdout.strip()
        found = sorted(Path(root, "versions").glob(f"{version}.*/bin/python{version}"),
                       key=lambda p: [int(n) for n in p.parts[-3].split(".") if n.isdigit()])
        if found and runs(str(found[-1]), version):
            return str(found[-1])
    return None


def step(args: list[str], env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
    start = time.monotonic()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env,
                          timeout=STEP_TIMEOUT, stdin=subprocess.DEVNULL)
    return time.monotonic() - start, proc


def fixture_pipeline(out: Path) -> None:
    """In the venv under test: the fixture project through `dvc repro`, once per framework;
    every output file's sha256 and the test accuracy, by framework, into out (JSON)."""
    from tests.projects import dvc, make_project, out_hashes, set_params

    results = {}
    with tempfile.TemporaryDirectory(prefix="mnist-pythons-") as tmp:
        for framework in FRAMEWORKS:
            repo = make_project(Path(tmp) / framework)
            set_params(repo, train={"framework": framework})
            start = time.monotonic()
            dvc(repo, "repro")
            metrics = json.loads((repo / "reports" / "metrics.json").read_text())
            results[framework] = {"seconds": round(time.monotonic() - start, 1),
                                  "accuracy": metrics["accuracy"], "hashes": out_hashes(repo)}
    out.write_text(json.dumps(results, indent=1))


def one_python(version: str, python: str) -> dict:
    venv = ROOT / f".venv-{version}"
    shutil.rmtree(venv, ignore_errors=True)  # the build is timed from nothing
    print(f"Python {version} ({python}): building {venv.name}", flush=True)
    seconds, proc = step(["make", "--no-print-directory", f"VENV={venv.name}",
                          f"PYTHON={python}", "torch"])
    row = {"python": version, "interpreter": python, "venv_seconds": round(seconds)}
    if proc.returncode:
        return row | {"failed": "venv: " + (proc.stderr or proc.stdout).strip()[-2000:]}
    env = os.environ | {"PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("VIRTUAL_ENV", None)
    results = OUT / f"fixture-{version}.json"
    print(f"Python {version}: the fixture pipeline ({', '.join(FRAMEWORKS)})", flush=True)
    seconds, proc = step([str(venv / "bin" / "python"), "-m", "tools.pythons", "--fixture",
                          str(results)], env)
    row["pipeline_seconds"] = round(seconds)
    if proc.returncode:
        return row | {"failed": "pipeline: " + proc.stderr.strip()[-2000:]}
    row["pipeline"] = json.loads(results.read_text())
    print(f"Python {version}: pytest -m 'not slow'", flush=True)
    seconds, proc = step([str(venv / "bin" / "python"), "-m", "pytest", "-m", "not slow",
                          "-q", "-p", "no:cacheprovider"], env)
    # pytest's closing line, or how the run ended without one (a crash: "exit -11").
    closing = [line for line in proc.stdout.splitlines() if re.search(r"\d+ (passed|failed)",
                                                                     line)]
    summary = closing[-1].strip("= ") if closing else f"exit {proc.returncode}"
    row |= {"suite_seconds": round(seconds), "suite": summary}
    if proc.returncode:
        row["failed"] = f"suite: {summary}\n{(proc.stdout + proc.stderr)[-3000:]}"
    return row


def same_bits(row: dict, first: dict) -> str:
    """For each framework, the outputs that are not byte for byte the first Python's."""
    if "pipeline" not in row or "pipeline" not in first:
        return "-"
    out = []
    for fw in FRAMEWORKS:
        ours, theirs = row["pipeline"][fw]["hashes"], first["pipeline"][fw]["hashes"]
        differ = sorted(path for path in ours.keys() | theirs.keys()
                        if ours.get(path) != theirs.get(path))
        out.append(f"{fw}: " + (f"all {len(ours)} files the same" if not differ else
                                f"{len(differ)} of {len(ours)} differ ({', '.join(differ[:3])}"
                                f"{', ...' if len(differ) > 3 else ''})"))
    return "; ".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixture", type=Path, help=argparse.SUPPRESS)  # run inside a venv
    args = parser.parse_args()
    if args.fixture:
        return fixture_pipeline(args.fixture)
    OUT.mkdir(parents=True, exist_ok=True)
    found = {v: interpreter(v) for v in supported()}
    for version, python in found.items():
        if python is None:
            print(f"Python {version}: not on this machine (neither python{version} on PATH "
                  f"nor under pyenv)", flush=True)
    rows = [one_python(v, p) for v, p in found.items() if p]
    (OUT / "results.json").write_text(json.dumps(rows, indent=1))
    print("\n| Python | venv built | fixture pipeline (Keras, PyTorch, C) | test accuracy "
          f"| not-slow suite | outputs unlike {rows[0]['python']}'s |\n|---|---|---|---|---|---|")
    for row in rows:
        pipe = row.get("pipeline", {})
        print(f"| {row['python']} | {row['venv_seconds']} s "
              f"| {row.get('pipeline_seconds', '-')} s "
              f"| {', '.join(str(pipe[fw]['accuracy']) for fw in pipe) or '-'} "
              f"| {row.get('suite', '-')} in {row.get('suite_seconds', '-')} s "
              f"| {same_bits(row, rows[0])} |")
    failed = [row for row in rows if "failed" in row]
    for row in failed:
        print(f"error: Python {row['python']}: {row['failed']}", file=sys.stderr)
    return len(failed)


if __name__ == "__main__":
    sys.exit(main())
