"""The project's layers point one way: stages -> the shared library <- everything else.

Every import statement of every module under stages/, mnist_cli/, benchmarks/, tools/,
testbed/ and tests/ is read (ast, inside functions too: an import that runs late still
ties two modules together). An edge is importer -> imported module (`from a.b import c`
is a.b.c where that is a module, else a.b). Strings are not imports: a benchmark or test
that runs `python -m stages.train` as a process depends on the command, not the module.
The rules:

(a) No import cycle between project modules, whether the imports sit at module level or
    inside functions.

(b) Each top-level package imports only the layers below it (and itself):
    - stages/: only stages. Its stage entry points (download, normalize, train, evaluate,
      render_errors, audit_labels: what dvc.yaml runs) sit on the shared library, its
      sub-packages runtime, data, training, frameworks and analysis;
    - mnist_cli/ (the user commands): stages;
    - testbed/ (what tests and benchmarks both run against: the pipeline's dvc.yaml read
      and its files copied, processes, test hosts, object store, SSH server, drawn
      digits): nothing but itself;
    - benchmarks/: stages, mnist_cli, testbed; never tests;
    - tools/ (developer scripts): stages, testbed, and tests. tools sits above the tests
      on purpose: `make test-pythons` (tools/pythons.py) builds the tests' own fixture
      project (make_project: the fixture under tests/data and the params that point at
      it) under each supported Python, so that it checks exactly what the suite checks;
      moving that fixture out of tests/ would split the suite's fixture in two;
    - tests/: anything, but only a test module (test_*.py) imports benchmarks or tools,
      to test them; the tests' shared modules (conftest, docs, projects...) import neither.

(c) A stage entry point is imported by no module but a test module (tests/**/test_*.py):
    not by another stage, the library, the commands, benchmarks, tools, testbed or the
    tests' shared modules. What two places need lives in the library. Tests import entry
    points to test their stage, and a few build their inputs with an upstream stage's own
    function (normalize.normalize for the processed arrays, render_errors.analyse for the
    error records) so that the input is what the pipeline makes. The reading of dvc.yaml
    that benchmarks and tests share (testbed/pipeline.py) reads it as text and imports no
    stage.
"""

from __future__ import annotations

import ast
import functools
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from tests.paths import ROOT

PACKAGES = ("stages", "mnist_cli", "testbed", "benchmarks", "tools", "tests")
ENTRY_POINTS = frozenset(f"stages.{name}" for name in (
    "download", "normalize", "train", "evaluate", "render_errors", "audit_labels"))
# What each top-level package may import besides itself (rule b).
MAY_IMPORT = {
    "stages": set(),
    "mnist_cli": {"stages"},
    "testbed": set(),
    "benchmarks": {"stages", "mnist_cli", "testbed"},
    "tools": {"stages", "testbed", "tests"},
    "tests": {"stages", "mnist_cli", "testbed", "benchmarks", "tools"},
}
ONLY_FROM_TEST_MODULES = {"benchmarks", "tools"}  # within tests/ (rule b)


class Edge(NamedTuple):
    importer: str
    imported: str
    where: str  # path:line of the import statement

    def __str__(self) -> str:
        return f"{self.importer} -> {self.imported} ({self.where})"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES
            for p in sorted((ROOT / package).rglob("*.py")) if "__pycache__" not in p.parts}


def edges(known: dict[str, Path] | None = None, root: Path = ROOT) -> list[Edge]:
    """Every import of a project module by a project module (`known`: every module, by
    name), wherever it stands."""
    known = modules() if known is None else known
    found = []
    for name, path in known.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importer's package up
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                           for a in node.names]
            where = f"{path.relative_to(root).as_posix()}:{getattr(node, 'lineno', 0)}"
            found += [Edge(name, t, where) for t in targets
                      if t.split(".")[0] in PACKAGES and t != name]
    return list(dict.fromkeys(found))  # one edge per statement and module


@functools.cache
def project_edges() -> tuple[Edge, ...]:
    return tuple(edges())


def cycles(all_edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    graph = defaultdict(set)
    for e in all_edges:
        graph[e.importer].add(e.imported)
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def is_test_module(name: str) -> bool:
    return name.startswith("tests.") and name.rpartition(".")[2].startswith("test_")


def layer_violations(all_edges: list[Edge]) -> list[Edge]:
    bad = []
    for e in all_edges:
        mine, theirs = e.importer.split(".")[0], e.imported.split(".")[0]
        if theirs == mine:
            continue
        if theirs not in MAY_IMPORT[mine]:
            bad.append(e)
        elif mine == "tests" and theirs in ONLY_FROM_TEST_MODULES and not is_test_module(
                e.importer):
            bad.append(e)
    return bad


def entry_point_violations(all_edges: list[Edge]) -> list[Edge]:
    return [e for e in all_edges if e.imported in ENTRY_POINTS and not is_test_module(e.importer)]


def listing(found) -> str:
    return "\n  " + "\n  ".join(map(str, found))


def test_no_import_cycles():
    all_edges = project_edges()
    found = cycles(all_edges)
    within = [[e for e in all_edges if e.importer in c and e.imported in c] for c in found]
    assert not found, "import cycles (each: the imports among its modules):" + "".join(
        listing(group) for group in within)


def test_each_package_imports_only_the_layers_below_it():
    bad = layer_violations(project_edges())
    assert not bad, "imports against the layers (see this module's docstring):" + listing(bad)


def test_stage_entry_points_are_imported_only_by_tests():
    bad = entry_point_violations(project_edges())
    assert not bad, ("stage entry points imported outside test modules (move what is "
                     "shared into stages' library packages):" + listing(bad))


def test_the_rules_see_imports_inside_functions_and_report_them(tmp_path):
    """The reader finds what the rules are about (so the tests above cannot pass for
    having read nothing), and each rule flags a module written to break it."""
    all_edges = {(e.importer, e.imported) for e in project_edges()}
    # module level, inside a function, and `from package import module`:
    assert ("stages.evaluate", "stages.analysis.verdicts") in all_edges
    assert ("tools.pythons", "tests.projects") in all_edges
    assert ("stages.render_errors", "stages.analysis.page") in all_edges
    assert ("mnist_cli.predict", "stages.frameworks") in all_edges

    made = {
        "benchmarks.a": "def f():\n    from benchmarks import b\n",
        "benchmarks.b": "from benchmarks.a import f\nfrom tests.projects import dvc\n",
        "mnist_cli.c": "import stages.train\n",
        "tests.projects": "",
        "stages.train": "",
    }
    known = {}
    for name, code in made.items():
        path = tmp_path / (name.replace(".", "_") + ".py")
        path.write_text(code)
        known[name] = path
    made_edges = edges(known, tmp_path)
    assert cycles(made_edges) == [["benchmarks.a", "benchmarks.b"]]
    assert [(e.importer, e.imported) for e in layer_violations(made_edges)] == [
        ("benchmarks.b", "tests.projects")]
    assert [str(e) for e in entry_point_violations(made_edges)] == [
        "mnist_cli.c -> stages.train (mnist_cli_c.py:1)"]
