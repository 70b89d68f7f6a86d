"""The documentation runs: every fenced block of README.md and docs/*.md is run here, for
real, on the fixture project, or says in its first line that it is an excerpt.

- A block whose first line starts with `# excerpt` (`# excerpt: needs a second machine`) is
  not run; the marker is what a reader sees. Every other block is claimed by a test below
  (`@claims(page, text)`: a piece of the block's text found in that one block of the page),
  and test_every_block_is_run_or_marked_as_an_excerpt fails for a block that is neither, so
  a new block without a test fails the suite.
- Shell blocks run in bash in a copy of the trained fixture project (tests/conftest.py),
  the venv's bin first on PATH; Python blocks run with `python -c` in it, then a few
  asserts of the test's own on the names the snippet defines.
- A block of `$ command` lines, each followed by the output the page shows, runs the
  commands in one bash, in order, and compares each command's real output (stdout and
  stderr together) with the one shown: every number is a wildcard, runs of whitespace are
  one space, blank lines do not count, and a `...` line stands for any lines. So the check
  fails when a line, word, flag or column changes, not when a number does on the fixture's
  small model.
- Where a block cannot run as written, the test says what it does instead: `make repro` and
  `make test` (which CI itself runs) are checked by `make -n`; the registry's example git
  host is replaced by a local bare repository.

The pages' tables that name code, params or outputs are checked against what is there:
the README's layout map and stage table, docs/params.md's keys and defaults, the outputs
docs/outputs.md lists, the functions of docs/frameworks.md's concept table, and every
relative link and code path named in the pages.

Each page's trained state is shared: one copy of the trained project in which the README's
one-`-S` block ran (conftest.py's `switched`) feeds the pages after it, whose runs of the
same params come back from DVC's run-cache instead of training.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from testbed.pipeline import paths as dvc_vars
from testbed.processes import run_env, sh
from tests.docs import (
    CLAIMING_MODULES,
    CLAIMS,
    EXCERPT,
    PAGES,
    Block,
    bash,
    block,
    blocks,
    claims,
    prose,
    run_python,
    run_session,
    run_sh,
)
from tests.hostile import png_bomb
from tests.paths import ROOT
from tests.projects import copy_project, dvc, make_files, set_params, stop_queue
from tools.pythons import interpreter

PATHS = dvc_vars()
# The offline copy these project machines keep beside the checkout (docs/offline.md).
SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist.npz"


def at_head(src: Path, dest: Path) -> Path:
    """A copy of a project with its workspace reset to HEAD: params, dvc.lock, outputs."""
    repo = copy_project(src, dest)
    sh(repo, "git", "reset", "-q", "--hard")
    dvc(repo, "checkout", "--force", "-q")
    return repo


def with_examples(repo: Path) -> Path:
    """A checkout has examples/ beside the pipeline; the fixture project does not."""
    repo.mkdir(parents=True, exist_ok=True)
    shutil.copytree(ROOT / "examples", repo / "examples")
    return repo


def make_plan(target: str) -> str:
    """What `make TARGET` would run, from scratch (-B: as if nothing were built yet)."""
    return sh(ROOT, "make", "-n", "-B", target).stdout


def table(page: str, heading: str) -> list[list[str]]:
    """The rows (header first, cells stripped) of the first table after a heading."""
    lines = prose(page).splitlines()
    start = next(i for i, line in enumerate(lines) if line.lstrip("#").strip() == heading)
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("#"):
            break
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
        elif rows:
            break
    assert rows, f"{page}: no table under {heading!r}"
    return rows


def code(cell: str) -> list[str]:
    """The `code` spans of a markdown cell, link texts included."""
    return re.findall(r"`([^`]+)`", cell)


# --- every block is run or an excerpt; what the pages name exists -------------------------


def test_every_block_is_run_or_marked_as_an_excerpt():
    for module in CLAIMING_MODULES:  # their @claims, when pytest did not collect them
        importlib.import_module(module)
    unclaimed = []
    for page in PAGES:
        for b in blocks(page):
            by = [test for (p, piece), test in CLAIMS.items() if p == page and piece in b.text]
            if b.excerpt:
                assert not by, f"{b} is an excerpt, yet {by} claim it"
                assert b.first.startswith(f"{EXCERPT}:") and len(b.first) > 12, \
                    f"{b}: say why it is an excerpt (`{EXCERPT}: needs ...`)"
            elif not by:
                unclaimed.append(str(b))
    assert not unclaimed, ("blocks neither run by a test here nor marked `# excerpt: why`:\n"
                           + "\n".join(unclaimed))
    for (page, piece), test in CLAIMS.items():
        holding = [b for b in blocks(page) if piece in b.text]
        assert len(holding) == 1, \
            f"{test} claims {piece!r} of {page}: {len(holding)} blocks hold it"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return ({slug(m) for m in re.findall(r"^#+\s+(.*)$", text, re.M)}
            | set(re.findall(r'<a id="([^"]+)"', text)))


def test_links_and_code_paths_of_the_pages_exist():
    broken = []
    for page in PAGES:
        here = (ROOT / page).parent
        for target in re.findall(r"\]\(([^)\s]+)\)", prose(page)):
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (here / path).resolve() if path else ROOT / page
            if not resolved.exists():
                broken.append(f"{page}: link {target}: no such file")
            elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
                broken.append(f"{page}: link {target}: no such heading")
        # Code paths named in the prose: `stages/frameworks/keras/fit.py` and the like
        # (placeholders such as `stages/frameworks/F/` aside).
        for span in re.findall(r"`([^`\s]+)`", prose(page)):
            if re.match(r"^(stages|mnist_cli|benchmarks|tests|docs|examples)/[\w./-]*$", span) \
                    and not any(re.fullmatch(r"[A-Z]", part) for part in span.split("/")):
                if not (ROOT / span.rstrip("/")).exists():
                    broken.append(f"{page}: `{span}`: no such path")
    assert not broken, "\n".join(broken)


def test_params_named_in_the_pages_are_params():
    """Every `section.key...` the prose names is a key of params.yaml (renamed keys such
    as a bare `train.workers` fail here)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    files = r"\.(py|c|md|yaml|json|csv|npz|bmp|png|html|keras|bin|lock|idx|safetensors|tsv)$"
    wrong = []
    for page in PAGES:
        for span in re.findall(r"`([^`]+)`", prose(page)):
            name = re.split(r"[\s:=]", span.removeprefix("-S ").strip())[0]
            section = name.split(".")[0]
            if section not in params or "." not in name or re.search(files, name) \
                    or re.search(r"[<>${}/*]", name):
                continue
            node = params
            for part in name.split("."):
                if re.fullmatch(r"[A-Z]", part):  # a placeholder: `train.F`
                    break
                if not isinstance(node, dict) or part not in node:
                    wrong.append(f"{page}: `{span}`")
                    break
                node = node[part]
    assert not wrong, "not in params.yaml:\n" + "\n".join(wrong)


