"""Configuration and checkpoints are read as JSON and safetensors only: nothing
in the package unpickles (``pickle``, ``torch.load``) or evaluates text
(``eval``, ``exec``). A source scan, on the syntax tree so that a module's
``.eval()`` (inference mode) is not mistaken for the builtin."""
import ast
import pathlib

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "shardwise"

UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "shelve", "marshal",
                  "joblib"}
UNSAFE_BUILTINS = {"eval", "exec"}
UNSAFE_ATTRIBUTES = {("torch", "load"), ("pickle", "load"), ("pickle", "loads"),
                     ("np", "load"), ("numpy", "load"), ("pd", "read_pickle"),
                     ("serialization", "load")}


def unsafe_uses(source: str, filename: str = "<src>") -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names
                      if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            mod = (node.module or "").split(".")[0]
            if mod in UNSAFE_MODULES:
                found.append(f"{where} from {node.module} import ...")
            if node.module in ("torch", "torch.serialization") and any(
                    a.name == "load" for a in node.names):
                found.append(f"{where} from {node.module} import load")
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in UNSAFE_BUILTINS:
                found.append(f"{where} {f.id}(...)")
            if (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                    and (f.value.id, f.attr) in UNSAFE_ATTRIBUTES):
                found.append(f"{where} {f.value.id}.{f.attr}(...)")
            if (isinstance(f, ast.Attribute) and isinstance(f.value, ast.Attribute)
                    and (f.value.attr, f.attr) in UNSAFE_ATTRIBUTES):
                found.append(f"{where} ...{f.value.attr}.{f.attr}(...)")
    return found


def test_the_scan_finds_what_it_looks_for():
    bad = ("import pickle\nfrom torch import load\nimport torch\nx = torch.load('w.pt')\n"
           "y = eval('1 + 1')\nexec('z = 1')\nimport numpy as np\nnp.load('a.npy')\n"
           "torch.serialization.load('w.pt')\n")
    assert len(unsafe_uses(bad)) == 7, unsafe_uses(bad)
    assert unsafe_uses("model = model.eval()\nimport json\njson.loads('{}')\n") == []


def test_src_never_unpickles_or_evaluates():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20
    found = [hit for f in files for hit in unsafe_uses(f.read_text(), str(f.relative_to(SRC)))]
    assert found == [], "unsafe deserialisation in src/: " + "; ".join(found)
