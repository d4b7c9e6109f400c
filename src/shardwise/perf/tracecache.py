"""Recordings kept on disk: a plan's per-rank traces, recorded once per
configuration and code version, read back by later processes.

What a plan's ranks do depends only on the model spec, the workload, the
plan, the world size, the backend, the MoE routing balance, the phases
recorded, and the code that records them (the strategies, the reference
model, the recorder) with the PyTorch version whose meta kernels and
decompositions it runs. :func:`key` hashes all of these: the code as the
source of every module of the package the recording can execute
(:func:`code_version`: ``model/``, ``parallel/`` and ``perf/record.py``
with every module they import, transitively), so an edit to any of them
misses every older entry.

An entry is JSON (never pickle: the package deserialises nothing but JSON
and safetensors), gzip-compressed: each distinct kernel and host call once in
a table (their names in a table of strings), each step's events as indices
into it, collectives, waits and loops as short lists. It holds its key's text, checked on reading. Entries are
written atomically (a temporary file, then ``os.replace``); one that cannot
be read, or holds another key, is ignored and written again.

Where: ``$SHARDWISE_CACHE``, else ``$XDG_CACHE_HOME/shardwise``, else
``~/.cache/shardwise``, under ``recordings/``; ``SHARDWISE_CACHE=off``
turns the cache off.
"""
from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import importlib.metadata
import json
import os
import pathlib
import re
import signal
import sys
import tempfile
import threading
import zlib

from .events import Call, Coll, Kernel, Repeat, Wait

FORMAT = 2  # of an entry; a change to the encoding below moves it on
_PACKAGE = pathlib.Path(__file__).resolve().parents[1]  # src/shardwise
# Where the recording starts: the strategies (all of parallel/), the
# reference model and its kernels, and the recorder.
_SEEDS = ("model", "parallel", "perf/record.py")


def directory() -> pathlib.Path | None:
    """The cache's folder (module docstring), or None where it is off."""
    env = os.environ.get("SHARDWISE_CACHE")
    if env is not None and env.strip().lower() == "off":
        return None
    if env:
        root = pathlib.Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (pathlib.Path(xdg) if xdg else pathlib.Path.home() / ".cache") / "shardwise"
    return root / "recordings"


# -- the key --------------------------------------------------------------------------

# An import statement (a parenthesised list of names may span lines); read
# from the text, which is as exact here as a syntax tree and much faster to
# get (one in a docstring only adds a file to the hash).
_IMPORT = re.compile(r"^[ \t]*(?:from[ \t]+(\.*)([\w.]*)[ \t]+import[ \t]+(\([^)]*\)|[^\n]*)"
                     r"|import[ \t]+([^\n]*))", re.MULTILINE)


def _imports(path: pathlib.Path) -> set[pathlib.Path]:
    """The package's modules that ``path`` imports (relative or absolute,
    inside functions too), as files."""
    here = path.parent.relative_to(_PACKAGE.parent).parts  # ("shardwise", "perf")
    out = set()
    for dots, module, names, plain in _IMPORT.findall(path.read_text()):
        words = [n.split("#")[0].split(" as ")[0].strip(" \t\n()\\")
                 for n in (names or plain).split(",")]
        if plain:
            mods = [w.split(".") for w in words]
        else:
            base = list(here[:len(here) - len(dots) + 1]) if dots else []
            mod = base + (module.split(".") if module else [])
            mods = [mod] + [mod + [w] for w in words if w]
        for parts in mods:
            if parts[:1] != ["shardwise"]:
                continue
            target = _PACKAGE.parent.joinpath(*parts)
            for f in (target.with_suffix(".py"), target / "__init__.py"):
                if f.is_file():
                    out.add(f)
    return out