# --- README.md ------------------------------------------------------------------------------


TORCH = "make torch   # PyTorch and safetensors"


def commands(b: Block) -> list[str]:
    """A shell block's command lines, comments dropped."""
    return [line.split("#")[0].strip() for line in b.text.splitlines()
            if line.split("#")[0].strip()]


@pytest.mark.slow
@claims(("README.md", "make repro"), ("docs/frameworks.md", TORCH))
def test_make_commands_plan_what_the_pages_say():
    """`make repro` and `make test` are CI's own commands (.ci/run runs `make test` in a
    fresh clone), far too long to run in here: what they would run is checked instead."""
    assert commands(block("README.md", "make repro")) == ["make repro", "make test"]
    assert commands(block("docs/frameworks.md", TORCH)) == ["make torch"]
    repro = make_plan("repro")
    assert "-r requirements.lock" in repro and "dvc repro" in repro
    assert "requirements-torch.lock" not in repro  # PyTorch is not part of make repro
    test = make_plan("test")
    assert "-r requirements-torch.lock" in test and "python -m pytest" in test
    assert "make test" in (ROOT / ".ci" / "run").read_text().splitlines()
    torch = make_plan("torch")
    assert "-r requirements-torch.lock" in torch and "dvc" not in torch


@pytest.mark.slow
@claims(("README.md", "$ dvc dag"))
def test_dvc_dag(trained_project):
    run_session(block("README.md", "$ dvc dag"), trained_project.repo)


