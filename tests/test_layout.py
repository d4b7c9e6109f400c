"""The package's layout: the reference model, the strategies and the runtime
never import the cost model (shardwise.perf reads their code; they do not
read it), and no module of perf/ grows past 600 lines. A source scan on the
syntax tree, imports inside functions included."""
import ast
import pathlib

import pytest

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "shardwise"
LOWER = ("model", "parallel", "runtime")


def perf_imports(path: pathlib.Path, src: pathlib.Path = SRC) -> list[str]:
    """``file:line`` of every import of shardwise.perf in ``path`` (a module
    of the package at ``src``), in line order."""
    package = path.parent.relative_to(src.parent).parts  # ("shardwise", "parallel")
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names = [module] + [f"{module}.{a.name}" for a in node.names]
        else:
            continue
        if any(n == "shardwise.perf" or n.startswith("shardwise.perf.") for n in names):
            found.append((node.lineno, f"{path.relative_to(src)}:{node.lineno}"))
    return [hit for _, hit in sorted(found)]


def test_the_scan_sees_relative_and_nested_imports(tmp_path):
    pkg = tmp_path / "shardwise" / "parallel"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text("def f():\n    from ..perf.costs import Costs\n"
                              "from .. import perf\nfrom ..spec import Plan\n")
    assert perf_imports(pkg / "x.py", tmp_path / "shardwise") == ["parallel/x.py:2",
                                                                   "parallel/x.py:3"]


@pytest.mark.parametrize("package", LOWER)
def test_lower_layers_do_not_import_the_cost_model(package):
    found = [hit for path in sorted((SRC / package).rglob("*.py")) for hit in perf_imports(path)]
    assert found == []


def test_no_cost_model_module_over_600_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (SRC / "perf").glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 600} == {}
