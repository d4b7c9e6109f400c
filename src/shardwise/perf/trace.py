"""Record what a step does: every host call, device kernel and collective of
one rank's step, while the step runs on ``meta`` tensors (shapes, no data)
along the code's GPU branches.

:class:`Recorder` is a ``TorchDispatchMode``. Each aten op the Python code
calls (inference mode: composite ops such as ``linear`` or
``scaled_dot_product_attention`` arrive whole, as one host call) becomes a
:class:`~.events.Call` with the kernels it launches on a GPU
(:mod:`.lowering`). nn.Module calls, Triton launches and the collectives of
a recording Comm join the same events (:mod:`.record`). Ops are cached by
their inputs' shapes: a layer repeated, a rank like another, the next plan
with the same local shapes cost a dict lookup.

Data that sizes work (MoE routing, a position held in a device tensor) is
kept beside its meta tensor: integer tensors small enough are also computed
on CPU (their *shadow*), so ``nonzero``, ``.item()`` or a read to the host
answer as on a GPU. A router's ``topk`` gets choices spread evenly over the
experts (:class:`Routing`). The step's own tensors are followed to their
peak (``Recorder.peak``).
"""
from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from .events import SYNC_OPS, VALUE_OPS, Call, Kernel, Repeat, carry
from .lowering import (_SDPA, _nbytes, _storage, _tensors, classify_op, lower, named_args,
                       sdp_flags)

# -- the router's choices -----------------------------------------------------------

@dataclass
class Routing:
    """Top-k choices for a router whose scores the recorder cannot know: the
    token-expert slots of a call spread evenly over the experts (any run of
    slots, a chunk's or a rank's, gives each expert its share within one or
    a few), as uniform routing of many tokens does; every rank draws the
    same. Uniform: slot i takes expert (i + offset) mod E, the offset moving
    per call (a token's k picks are distinct, and every call of a size gives
    the experts the same counts). With ``balance`` (the busiest of ``groups``
    equal groups of experts over the mean, as a run measured it) the first
    group's share is that much larger: slot i takes the expert whose share
    holds the golden-ratio point frac(i phi + offset)."""

    balance: float | None = None
    groups: int = 1
    calls: int = 0

    PHI = (5 ** 0.5 - 1) / 2

    def draw(self, rows: int, experts: int, k: int) -> torch.Tensor:
        self.calls += 1
        if not (self.balance and self.groups > 1):
            return ((torch.arange(rows * k) + self.calls) % experts).view(rows, k)
        shares = torch.ones(experts, dtype=torch.float64)
        size = experts // max(self.groups, 1)
        if self.balance and self.groups > 1 and size and self.balance * size < experts:
            # the first group's share, s G / (s G + E - G), is balance x G / E
            shares[:size] = self.balance * (experts - size) / (experts - self.balance * size)
        bounds = torch.cumsum(shares / shares.sum(), 0)
        points = (torch.arange(rows * k, dtype=torch.float64) + self.calls * self.PHI ** 2) \
            * self.PHI % 1.0
        idx = torch.searchsorted(bounds, points, right=True).clamp_(max=experts - 1)
        return idx.view(rows, k)


# -- the recorder -------------------------------------------------------------------

SHADOW_MAX = 1 << 24  # elements of an integer tensor computed on CPU beside its meta one
_INTEGRAL = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_CACHE: dict = {}  # (op, input signature) -> _Cached


class _Special:
    fresh = None  # never the fast path of Recorder.__torch_dispatch__


_SPECIAL = _Special()  # a cache entry of an op handled apart every time (data, routing)
_META = torch.device("meta")
_TENSOR = torch.Tensor  # a global read in the hot _scan
_SHADOWED: dict = {}  # id -> weak reference, of every tensor alive that has a shadow


# The dispatch keys of Python's modes: excluded, an op runs as with no mode
# active (what _disable_current_modes does, without taking the modes off
# the stack and putting them back).
_MODE_KEYS = (torch._C.DispatchKeySet(torch._C.DispatchKey.Python)
              | torch._C.DispatchKeySet(torch._C.DispatchKey.PythonTLSSnapshot))


def no_modes():
    """A context in which ops run as PyTorch runs them with no mode: the
    recorder's own work (shadows computed on CPU, a Triton stand-in reading
    its arguments), not the step's."""
    return torch._C._ExcludeDispatchKeyGuard(_MODE_KEYS)


def set_shadow(t: torch.Tensor, value) -> None:
    """Keep ``value`` (a CPU tensor, or a :class:`_Lazy` one) as the data of
    the meta tensor ``t``."""
    t._shadow = value
    i = id(t)
    _SHADOWED[i] = weakref.ref(t, lambda _: _SHADOWED.pop(i, None))