def test_readme_stage_table_is_dvc_yaml():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    rows = table("README.md", "The pipeline")
    assert rows[0] == ["stage", "module", "params", "writes"]
    assert [row[0] for row in rows[1:]] == list(spec["stages"])
    for name, module, params, writes in rows[1:]:
        stage = spec["stages"][name]
        assert stage["cmd"].startswith(f"python -m {code(module)[0][:-3].replace('/', '.')} ")
        listed = {p.replace("<framework>", "${train.framework}")
                  .replace("<model>", "${train.model}")
                  .replace("<audit framework>", "${audit.framework}")
                  .replace("<audit model>", "${audit.model}") for p in code(params)}
        assert listed == set(stage["params"]), name
        outs = {o.rstrip("/") for o in code(writes)}
        real = {re.sub(r"\$\{(\w+)\}", lambda m: PATHS[m.group(1)], o)
                for o in stage.get("outs", []) + stage.get("metrics", [])}
        for out in real:  # every output listed, by its path or a pattern that covers it
            assert any(out == o or Path(out).match(o) for o in outs), f"{name}: {out} not listed"
        for o in outs:
            assert any(out == o or Path(out).match(o) for out in real), f"{name}: {o} is no out"


@claims(("README.md", "mnist_cli/"))
def test_readme_code_map_names_what_is_there():
    """Each line of the map: names (folders end in /) under the folder of the line above
    it at a lesser indent, then what it holds; the files it names there exist. Every
    folder of stages/ and every module of stages/ and mnist_cli/ is on the map."""
    b = block("README.md", "mnist_cli/")
    seen, stack = set(), []  # stack: (indent, folder)
    for line in b.text.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        parts = re.split(r"\s{2,}", line.strip(), maxsplit=1)
        names, holds = parts[0].split(), parts[1] if len(parts) > 1 else ""
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1] if stack else Path()
        for name in names:
            path = parent / name.rstrip("/")
            assert (ROOT / path).exists(), f"README map: {path} does not exist"
            seen.add(path.as_posix())
            if name.endswith("/"):
                stack.append((indent, path))
                where = path
            else:
                where = parent
        for named in re.findall(r"[\w-]+\.(?:py|c|h|md)\b", holds):
            assert (ROOT / where / named).exists(), f"README map: {where / named} does not exist"
            seen.add((where / named).as_posix())
    for package in ("stages", "mnist_cli"):
        for path in sorted((ROOT / package).rglob("*")):
            rel = path.relative_to(ROOT).as_posix()
            if "__pycache__" in rel or path.name == "__init__.py":
                continue
            if path.is_dir() or path.suffix in (".py", ".c", ".h"):
                assert rel in seen, f"README map: {rel} is not on it"


@pytest.mark.slow
@claims(("README.md", "dvc exp show --only-changed"))
def test_one_set_switches_framework_or_model(switched):
    out = switched.output
    assert out.count("Ran experiment(s)") == 4, out
    # Download and normalize never rerun for this; train, evaluate and render-errors do.
    assert "Running stage 'download'" not in out and "Running stage 'normalize'" not in out
    for stage in ("train", "evaluate", "render-errors"):
        assert out.count(f"Running stage '{stage}'") == 4, stage
    for line in ("train: mlp in keras", "train: cnn in torch", "train: mlp in c",
                 "train: cnn in c"):
        assert line in out, line
    info = yaml.safe_load((switched.repo / PATHS["model_dir"] / "run_info.json").read_text())
    assert (info["framework"], info["model"]) == ("c", "mlp")
    table_ = out[out.rindex("Experiment"):]
    for framework in ("keras", "torch", "c"):
        assert f" {framework} " in table_, table_
    # What a user compares, every column in a terminal 160 wide: DVC's pager shows the
    # table's first 160 columns, and without a pager DVC hides what does not fit behind "…".
    header = set(table_.splitlines()[0].split())
    assert {"accuracy", "errors", "label_errors", "ambiguous", "model_errors", "train.framework",
            "train.model", "train.seed", "step"} <= header, header
    assert max(len(line.rstrip()) for line in table_.splitlines()) <= 160, table_


