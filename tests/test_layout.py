"""The package's layout: the reference model, the strategies and the runtime
never import the cost model (shardwise.perf reads their code; they do not
read it), no two modules import each other, directly or round a longer
circle (a lower module takes the code both need, or is handed a value), and
no module of perf/ grows past 600 lines. A source scan on the syntax tree,
imports inside functions included, relative ones resolved. Commands that
need no tensors (help, listings, a plan refused before launch) do not
import torch.

The repository's: every file under results/ is named by the README, a page
of docs/ or a README under results/ (what no document cites is deleted, not
kept), and scripts/ holds one GPU runner with named sweeps, not numbered
copies of it."""
import ast
import fnmatch
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "shardwise"
RESULTS = ROOT / "results"
LOWER = ("model", "parallel", "runtime")


def imports(path: pathlib.Path, src: pathlib.Path = SRC) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path`` (a module of the package at
    ``src``), at any depth (inside functions too), relative ones resolved: the
    module ``import`` names, or the one ``from M import n`` reads ``n`` from,
    which is ``M.n`` where that is a module of the package, else ``M``."""
    package = path.parent.relative_to(src.parent).parts  # ("shardwise", "parallel")

    def is_module(name: str) -> bool:
        target = src.parent.joinpath(*name.split("."))
        return target.with_suffix(".py").is_file() or (target / "__init__.py").is_file()

    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found += [(node.lineno, f"{module}.{a.name}" if is_module(f"{module}.{a.name}")
                       else module) for a in node.names]
    return sorted(found)


def perf_imports(path: pathlib.Path, src: pathlib.Path = SRC) -> list[str]:
    """``file:line`` of every import of shardwise.perf in ``path`` (a module
    of the package at ``src``), in line order."""
    lines = {line for line, name in imports(path, src)
             if name == "shardwise.perf" or name.startswith("shardwise.perf.")}
    return [f"{path.relative_to(src)}:{line}" for line in sorted(lines)]


def module_name(path: pathlib.Path, src: pathlib.Path) -> str:
    parts = path.relative_to(src.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_cycles(src: pathlib.Path = SRC) -> list[tuple[str, ...]]:
    """The modules of the package at ``src`` that import one another in a
    circle, as its strongly connected components (each sorted): module A
    reaches B when it imports B or a module that reaches B."""
    paths = {module_name(p, src): p for p in src.rglob("*.py")}
    graph = {m: {n for _, n in imports(p, src) if n in paths and n != m}
             for m, p in paths.items()}
    reached = {}
    for start in graph:
        seen, todo = set(), [start]
        while todo:
            for n in graph[todo.pop()] - seen:
                seen.add(n)
                todo.append(n)
        reached[start] = seen
    return sorted({tuple(sorted(n for n in reached[m] if m in reached[n]))
                   for m in graph if m in reached[m]})


def test_the_scan_sees_relative_and_nested_imports(tmp_path):
    pkg = tmp_path / "shardwise" / "parallel"
    pkg.mkdir(parents=True)
    (tmp_path / "shardwise" / "perf").mkdir()
    (tmp_path / "shardwise" / "perf" / "__init__.py").write_text("")  # from .. import perf
    (pkg / "x.py").write_text("def f():\n    from ..perf.costs import Costs\n"
                              "from .. import perf\nfrom ..spec import Plan\n")
    assert perf_imports(pkg / "x.py", tmp_path / "shardwise") == ["parallel/x.py:2",
                                                                   "parallel/x.py:3"]


def test_the_cycle_scan_sees_function_level_and_relative_imports(tmp_path):
    # a -> b at module level; b -> c inside a function; c -> a relatively,
    # through its package (from .. import a, a module); d imports a name of
    # a and is reached by nothing.
    src = tmp_path / "shardwise"
    (src / "sub").mkdir(parents=True)
    for name, text in {"__init__.py": "", "a.py": "from .sub import b\n",
                       "sub/__init__.py": "", "sub/b.py": "def f():\n    import shardwise.sub.c\n",
                       "sub/c.py": "from .. import a\n", "d.py": "from .a import b\n"}.items():
        (src / name).write_text(text)
    assert import_cycles(src) == [("shardwise.a", "shardwise.sub.b", "shardwise.sub.c")]
    (src / "sub" / "c.py").write_text("from .. import sub\n")  # the package, not a
    assert import_cycles(src) == []


def test_no_import_cycles():
    assert import_cycles() == []


@pytest.mark.parametrize("package", LOWER)
def test_lower_layers_do_not_import_the_cost_model(package):
    found = [hit for path in sorted((SRC / package).rglob("*.py")) for hit in perf_imports(path)]
    assert found == []


def test_no_cost_model_module_over_600_lines():
    sizes = {p.name: len(p.read_text().splitlines()) for p in (SRC / "perf").glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 600} == {}


def cited_names(text: str) -> set[str]:
    """The file names a Markdown text gives (code spans, link targets and
    results/ paths, globs included), relative to results/ where they say
    results/ or ../: names with a suffix or a folder in them."""
    text = re.sub(r"^```.*$", "", text, flags=re.M)  # fences would pair with inline backticks
    found = set(re.findall(r"\]\(([^)\s]+)\)", text)) | set(re.findall(r"results/[\w.*/-]+", text))
    for code in re.findall(r"`([^`]+)`", text):
        found.update(code.split())
    found = {t.strip(",;:()'\"").removeprefix("../").removeprefix("results/") for t in found}
    return {t for t in found if ("." in t or "/" in t) and re.search(r"[a-z0-9]{2}", t)}


def is_cited(name: str, names: set[str], top: set[str]) -> bool:
    """Whether ``name`` (a path relative to a document's folder) is one of
    ``names``, matches one of its globs, lies in one of its folders other
    than the first-level ones in ``top`` (``diag/`` alone cites nothing), or
    is one of its paths with the suffix left off."""
    stem = name.rsplit(".", 1)[0]
    return any(fnmatch.fnmatchcase(name, t) or ("/" in t and stem == t)
               or (t.endswith("/") and t not in top and name.startswith(t)) for t in names)


def uncited_results(root: pathlib.Path = ROOT) -> list[str]:
    """Files under ``root``/results that no document names. The README and
    docs/ name them relative to results/; results/README.md also relative to
    its folders (its diagnostics table lists diag/'s files by name); a README
    in a folder of results/ relative to that folder."""
    results = root / "results"
    docs = [root / "README.md", *sorted((root / "docs").glob("*.md")), *sorted(results.rglob("README.md"))]
    cited = {doc: cited_names(doc.read_text()) for doc in docs}
    top = {f"{d.name}/" for d in results.iterdir() if d.is_dir()}
    missing = []
    for path in sorted(p for p in results.rglob("*") if p.is_file()):
        rel = path.relative_to(results)
        ok = False
        for doc, names in cited.items():
            candidates = {rel.as_posix()}
            if doc == results / "README.md" and len(rel.parts) > 1:
                candidates.add(rel.relative_to(rel.parts[0]).as_posix())
            if doc.parent != results and doc.parent in path.parents:
                candidates.add(path.relative_to(doc.parent).as_posix())
            ok = ok or any(is_cited(c, names, top) for c in candidates)
        if not ok:
            missing.append(rel.as_posix())
    return missing


def test_the_citation_scan_finds_names_globs_and_folders(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text("`results/a.jsonl`, [r](results/README.md), [b](results/sub/README.md)\n")
    (tmp_path / "docs" / "x.md").write_text("from `results/runs/fid-*.txt` and `diag/` alone\n")
    sub, diag, runs = (tmp_path / "results" / d for d in ("sub", "diag", "runs"))
    for d in (sub, diag / "traces-x", runs):
        d.mkdir(parents=True)
    (tmp_path / "results" / "README.md").write_text("`diag/`: | `c.json` | `traces-x/` |\n")
    (sub / "README.md").write_text("| `d.jsonl` | made by `--out results/sub/e` |\n")
    for name in ("a.jsonl", "orphan.txt", "sub/d.jsonl", "sub/e.md", "sub/f.jsonl", "diag/c.json",
                 "diag/traces-x/t.txt", "diag/g.json", "runs/fid-1.txt", "runs/bench-1.jsonl"):
        (tmp_path / "results" / name).write_text("x")
    assert uncited_results(tmp_path) == ["diag/g.json", "orphan.txt", "runs/bench-1.jsonl", "sub/f.jsonl"]


def test_every_file_under_results_is_cited():
    assert uncited_results() == []


def test_scripts_hold_no_numbered_copies():
    numbered = sorted(p.name for p in (ROOT / "scripts").iterdir() if re.search(r"-\d+\.\w+$", p.name))
    assert numbered == []

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
    that run a plan use one definition: the runtime class inherits it. Each
    names the code that builds its stages (parallel/compose.py imports no
    strategy)."""
    from shardwise.parallel.compose import Composed
    from shardwise.parallel.plans import COMPOSE, PLANS
    from shardwise.parallel.registry import get_strategy, plan_rules

    for name in [*PLANS, COMPOSE]:
        rules, runtime = plan_rules(name), get_strategy(name)
        assert issubclass(runtime, rules), name
        for method in ("validate", "ranks_needed", "default_ranks", "candidates", "composition"):
            assert getattr(runtime, method).__func__ is getattr(rules, method).__func__, (
                name, method)
        assert runtime.build_stage is not Composed.build_stage, name
