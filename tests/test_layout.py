"""The package's layout: the reference model, the strategies and the runtime
never import the cost model (shardwise.perf reads their code; they do not
read it), and no module of perf/ grows past 600 lines. A source scan on the
syntax tree, imports inside functions included. Commands that need no
tensors (help, listings, a plan refused before launch) do not import torch."""
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


# Commands that need no tensors, refusals of a plan before launch included,
# answer without importing torch (it takes over a second to import).
NO_TORCH = {
    "help": ["--help"],
    "presets": ["presets"],
    "a plan the model cannot be split by": ["verify", "--model", "tiny-dense", "--plan",
                                            "tp_pp:3x1"],
    "a composed plan": ["verify", "--model", "tiny-dense", "--plan", "pp:2/helix:3x1"],
    "a capacity no layer fits": ["run", "--plan", "layerwise:cap=1KB"],
}


@pytest.mark.parametrize("name", NO_TORCH)
def test_commands_that_need_no_tensors_do_not_import_torch(name):
    import subprocess
    import sys

    code = ("import sys\nfrom shardwise import cli\n"
            "try:\n    rc = cli.main(sys.argv[1:])\nexcept SystemExit as e:\n    rc = e.code\n"
            "print('torch' in sys.modules, rc)")
    p = subprocess.run([sys.executable, "-c", code, *NO_TORCH[name]], capture_output=True,
                       text=True, timeout=120)
    imported, rc = p.stdout.split()[-2:]
    assert imported == "False", (name, p.stderr)
    # The refusals are refusals (exit 2, one line), not a launch that failed.
    assert rc == ("0" if name in ("help", "presets") else "2"), (name, p.stdout, p.stderr)


def test_each_strategy_runs_the_rules_that_check_its_plans():
    """The check before launch (parallel/plans.py, no torch) and the ranks
    that run a plan use one definition: the runtime class inherits it."""
    from shardwise.parallel.base import get_strategy
    from shardwise.parallel.plans import COMPOSE, PLANS, plan_rules

    for name in [*PLANS, COMPOSE]:
        rules, runtime = plan_rules(name), get_strategy(name)
        assert issubclass(runtime, rules), name
        for method in ("validate", "ranks_needed", "default_ranks", "candidates", "composition"):
            assert getattr(runtime, method).__func__ is getattr(rules, method).__func__, (
                name, method)