# --- docs/frameworks.md ---------------------------------------------------------------------


def test_the_concept_table_names_real_functions():
    """Each cell of docs/frameworks.md's concept table links files; each `name()` it names
    is defined in one of them, and every other `code` span appears in one of them."""
    rows = table("docs/frameworks.md", "The same concept in each framework")
    assert rows[0] == ["concept", "Keras", "PyTorch", "C"]
    concepts = [row[0] for row in rows[1:]]
    for concept in ("network", "loss", "optimizer step", "augmentation", "batches",
                    "weight average", "save / load"):
        assert concept in concepts
    for row in rows[1:]:
        for cell in row[1:]:
            links = re.findall(r"\[`([^`]+)`\]\(\.\./([^)]+)\)", cell)
            if not links:
                continue
            texts = {path: (ROOT / path).read_text() for _, path in links}
            spans = set(code(re.sub(r"\[`[^`]+`\]\([^)]+\)", "", cell)))
            for span in spans:
                if span.endswith("()"):
                    name = span[:-2]
                    defined = any(
                        re.search(rf"^[^\s#].*\b{name}\(", text, re.M)
                        if path.endswith((".c", ".h"))
                        else re.search(rf"^\s*(def|class) {name}\b", text, re.M)
                        for path, text in texts.items())
                    assert defined, f"{row[0]}: {span} is defined in none of {list(texts)}"
                else:
                    assert any(span in text for text in texts.values()), \
                        f"{row[0]}: `{span}` appears in none of {list(texts)}"


@pytest.mark.slow
@claims(("docs/frameworks.md", "./mnist_mlp train"))
def test_the_c_program_by_hand(trained_project, tmp_path):
    repo = copy_project(trained_project.repo, tmp_path / "project")
    # One epoch each: the commands as written, the programs' default recipes shortened.
    run_sh(block("docs/frameworks.md", "./mnist_mlp train"), repo,
           replace={"--threads 2": "--threads 2 --epochs 1"})
    # The model files' documented sizes, and N x 10 probabilities from each program.
    assert (repo / "model.bin").stat().st_size == 407_104
    assert (repo / "cnn.bin").stat().st_size == 588_484
    assert (repo / "reference.bin").stat().st_size == 407_104  # the reference's: same format
    n_test = len(np.load(repo / PATHS["processed"])["y_test"])
    for name in ("probabilities.idx", "cnn-probabilities.idx"):
        assert (repo / name).stat().st_size == 4 + 2 * 4 + n_test * 10 * 4


# --- docs/params.md -------------------------------------------------------------------------


