"""dvc.yaml against the code: each stage's deps are exactly the project modules it runs.

The import closure is derived from the code itself (every `import stages...` / `from stages
... import ...` anywhere in a module, functions included, followed transitively, with the
packages they sit in), never from a hand-kept list, so an edit reruns exactly the stages it
can change. The frameworks' registries (stages/frameworks/__init__.py's network(),
trainers.py's trainer()) import each framework in a branch of its own, and a run takes the
branch of the framework `train.framework` names: the closure follows the imports of that
framework's modules only, and dvc.yaml's `stages/${train.framework}...` deps are checked
for every framework. A folder dep stands for every file in it; a file that is not Python
(the C program's source) counts as run by a module that names it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

from stages.runtime import params
from tests.paths import ROOT

PACKAGE = "stages"


def module_file(name: str) -> Path | None:
    """stages.x -> stages/x.py, stages.frameworks.keras -> stages/frameworks/keras/__init__.py
    (None when `name` is not a module of the package)."""
    parts = name.split(".")
    if parts[0] != PACKAGE:
        return None
    for path in (ROOT.joinpath(*parts).with_suffix(".py"), ROOT.joinpath(*parts, "__init__.py")):
        if path.is_file():
            return path
    return None


def framework_named(module: str) -> str | None:
    """stages.frameworks.torch.fit -> "torch"; None for a module of no one framework."""
    parts = module.split(".")
    in_one = parts[:2] == [PACKAGE, "frameworks"] and len(parts) > 2
    return parts[2] if in_one and parts[2] in params.FRAMEWORKS else None


def imported_modules(path: Path, framework: str) -> set[str]:
    """Project modules `path` imports anywhere in its body, those of another framework than
    `framework` left out (a registry's branch that the run does not take)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if module_file(alias.name)}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if module_file(node.module):
                found.add(node.module)
            # from stages import params / from stages.frameworks.keras import model as keras_model
            found |= {f"{node.module}.{a.name}" for a in node.names
                      if module_file(f"{node.module}.{a.name}")}
    return {name for name in found if framework_named(name) in (None, framework)}


def files_named(path: Path) -> set[Path]:
    """Files beside `path`, not Python, that its code names in a string (a source it builds),
    and every file of a folder beside it that holds no Python (C's reference/ programs)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Constant) and isinstance(node.value, str)
                and re.fullmatch(r"[\w-]+(\.\w+)?", node.value)):
            continue
        named = path.parent / node.value
        if named.is_file() and named.suffix != ".py":
            found.add(named)
        elif named.is_dir() and not list(named.rglob("*.py")):
            found |= {f for f in named.rglob("*") if f.is_file()}
    return found


def closure(module: str, framework: str = "keras") -> set[str]:
    """Files (relative to the repo) a `python -m module` run executes from the project,
    with `framework` as train.framework."""
    seen, todo = set(), [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # its packages run first
        todo += imported_modules(module_file(name), framework)
    files = {module_file(name) for name in seen}
    files |= set().union(*(files_named(f) for f in files))
    return {f.relative_to(ROOT).as_posix() for f in files}


def expand(dep: str) -> set[str]:
    """A dep as the files it stands for: a folder is every file in it (bytecode caches are
    .dvcignore'd)."""
    path = ROOT / dep
    if path.is_dir():
        return {p.relative_to(ROOT).as_posix() for p in path.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts}
    return {dep}


def stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def stage_module(stage: dict) -> str:
    match = re.match(r"python -m (stages\.\w+)\b", stage["cmd"])
    assert match, f"cmd does not run a stages module: {stage['cmd']}"
    return match[1]


# Shared modules that only some frameworks' training imports (augment: Keras and PyTorch;
# idx: C's data files). A dvc.yaml stage cannot list deps per framework (DVC cannot
# interpolate a list: treeverse/dvc#8171), so the stages that train (train, audit-labels)
# list them for every framework: an edit of one of these retrains a framework that does
# not run it. The one inexactness.
FOR_SOME_FRAMEWORKS = {"stages/training/augment.py", "stages/data/idx.py"}
TRAINING_STAGES = ("train", "audit-labels")


@pytest.mark.parametrize("framework", params.FRAMEWORKS)
@pytest.mark.parametrize("name", sorted(stages()))
def test_code_deps_are_exactly_the_import_closure(name, framework):
    stage = stages()[name]
    declared = set().union(*(expand(d.replace("${train.framework}", framework)
                                    .replace("${audit.framework}", framework))
                             for d in stage["deps"] if d.startswith(f"{PACKAGE}/")))
    derived = closure(stage_module(stage), framework)
    if name in TRAINING_STAGES:
        derived |= FOR_SOME_FRAMEWORKS
    assert declared == derived, (
        f"{name} ({framework}): missing from dvc.yaml deps: {sorted(derived - declared)}; "
        f"listed but not imported: {sorted(declared - derived)}")


def test_each_module_listed_for_some_frameworks_is_run_by_one_and_not_by_another():
    trains = {fw: closure("stages.train", fw) for fw in params.FRAMEWORKS}
    for module in FOR_SOME_FRAMEWORKS:
        runs = {fw for fw, files in trains.items() if module in files}
        assert runs and runs != set(params.FRAMEWORKS), module


def test_the_closure_follows_imports_inside_functions_and_through_modules():
    # render_errors imports neighbours and the page inside functions; the page imports
    # the sheets, which import the dataset layout: all must be found.
    files = closure("stages.render_errors")
    assert {"stages/analysis/neighbours.py", "stages/analysis/page.py", "stages/analysis/sheets.py",
            "stages/data/mnist.py"} <= files
    # and no stage pulls in framework code it does not run
    assert not any(f.startswith("stages/frameworks/") for f in files)
    assert "stages/frameworks/keras/fit.py" not in closure("stages.evaluate", "keras")
    # a framework's modules are found through the registries, for that framework only
    torch_train = closure("stages.train", "torch")
    assert {"stages/frameworks/torch/env.py", "stages/frameworks/torch/fit.py",
            "stages/frameworks/torch/model.py"} <= torch_train
    assert not any(f.startswith(("stages/frameworks/keras/", "stages/frameworks/c/"))
                   for f in torch_train)


def imports_of(node: ast.AST) -> set[str]:
    """The modules an import statement names (and `from m import x`'s m.x)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        return {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return set()


REGISTRIES = {"stages/frameworks/__init__.py", "stages/frameworks/trainers.py"}


def test_only_the_registries_import_several_frameworks_one_per_branch():
    """What lets the closure leave out another framework's modules: outside a framework's
    own folder, only the registries import one, and each such import sits in the `case`
    branch of the framework it belongs to."""
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        own = framework_named(".".join(path.relative_to(ROOT).with_suffix("").parts))
        tree = ast.parse(path.read_text())
        imported = {framework_named(m) for node in ast.walk(tree) for m in imports_of(node)}
        if rel not in REGISTRIES:
            assert imported <= {None, own}, f"{rel} imports frameworks {imported - {None, own}}"
            continue
        branches = [case for case in ast.walk(tree) if isinstance(case, ast.match_case)]
        in_branches = 0
        for case in branches:
            named = {framework_named(m) for node in ast.walk(case) for m in imports_of(node)}
            named.discard(None)
            wanted = getattr(getattr(case.pattern, "value", None), "value", None)
            assert named <= {wanted}, f"{rel}: the {wanted!r} branch imports {named}"
            in_branches += len(named)
        assert set(params.FRAMEWORKS) <= imported and in_branches == len(params.FRAMEWORKS), rel


def test_every_project_module_is_some_stages_dependency():
    used = set().union(*(closure(stage_module(s), framework) for s in stages().values()
                         for framework in params.FRAMEWORKS))
    modules = expand(PACKAGE)
    assert modules == used, f"modules no stage runs: {sorted(modules - used)}"


def _path_literals(path: Path) -> list[str]:
    """String constants in code (docstrings excluded) that look like project paths."""
    tree = ast.parse(path.read_text())
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef))
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)
            and id(node) not in docstrings and re.match(r"(data|reports)/", node.value)]


@pytest.mark.parametrize("path", sorted((ROOT / PACKAGE).rglob("*.py")),
                         ids=lambda p: p.relative_to(ROOT / PACKAGE).as_posix())
def test_paths_live_in_dvc_yaml_not_in_code(path):
    assert _path_literals(path) == []


def test_every_path_a_command_uses_is_a_declared_dep_or_out():
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    paths = {}
    for entry in spec["vars"]:
        paths.update(entry)
    for name, stage in spec["stages"].items():
        declared = set(stage.get("deps", [])) | {
            next(iter(o)) if isinstance(o, dict) else o
            for key in ("outs", "metrics", "plots") for o in stage.get(key, [])}
        used = set(re.findall(r"\$\{(\w+)\}", stage["cmd"]))
        assert used, f"{name}: its command takes no paths from vars"
        undeclared = {v for v in used if f"${{{v}}}" not in declared}
        assert not undeclared, f"{name}: cmd uses {sorted(undeclared)} but does not declare them"