def _any_shadowed(ins: list) -> bool:
    """Whether a tensor of ``ins`` has a shadow."""
    for t in ins:
        if id(t) in _SHADOWED:
            return True
    return False


class _Lazy:
    """A shadow computed when first read: most integer tensors of a step
    (a sort's order, gathered indices) size nothing, and computing them on
    CPU at every call would cost more than the rest of the recording."""

    __slots__ = ("fn", "value")

    def __init__(self, fn):
        self.fn, self.value = fn, None

    def get(self) -> torch.Tensor:
        if self.fn is not None:
            with no_modes():  # host work of the recorder, not of the step
                self.value, self.fn = self.fn(), None
        return self.value


def shadow_of(t):
    """The data the recorder holds for the meta tensor ``t``, or None."""
    s = t.__dict__.get("_shadow") if isinstance(t, torch.Tensor) else None
    return s.get() if type(s) is _Lazy else s


@dataclass(slots=True)
class _Cached:
    call: Call
    view: bool  # the op returns views: it runs every time (cheap), its call is known
    outs: tuple = ()  # per output: ("arg", i) | ("new", size, stride, dtype) | ("value", v)
    single: bool = True  # one tensor returned, not a tuple
    fresh: tuple | None = None  # (size, stride, dtype) where the op returns one new tensor
    nbytes: int | None = None  # that tensor's storage, once one is made


def _sig(x):
    if isinstance(x, torch.Tensor):
        return (x.shape, x.stride(), x.dtype, x.is_meta)
    if isinstance(x, (list, tuple)):
        return tuple(_sig(v) for v in x)
    return x


def _scan(func, args, kwargs) -> tuple[tuple, list, bool]:
    """(the op's cache key: the op (its ``_op``, whose hash is the C
    function's) and its arguments' shapes, strides, dtypes and values; the
    tensors among its arguments, at most one list deep; whether one of them
    is on meta)."""
    key, ins, meta = [func._op], [], False
    for a in args:
        if isinstance(a, _TENSOR):
            ins.append(a)
            m = a.is_meta
            meta = meta or m
            key.append((a.shape, a.stride(), a.dtype, m))
        elif isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, _TENSOR):
                    ins.append(b)
                    meta = meta or b.is_meta
            key.append(_sig(a))
        else:
            key.append(a)
    if kwargs:
        for k in sorted(kwargs):
            v = kwargs[k]
            if isinstance(v, _TENSOR):
                ins.append(v)
                meta = meta or v.is_meta
            key += (k, _sig(v))
    if func is _SDPA:
        key += sdp_flags()
    return tuple(key), ins, meta