def test_params_page_has_every_key_and_its_default():
    """Each heading that names sections of params.yaml (`train.torch`) has a table whose
    first column holds exactly their keys, and defaults that are plain values are theirs;
    every section with keys of its own has its heading."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    text = (ROOT / "docs" / "params.md").read_text()
    covered = set()
    for heading in re.findall(r"^#{2,3} (.*)$", text, re.M):
        paths = [p for p in code(heading) if p.split(".")[0] in params]
        if not paths:
            continue
        nodes = {}
        for path in paths:
            node = params
            for part in path.split("."):
                node = node[part]
            nodes[path] = node
            covered.add(path)
        scalars = {path: {k for k, v in node.items() if not isinstance(v, dict)}
                   for path, node in nodes.items()}
        if not any(scalars.values()):
            continue  # train.c: nothing of its own
        rows = table("docs/params.md", heading)
        header, rows = rows[0], rows[1:]
        keys = [code(row[0]) for row in rows]
        for path in paths:
            assert {k for ks in keys for k in ks} == scalars[path], f"{heading}: keys of {path}"
        for c, title in enumerate(header[1:-1], start=1):
            targets = paths if title == "default" else [
                p for p in paths if p.split(".")[-1] in code(title)]
            for row, ks in zip(rows, keys):
                values = code(row[c])
                if re.sub(r"`[^`]*`|[,\s]", "", row[c]) or len(values) != len(ks):
                    continue  # described, not a plain value
                for path in targets:
                    for key, value in zip(ks, values):
                        assert yaml.safe_load(value) == nodes[path][key], \
                            f"{path}.{key}: the page says {value}, params.yaml {nodes[path][key]!r}"
    for path in [*params, *(f"train.{k}" for k, v in params["train"].items()
                            if isinstance(v, dict))]:
        assert path in covered, f"docs/params.md has no heading for `{path}`"


@pytest.mark.slow
@claims(("docs/params.md", "$ dvc params diff"))
def test_switching_model_is_one_line_of_params_diff(switched, tmp_path):
    repo = at_head(switched.repo, tmp_path / "project")
    run = run_session(block("docs/params.md", "$ dvc params diff"), repo)
    # The mlp ran in the README's block: its results come back from the run-cache.
    assert "Stage 'train' is cached - skipping run" in run[0].output, run[0].output


# --- docs/outputs.md ------------------------------------------------------------------------


def test_outputs_page_lists_every_output():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    rows = table("docs/outputs.md", "Outputs")
    listed = {(o.split(" ")[0], row[1]) for row in rows[1:] for o in code(row[0])}
    for name, stage in spec["stages"].items():
        for out in stage.get("outs", []) + stage.get("metrics", []):
            path = re.sub(r"\$\{(\w+)\}", lambda m: PATHS[m.group(1)], out)
            assert any((p == path or p.startswith(path.rstrip("/") + "/")) and s == name
                       for p, s in listed), f"docs/outputs.md does not list {path} ({name})"


@pytest.mark.slow
@claims(("docs/outputs.md", "$ dvc metrics show"))
def test_metrics_show(trained_project):
    run_session(block("docs/outputs.md", "$ dvc metrics show"), trained_project.repo)


ANY = ("docs/outputs.md", "frameworks.predict(")
N_TEST = 8
PROBABILITIES = f"""
assert probabilities.shape == ({N_TEST}, 10) and probabilities.dtype == np.float32
evaluated = np.load("{PATHS['predictions']}")["probabilities"][:{N_TEST}]
assert np.allclose(probabilities, evaluated, atol=1e-5)  # the model evaluate used
"""


@pytest.mark.slow
@claims(("docs/outputs.md", "keras.models.load_model"), ANY)
def test_loading_a_keras_or_c_model_from_python(trained_project, switched):
    run_python(block("docs/outputs.md", "keras.models.load_model"), trained_project.repo,
               check=PROBABILITIES)
    run_python(block(*ANY), switched.repo, check=PROBABILITIES)  # C's (PyTorch's below)


@pytest.mark.slow
@claims(("docs/outputs.md", "torch_model.build"))
def test_loading_a_pytorch_model_from_python(switched, tmp_path):
    repo = at_head(switched.repo, tmp_path / "project")
    set_params(repo, train={"framework": "torch", "model": "cnn"})
    restored = dvc(repo, "repro").stdout
    # The README's block trained it: switching back restores it from the run-cache.
    assert "Stage 'train' is cached - skipping run" in restored, restored
    check = PROBABILITIES.replace("probabilities.shape", "tuple(probabilities.shape)").replace(
        "probabilities.dtype == np.float32", "probabilities.dtype == torch.float32").replace(
        "np.allclose(probabilities,", "np.allclose(probabilities.detach().numpy(),")
    check += "assert torch.allclose(model(images).softmax(1), probabilities)\n"
    run_python(block("docs/outputs.md", "torch_model.build"), repo, check=check)


# --- docs/commands.md -----------------------------------------------------------------------


@pytest.mark.slow
@claims(("docs/commands.md", "$ mnist-predict examples/*"),
        ("docs/commands.md", "shopping-list.png"))
def test_mnist_predict(switched, tmp_path):
    # The workspace's model is C's: read in NumPy, it loads in no time.
    repo = with_examples(copy_project(switched.repo, tmp_path / "project"))
    run_session(block("docs/commands.md", "$ mnist-predict examples/*"), repo)
    (repo / "shopping-list.png").write_text("milk, eggs, flour\n")
    from PIL import Image
    Image.new("L", (640, 480), 255).save(repo / "blank-page.png")
    png_bomb(repo / "bomb.png")
    run = run_session(block("docs/commands.md", "shopping-list.png"), repo)
    assert run[0].rc == 1


@pytest.mark.slow
@claims(("docs/commands.md", "$ mnist-errors-diff"))
def test_mnist_errors_diff(switched, tmp_path):
    repo = at_head(switched.repo, tmp_path / "project")
    run = run_session(block("docs/commands.md", "$ mnist-errors-diff"), repo)
    assert "Stage 'train' is cached - skipping run" in run[0].output  # no training
    assert run[1].rc == 0 and (repo / "reports" / "errors_diff.html").is_file()


# --- docs/sharing.md ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def team(switched, tmp_path_factory):
    """A copy of the switched project (the workspace: C's mlp), with the checkout's own
    .dvc/config (its default remote beside the checkout), in which the page's queue block
    ran: the baseline committed, two more seeds run in the queue."""
    root = tmp_path_factory.mktemp("team")
    repo = copy_project(switched.repo, root / "project")
    shutil.copy(ROOT / ".dvc" / "config", repo / ".dvc" / "config")
    try:
        output = run_sh(block("docs/sharing.md", "dvc exp run --queue"), repo)
    finally:
        stop_queue(repo)
    return SimpleNamespace(root=root, repo=repo, output=output)


@pytest.mark.slow
@claims(("docs/sharing.md", "dvc exp run --queue"))
def test_seeds_in_the_queue(team):
    status = team.output[team.output.rindex("Task"):]
    for seed in (1, 2):
        row = next(line for line in status.splitlines() if f"seed-{seed}" in line)
        assert "Success" in row, status
    assert "Running stage 'download'" not in team.output  # restored from the cache


@pytest.mark.slow
@claims(("docs/sharing.md", "$ mnist-committee HEAD seed-1 seed-2"))
def test_a_committee_of_the_queued_seeds(team, tmp_path):
    repo = copy_project(team.repo, tmp_path / "project")
    run = run_session(block("docs/sharing.md", "$ mnist-committee HEAD seed-1 seed-2"), repo)
    assert run[0].rc == 0
    metrics = json.loads((repo / "reports" / "committee" / "metrics.json").read_text())
    assert [m["revision"] for m in metrics["members"]] == ["HEAD", "seed-1", "seed-2"]
    table = (repo / "reports" / "committee" / "misclassified.csv").read_text().splitlines()
    assert len(table) - 1 == metrics["errors"]


@pytest.mark.slow
@claims(("docs/sharing.md", "dvc metrics diff HEAD~1"))
def test_comparing_runs(team, tmp_path):
    repo = copy_project(team.repo, tmp_path / "project")  # HEAD~1: Keras' cnn; HEAD: C's mlp
    out = run_sh(block("docs/sharing.md", "dvc metrics diff HEAD~1"), repo)
    assert "reports/metrics.json" in out and "accuracy" in out
    assert "train.framework" in out and "train.model" in out
    assert (repo / "plots" / "index.html").is_file()


@pytest.mark.slow
@claims(("docs/sharing.md", "# every output of the workspace to the default"),
        ("docs/sharing.md", "byte-identical"),
        ("docs/sharing.md", "dvc push --run-cache   # the run-cache entries"),
        ("docs/sharing.md", "$ dvc repro --pull"))
def test_results_through_the_default_remote(team):
    repo = team.repo
    run_sh(block("docs/sharing.md", "# every output of the workspace to the default"), repo)
    assert any((team.root / "mnist-dvc-storage").rglob("*")), "nothing in ../mnist-dvc-storage"
    other = team.root / "other"  # another clone beside it: an empty cache
    sh(team.root, "git", "clone", "-q", str(repo), str(other))
    run_sh(block("docs/sharing.md", "byte-identical"), other)
    assert "Data and pipelines are up to date." in dvc(other, "status").stdout
    for path in (PATHS["model_dir"] + "/run_info.json", PATHS["predictions"]):
        assert (other / path).read_bytes() == (repo / path).read_bytes()

    # Params nobody committed: seed 1 (run in the queue, so no training here), pushed with
    # the run-cache; the other clone sets the same params and gets its outputs.
    dvc(repo, "exp", "run", "-S", "train.seed=1")
    run_sh(block("docs/sharing.md", "dvc push --run-cache   # the run-cache entries"), repo)
    set_params(other, train={"seed": 1})
    run_session(block("docs/sharing.md", "$ dvc repro --pull"), other)
    for path in (PATHS["model_dir"] + "/model.bin", PATHS["predictions"]):
        assert (other / path).read_bytes() == (repo / path).read_bytes()


@pytest.mark.slow
@claims(("docs/sharing.md", "dvc remote add team"))
def test_remote_settings(team, tmp_path):
    repo = copy_project(team.repo, tmp_path / "project")
    run_sh(block("docs/sharing.md", "dvc remote add team"), repo)
    local = (repo / ".dvc" / "config.local").read_text()
    for setting in ("url = /mnt/team/mnist-dvc-storage", "user = alice", "port = 2222",
                    "remote = team", "keyfile = "):
        assert setting in local, local
    assert "ssh://storage.example.com/srv/dvc/mnist" in (repo / ".dvc" / "config").read_text()


@pytest.mark.slow
@claims(("docs/sharing.md", "gto register"), ("docs/sharing.md", "$ dvc artifacts get"))
def test_the_model_registry(team, tmp_path):
    """The page's git host is replaced by a local bare repository; the remote is a shared
    disk every machine reaches by one (absolute) address, as the page asks."""
    repo = copy_project(team.repo, tmp_path / "project")
    storage = tmp_path / "storage"
    dvc(repo, "remote", "modify", "storage", "url", str(storage))
    sh(repo, "git", "commit", "-qam", "the remote: a shared disk")
    origin = tmp_path / "mnist.git"
    sh(tmp_path, "git", "init", "-q", "--bare", "-b", "main", str(origin))
    sh(repo, "git", "remote", "add", "origin", str(origin))
    run_sh(block("docs/sharing.md", "gto register"), repo)
    elsewhere = with_examples(tmp_path / "elsewhere")  # no project here: only the images
    run_session(block("docs/sharing.md", "$ dvc artifacts get"), elsewhere,
                replace={"https://git.example.com/mnist.git": str(origin)})
    assert (elsewhere / "model" / "model.bin").read_bytes() == \
        (repo / PATHS["model_dir"] / "model.bin").read_bytes()


# --- docs/machines.md -----------------------------------------------------------------------


@pytest.mark.slow
@claims(("docs/machines.md", "train.torch.workers=2"))
def test_two_workers_on_one_machine(switched, tmp_path):
    repo = copy_project(switched.repo, tmp_path / "project")  # the workspace: the mlp
    out = run_sh(block("docs/machines.md", "train.torch.workers=2"), repo)
    assert "on 2 workers" in out, out
    info = yaml.safe_load((repo / PATHS["model_dir"] / "run_info.json").read_text())
    assert (info["framework"], info["workers"]) == ("torch", 2)


# --- docs/offline.md ------------------------------------------------------------------------


@pytest.mark.slow
@claims(("docs/offline.md", "mirrors: []"))
def test_the_local_copy(trained_project, tmp_path):
    from stages.runtime import params

    repo = copy_project(trained_project.repo, tmp_path / "project")
    set_params(repo, **yaml.safe_load(block("docs/offline.md", "mirrors: []").text))
    params.load(repo / "params.yaml")  # the whole file still passes every stage's check
    if not SHARED_MNIST.is_file():
        # A machine without the copy: the one source named fails in one line, nothing written.
        raw = repo / PATHS["raw"]
        before = raw.read_bytes() if raw.exists() else None
        failed = dvc(repo, "repro", "download", check=False)
        assert failed.returncode != 0
        assert "../shared/data/mnist.npz" in failed.stderr, failed.stderr
        # DVC removed the stage's output before running it; its cache still holds it.
        dvc(repo, "checkout", "download")
        assert (raw.read_bytes() if raw.exists() else None) == before
        return
    (tmp_path / "shared").symlink_to(SHARED_MNIST.parent.parent)
    dvc(repo, "repro", "download")
    with np.load(repo / PATHS["raw"]) as raw:
        assert raw["x_train"].shape == (60_000, 28, 28) and raw["x_test"].shape[0] == 10_000


# --- docs/troubleshooting.md ----------------------------------------------------------------


@pytest.mark.slow
@claims(("docs/troubleshooting.md", "did you mean 'epochs'"))
def test_a_typo_in_params(trained_project, tmp_path):
    repo = copy_project(trained_project.repo, tmp_path / "project")
    spec = yaml.safe_load((repo / "params.yaml").read_text())
    spec["train"]["cnn"]["epoch"] = spec["train"]["cnn"].pop("epochs")
    (repo / "params.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    run = run_session(block("docs/troubleshooting.md", "did you mean 'epochs'"), repo)
    assert run[0].rc != 0


# --- docs/platforms.md ----------------------------------------------------------------------


def python_on_path(tmp_path, version: str) -> dict:
    """An environment whose PATH finds a real Python `version` as python<version>."""
    found = interpreter(version)
    if found is None:
        pytest.skip(f"no Python {version} on this machine (PATH or pyenv)")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / f"python{version}").symlink_to(found)
    return {"PATH": f"{bin_dir}:{run_env()['PATH']}"}


@pytest.mark.slow
@claims(("docs/platforms.md", "make PYTHON=python3.12 repro"),
        ("docs/platforms.md", "$ make PYTHON=python3.10 repro"))
def test_make_builds_the_venv_with_the_python_named_and_refuses_others(tmp_path):
    """The named Python builds .venv (what make would run is checked: it installs for
    minutes), and an unsupported one gets the page's one line, with nothing run."""
    checkout = make_files(tmp_path / "checkout")
    plan = run_sh(block("docs/platforms.md", "make PYTHON=python3.12 repro"), checkout,
                  replace={"make ": "make --no-print-directory -n "},
                  extra=python_on_path(tmp_path, "3.12"))
    assert "python3.12 -m venv .venv" in plan and plan.rstrip().splitlines()[-1] == "dvc repro"
    [refused] = run_session(block("docs/platforms.md", "$ make PYTHON=python3.10 repro"),
                            checkout, extra=python_on_path(tmp_path, "3.10"))
    assert refused.rc != 0 and not (checkout / ".venv").exists()


@pytest.mark.slow
@claims(("docs/platforms.md", "make gpu"))
def test_make_gpu_plans_what_the_page_says():
    """Installing GPU TensorFlow and CUDA PyTorch takes gigabytes: the plan is checked."""
    assert commands(block("docs/platforms.md", "make gpu")) == ["make gpu"]
    plan = make_plan("gpu")
    assert plan.index("uninstall --quiet --yes tensorflow-cpu") < plan.index(
        "-r requirements-gpu.lock")


# --- docs/testing.md ------------------------------------------------------------------------


@pytest.mark.slow
@claims(("docs/testing.md", "make test-fast"))
def test_the_inner_loop():
    """`make test-fast` runs the fast part of this very suite: what it would run is
    checked. The line that runs one module's tests runs, from the checkout's root."""
    assert 'python -m pytest -m "not slow"' in make_plan("test-fast")
    fast, one = commands(block("docs/testing.md", "make test-fast"))
    assert fast == "make test-fast"
    run = bash(one, ROOT)
    assert run.returncode == 0 and " passed" in run.output, run.output[-3000:]