def torch_version() -> str:
    """The installed PyTorch's version, read from its distribution's metadata
    without importing it (a warm ranking needs no torch: :mod:`.recordings`);
    ``torch.__version__`` where it has none (a source tree on the path)."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        import torch

        return torch.__version__


@functools.cache
def code_version() -> str:
    """A hash of the source of every module of the package a recording can
    run: the seeds (``_SEEDS``) and what they import, transitively; with
    the PyTorch (:func:`torch_version`) and Python versions."""
    todo = [p for s in _SEEDS for p in ((_PACKAGE / s).rglob("*.py") if (_PACKAGE / s).is_dir()
                                        else [_PACKAGE / s])]
    todo += [_PACKAGE / "__init__.py", _PACKAGE / "perf" / "tracecache.py"]
    seen: set = set()
    while todo:
        f = todo.pop()
        if f not in seen:
            seen.add(f)
            todo += _imports(f) - seen
    h = hashlib.sha256(f"{torch_version()} {sys.version_info[:3]}".encode())
    for f in sorted(seen):
        h.update(str(f.relative_to(_PACKAGE)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def key(*config) -> str:
    """The text that names a recording: its configuration (dataclasses and
    plain values, whose reprs are complete) and the code version."""
    return repr((FORMAT, code_version(), *config))


def _path(folder: pathlib.Path, text: str) -> pathlib.Path:
    return folder / f"{hashlib.sha256(text.encode()).hexdigest()}.json.gz"


# -- values, events and traces as JSON ------------------------------------------------

def _val(v):
    """A plain value as JSON, tuples as lists and lists tagged (they come back
    as they went)."""
    if isinstance(v, tuple):
        return [_val(x) for x in v]
    if isinstance(v, list):
        return {"list": [_val(x) for x in v]}
    if isinstance(v, dict):
        return {"dict": [[_val(k), _val(x)] for k, x in v.items()]}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"a recording holds a {type(v).__name__}, which the cache does not keep")


def _unval(v):
    if type(v) is list:
        return tuple(map(_unval, v))
    if type(v) is dict:
        if "list" in v:
            return [_unval(x) for x in v["list"]]
        return {_unval(k): _unval(x) for k, x in v["dict"]}
    return v


class _Encoder:
    """Kernels and calls each once (by identity, as the recorder shares them),
    events as indices into the table of calls; names, kinds and dtypes as
    indices into a table of strings (a third less to parse)."""

    def __init__(self):
        self.kernels, self.calls, self.strings = [], [], {}
        self._k, self._c = {}, {}

    def string(self, text: str) -> int:
        return self.strings.setdefault(text, len(self.strings))

    def kernel(self, k: Kernel) -> int:
        i = self._k.get(id(k))
        if i is None:
            i = self._k[id(k)] = len(self.kernels)
            self.kernels.append([self.string(k.cls), k.flops, k.bytes, _val(k.dims),
                                 self.string(k.dtype), k])
        return i

    def call(self, c: Call) -> int:
        i = self._c.get(id(c))
        if i is None:
            i = self._c[id(c)] = len(self.calls)
            self.calls.append([self.string(c.kind), self.string(c.name),
                               [self.kernel(k) for k in c.kernels], _val(c.shapes), c])
        return i

    def events(self, events: list) -> list:
        out = []
        for e in events:
            if type(e) is Call:
                out.append(self.call(e))
            elif type(e) is Coll:
                out.append(["c", e.op, e.axis, _val(e.ranks), e.bytes, e.handle,
                            _val(e.sends), _val(e.recvs), e.fused])
            elif type(e) is Wait:
                out.append(["w", e.handle])
            elif type(e) is Repeat:
                out.append(["r", e.times, e.every, _val(e.carry), self.events(e.body)])
            else:
                raise TypeError(f"a recording holds a {type(e).__name__} event")
        return out


def _decode_events(events: list, calls: list) -> list:
    out = []
    for e in events:
        if type(e) is int:
            out.append(calls[e])
        elif e[0] == "c":
            out.append(Coll(e[1], e[2], _unval(e[3]), e[4], e[5], _unval(e[6]), _unval(e[7]),
                            e[8]))
        elif e[0] == "w":
            out.append(Wait(e[1]))
        else:
            out.append(Repeat(_decode_events(e[4], calls), e[1], _unval(e[3]), e[2]))
    return out


def encode(text: str, traces: dict) -> bytes:
    """``traces`` (rank -> :class:`~.recordings.RankTrace`) as an entry for the key ``text``."""
    enc = _Encoder()
    ranks = [{"rank": t.rank, "weights": t.weights, "kv": t.kv, "inputs": t.inputs,
              "symmetric": t.symmetric, "facts": _val(t.facts),
              "steps": [[phase, s.peak_bytes, enc.events(s.events)]
                        for phase, s in t.steps.items()]}
             for t in traces.values()]
    doc = {"format": FORMAT, "key": text, "strings": list(enc.strings),
           "kernels": [k[:5] for k in enc.kernels], "calls": [c[:4] for c in enc.calls],
           "ranks": ranks}
    return gzip.compress(json.dumps(doc, separators=(",", ":")).encode(), 6, mtime=0)


# Every kernel and call read, once: the same call in two entries is one
# object, which the costs price once (costs.Costs keeps prices by the call's
# identity). Each is found by its fields (a call's kernels by identity: they
# are this table's) before one is made, most of the time an entry takes to read.
_KERNELS: dict = {}
_CALLS: dict = {}


def decode(text: str, data: bytes, rank_trace: type, step_trace: type) -> dict:
    """An entry's traces (rank -> ``rank_trace``, its steps ``step_trace``);
    ValueError where it is not one for the key ``text``. The classes are
    recordings.py's RankTrace and StepTrace, handed in by its reader: it
    imports this module to read what is kept, so this one cannot import
    it back."""
    doc = json.loads(gzip.decompress(data))
    if doc.get("format") != FORMAT or doc.get("key") != text:
        raise ValueError("an entry for another key")
    s = doc["strings"]
    kernels = []
    for c, f, b, d, dt in doc["kernels"]:
        fields = (s[c], f, b, _unval(d), s[dt])
        k = _KERNELS.get(fields)
        if k is None:
            k = _KERNELS[fields] = Kernel(*fields)
        kernels.append(k)
    calls = []
    for kind, name, ks, shapes in doc["calls"]:
        ks = tuple(map(kernels.__getitem__, ks))
        fields = (s[kind], s[name], tuple(map(id, ks)), _unval(shapes))
        c = _CALLS.get(fields)
        if c is None:
            c = _CALLS[fields] = Call(s[kind], s[name], ks, fields[3])
        calls.append(c)
    out = {}
    for r in doc["ranks"]:
        steps = {phase: step_trace(_decode_events(events, calls), peak)
                 for phase, peak, events in r["steps"]}
        out[r["rank"]] = rank_trace(r["rank"], steps, r["weights"], r["kv"], r["inputs"],
                                    r["symmetric"], _unval(r["facts"]))
    return out


# -- reading and writing --------------------------------------------------------------

def load(text: str, rank_trace: type, step_trace: type) -> dict | None:
    """The traces kept for the key ``text`` (as :func:`decode` builds them),
    or None (not kept, unreadable, or the cache off)."""
    folder = directory()
    if folder is None:
        return None
    try:
        return decode(text, _path(folder, text).read_bytes(), rank_trace, step_trace)
    except (OSError, EOFError, ValueError, KeyError, TypeError, IndexError, zlib.error):
        return None  # absent or damaged: recorded again and rewritten


def kept(text: str) -> bool:
    """Whether an entry is kept for the key ``text`` (not whether it reads)."""
    folder = directory()
    return folder is not None and _path(folder, text).is_file()


def store(text: str, traces: dict) -> None:
    """Keep ``traces`` for the key ``text`` (atomically; nothing where the
    cache is off or its folder cannot be written)."""
    folder = directory()
    if folder is None:
        return
    data = encode(text, traces)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _stops_held():  # a stop signal waits for the file to be whole, or gone
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, _path(folder, text))
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
    except OSError:
        pass  # a cache that cannot be written is a cache that misses


@contextlib.contextmanager
def _stops_held():
    """SIGINT and SIGTERM held while an entry is written: its temporary file
    is renamed or removed before a stop (a Ctrl-C, a worker stopped as its
    ranking ends) is acted on."""
    stops = {signal.SIGINT, signal.SIGTERM}
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not \
            threading.main_thread():
        yield
        return
    saved = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, saved)