def _is_meta(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_meta


class Recorder(TorchDispatchMode):
    """Records every call of the code into :attr:`events` while active;
    ``events`` also takes :class:`Coll` and :class:`Wait` from the recording
    Comm and :class:`Repeat` from layer loops (:mod:`.record`). ``peak``: the
    most bytes the step's own tensors held at once; ``read_input``: whether
    the step read ``inputs``."""

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # nothing here is compiled: no per-op wrapper to disable it

    def __init__(self, routing: Routing | None = None, memory: bool = True, inputs=None):
        super().__init__()
        self.routing, self.memory = routing or Routing(), memory
        # the step's input: whether an op of the step reads it (``read_input``)
        # (a step's prompt is a Rows, which no op takes: its reads are its own)
        self.inputs = inputs if isinstance(inputs, torch.Tensor) else None
        self.read_input = False
        self.events: list = []
        self._stack: list = []
        self.handles = 0
        self.live = self.peak = 0
        self._storages: dict = {}  # storage id -> [tensors alive, bytes]
        self._refs: dict = {}  # id of a weak reference -> (it, its storage id)

    # -- loops and requests (the recording Comm and layer lists call these) --
    def begin_loop(self) -> None:
        self._stack.append(self.events)
        self.events = []

    def end_loop(self, times: int, every: bool = False) -> None:
        body, self.events = self.events, self._stack.pop()
        self.events.append(Repeat(body, times, carry(body), every))

    @contextmanager
    def aside(self):
        """Ops run here are not the step's: a table or buffer the code makes at
        its first call and keeps (``once.made_once``). They compute
        as ever (shadows included) but leave no event, are not followed in
        memory and do not count as reading the input, as if made by an
        earlier step."""
        saved = self.events, self.memory, self.inputs
        self.events, self.memory, self.inputs = [], False, None
        try:
            yield
        finally:
            self.events, self.memory, self.inputs = saved

    def new_handle(self) -> int:
        self.handles += 1
        return self.handles

    # -- memory -------------------------------------------------------------
    def track(self, t: torch.Tensor, new: bool, nbytes: int | None = None) -> None:
        """Follow ``t`` (``new``: made by the step) until it is freed; ``nbytes``:
        the bytes it stands for, if not its storage's."""
        if not self.memory:
            return
        key = _storage(t)
        entry = self._storages.get(key)
        if entry is None:
            if not new:
                return  # a view of a tensor made before the step (weights, caches)
            size = t.untyped_storage().nbytes() if nbytes is None else nbytes
            entry = self._storages[key] = [0, size]
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        ref = weakref.ref(t, self._release)
        self._refs[id(ref)] = (ref, key)

    def _release(self, ref) -> None:
        _, key = self._refs.pop(id(ref), (None, None))
        entry = self._storages.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                self.live -= entry[1]
                del self._storages[key]

    # -- ops ----------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        key, ins, meta = _scan(func, args, kwargs)
        if self.inputs is not None and not self.read_input \
                and any(t is self.inputs for t in ins):
            self.read_input = True
        factory = "device" in kwargs and _meta_factory(kwargs)
        if not (factory or meta):
            return self._host_op(func, args, kwargs)  # a table on the host: CPU work
        hit = _CACHE.get(key)
        if hit is not None and hit.fresh is not None:  # the most common: one new tensor
            size, stride, dtype = hit.fresh
            out = torch.empty_strided(size, stride, dtype=dtype, device=_META)
            self.events.append(hit.call)
            if self.memory:
                if hit.nbytes is None:
                    hit.nbytes = out.untyped_storage().nbytes()
                self.track(out, True, hit.nbytes)
            if factory or _SHADOWED and _any_shadowed(ins):
                _shadow_op(func, args, kwargs, out, ins)
            return out
        if hit is None or hit is _SPECIAL:
            name = func.overloadpacket.__name__
            if name in SYNC_OPS or (name in ("to", "_to_copy") and _to_host(func, args, kwargs)):
                _CACHE[key] = _SPECIAL
                return self._data_op(func, name, args, kwargs)
            if name in VALUE_OPS:
                _CACHE[key] = _SPECIAL
                return self._data_op(func, name, args, kwargs, "kernels")
            if name == "topk":  # the router's choices: drawn, or computed from known scores
                _CACHE[key] = _SPECIAL
                if shadow_of(args[0]) is None:
                    return self._route(func, args, kwargs)
            out, call, aliases = lower(func, args, kwargs)
            hit = _remember(call, aliases, out, ins)
            if _CACHE.get(key) is not _SPECIAL:
                _CACHE[key] = hit
            new = [t for t, o in zip(_outs(out, hit), hit.outs) if o[0] == "new"]
        elif hit.view:
            out = func._op(*args, **kwargs)
            new = ()
        else:
            out, new = _rebuild(hit, ins)
        call = hit.call
        self.events.append(call)
        if self.memory:
            for t in new:
                self.track(t, True)
            if hit.view:
                if hit.single:
                    if isinstance(out, _TENSOR):
                        self.track(out, False)
                else:
                    for t in _outs(out, hit):
                        self.track(t, False)
        if factory or _SHADOWED and _any_shadowed(ins):
            _shadow_op(func, args, kwargs, out, ins)
        return out

    def _host_op(self, func, args, kwargs):
        out = func(*args, **kwargs)
        kind = classify_op(func, args, kwargs, out)
        if kind != "skip":
            self.events.append(Call(kind, func.overloadpacket.__name__))
        return out

    def _data_op(self, func, name, args, kwargs, kind: str = "syncs"):
        """An op whose result sizes what follows: computed on the shadows; on
        the device it is a kernel and (``kind`` syncs) a read the host waits
        for."""
        real = func(*_on_cpu(args, name), **_on_cpu(kwargs, name))
        moved = float(sum(map(_nbytes, _tensors(args))))
        self.events.append(Call(kind, name, (Kernel("copy", 0.0, moved),)))
        if name in ("to", "_to_copy"):
            return real  # the host's copy
        out = tree_map(lambda t: _meta_like(t) if isinstance(t, torch.Tensor) else t, real)
        for m, r in zip(tree_flatten(out)[0], tree_flatten(real)[0]):
            if isinstance(m, torch.Tensor):
                set_shadow(m, r)
                self.track(m, True)
        return out

    def _route(self, func, args, kwargs):
        out, call, _ = lower(func, args, kwargs)
        self.events.append(call)
        scores, k = args[0], args[1]
        self.draw_picks(out[1], math.prod(scores.shape[:-1]), scores.shape[-1], k)
        for t in out:
            self.track(t, True)
        return out

    def draw_picks(self, experts: torch.Tensor, rows: int, n_experts: int, k: int) -> None:
        """Hold a router's picks ``experts [rows, k]`` (a meta tensor) as drawn
        by :class:`Routing`: what sizes the expert work that reads them."""
        set_shadow(experts, self.routing.draw(rows, n_experts, k).view(experts.shape))


def _meta_factory(kwargs) -> bool:
    dev = kwargs.get("device")
    return dev is not None and (dev if type(dev) is torch.device else torch.device(dev)).type \
        == "meta"


def _to_host(func, args, kwargs) -> bool:
    dev = named_args(func, args, kwargs).get("device")
    return dev is not None and torch.device(dev).type == "cpu"


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


def _on_cpu(x, what: str):
    """``x`` with each meta tensor replaced by its shadow (and ``device=meta``
    by the CPU)."""
    def cpu(v):
        if _is_meta(v):
            s = shadow_of(v)
            if s is None:
                raise RuntimeError(
                    f"the recorder cannot run {what}: it reads a value computed on the device "
                    f"(shape {tuple(v.shape)}, {v.dtype}) that the recorder does not hold")
            return s
        if isinstance(v, torch.device) and v.type == "meta":
            return torch.device("cpu")
        return v

    return tree_map(cpu, x)


def _flat(out) -> list:
    """The tensors an op returned (a tensor, or a tuple or list of them)."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for t in out if isinstance(t, torch.Tensor)] if isinstance(out, (tuple, list)) \
        else []


def _shadow_op(func, args, kwargs, out, ins: list) -> None:
    """Give ``out``'s small integer tensors their values, computed on CPU from
    the inputs' shadows (in place for an op that writes its input); ``ins``:
    the op's tensor arguments."""
    if not any(t.is_meta and t.dtype in _INTEGRAL and t.numel() <= SHADOW_MAX
               for t in _flat(out)):
        return
    if any(t.is_meta and "_shadow" not in t.__dict__ for t in ins):
        return  # computed from a value not known here
    name = func.overloadpacket.__name__
    # The inputs' shadows as they are now (not the meta tensors: the recorder
    # follows their lifetimes), read when an output's value is asked for.
    held = tree_map(lambda v: v.__dict__["_shadow"] if _is_meta(v) else v, (args, kwargs))
    outputs = _Lazy(lambda: tree_flatten(_run_on_cpu(func, name, *_resolved(held)))[0])
    if func._schema.is_mutable:
        outputs.get()  # it writes an input, whose shadow others may hold: now
    for i, m in enumerate(tree_flatten(out)[0]):
        if _is_meta(m) and m.dtype in _INTEGRAL:
            set_shadow(m, _Lazy(lambda i=i: outputs.get()[i]))


def _resolved(held):
    """Held shadows with the lazy ones computed, and meta devices as the CPU."""
    def value(v):
        if type(v) is _Lazy:
            return v.get()
        if isinstance(v, torch.device) and v.type == "meta":
            return torch.device("cpu")
        return v

    return tree_map(value, held)


def _run_on_cpu(func, name: str, args, kwargs):
    if (name == "argsort" and len(args) == 1 and args[0].dim() == 1
            and args[0].dtype in _INTEGRAL and not kwargs.get("descending")):
        # A stable sort of small integer keys (the router's experts), as one
        # sort of distinct keys: CPU's stable argsort is slow on some orders.
        key = args[0].long()
        n = key.numel()
        return torch.sort((key - key.min()) * n + torch.arange(n)).indices if n else key
    return func(*args, **kwargs)


def _remember(call: Call, aliases: bool, out, ins: list) -> _Cached:
    if aliases:
        return _Cached(call, True, single=isinstance(out, torch.Tensor))
    single = not isinstance(out, (tuple, list))
    outs = []
    for t in ((out,) if single else out):
        if isinstance(t, torch.Tensor):
            i = next((j for j, a in enumerate(ins) if a is t), None)
            outs.append(("arg", i) if i is not None else ("new", t.shape, t.stride(), t.dtype))
        else:
            outs.append(("value", t))
    fresh = outs[0][1:] if single and outs[0][0] == "new" else None
    return _Cached(call, False, tuple(outs), single, fresh)


def _outs(out, hit: _Cached) -> list:
    """The tensors an op returned."""
    if hit.single:
        return [out] if isinstance(out, torch.Tensor) else []
    return [t for t in out if isinstance(t, torch.Tensor)]


def _rebuild(hit: _Cached, ins: list):
    """(the outputs of a cached op, the tensors among them it made)."""
    leaves, new = [], []
    for o in hit.outs:
        if o[0] == "arg":
            leaves.append(ins[o[1]])
        elif o[0] == "new":
            t = torch.empty_strided(o[1], o[2], dtype=o[3], device=_META)
            leaves.append(t)
            new.append(t)
        else:
            leaves.append(o[1])
    return (leaves[0] if hit.single else tuple(leaves)), new


