"""What a step does, as the code does it: every host call, device kernel and
collective of one rank's step, recorded while the step runs on ``meta``
tensors (shapes, no data) along the code's GPU branches.

:class:`Recorder` is a ``TorchDispatchMode``. Each aten op the Python code
calls (inference mode: composite ops such as ``linear`` or
``scaled_dot_product_attention`` arrive whole, as a host call) becomes a
:class:`Call`; the device kernels it launches come from its decomposition
on ``meta`` (a composite op is decomposed down to the ops that run), each a
:class:`Kernel` with its FLOPs, bytes and shape class. What exists only on
GPUs is recorded as the GPU runs it: ``Tensor.is_cuda`` answers True for
meta tensors (the code picks its fused paths by it), Triton kernels load as
recording stand-ins (``model.kernels.LOAD_HOOK``: one kernel, the bytes of
its tensor arguments), and scaled-dot-product attention takes the backend
an sm90 GPU would (:func:`sdp_backend`). nn.Module calls and the
collectives of a recording :class:`~shardwise.parallel.comm.Comm`
(:mod:`.record`) join the same event list.

Data that sizes work (MoE routing, a position held in a device tensor) is
kept beside its meta tensor: integer tensors small enough are also computed
on CPU (their *shadow*), so ``nonzero``, ``.item()`` or a read to the host
answer as on a GPU. A router's ``topk`` draws its choices uniformly, seeded
per call (every rank draws the same), skewed where a measured balance is
given (:class:`Routing`).

Ops are cached by their inputs' shapes: a layer repeated, a rank like
another, the next plan with the same local shapes cost a dict lookup.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

aten = torch.ops.aten

# Host calls by kind, as a run counts them (shardwise.perf.counting.CallCounter):
# ops that launch device work, ops that launch none (views, allocations),
# device-to-host reads, nn.Module calls, Triton launches, and collectives.
CALL_KINDS = ("kernels", "metas", "modules", "syncs", "all_reduce", "all_gather",
              "reduce_scatter", "all_to_all", "p2p", "broadcast", "barrier", "gemms", "attns",
              "tritons")
# Kernel calls also counted as GEMMs; attentions are calls whose name holds
# "scaled_dot_product" or "attention".
GEMM_OPS = {"linear", "matmul", "mm", "addmm", "bmm", "baddbmm", "_addmm_activation"}
# Ops whose result the host waits for (the value sizes what follows).
SYNC_OPS = {"nonzero", "nonzero_numpy", "nonzero_static", "item", "_local_scalar_dense",
            "masked_select", "unique", "_unique", "_unique2", "unique_consecutive",
            "unique_dim"}
# Ops that allocate without launching a kernel.
ALLOC_OPS = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"}


def is_attention(name: str) -> bool:
    return "scaled_dot_product" in name or "attention" in name


def host_kind(kind: str, name: str) -> str:
    """The profile's host figure a call costs: ``gemm``, ``attn``, ``op`` (other
    launching ops), ``triton``, ``view``, ``module`` or ``sync``."""
    if kind == "kernels":
        return "gemm" if name in GEMM_OPS else "attn" if is_attention(name) else "op"
    return {"metas": "view", "modules": "module", "syncs": "sync", "tritons": "triton"}[kind]


# -- events -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Kernel:
    """One device kernel: ``cls`` is its shape class (``gemm`` dims (batch, m,
    k, n); ``attention`` dims (backend, B, H, T, S, d, causal, masked);
    ``index_write`` and ``copy`` bytes only; ``triton`` dims (name, rows,
    width)), ``flops`` the model FLOPs, ``bytes`` read plus written."""

    cls: str
    flops: float
    bytes: float
    dims: tuple = ()
    dtype: str = ""


@dataclass(frozen=True, slots=True)
class Call:
    """One host call: its kind (:data:`CALL_KINDS`' first five), its name and
    the kernels it launches on the device (none for a CPU tensor's op)."""

    kind: str
    name: str
    kernels: tuple = ()

    @property
    def host(self) -> str:
        return host_kind(self.kind, self.name)


@dataclass(slots=True)
class Coll:
    """A collective call: ``op`` (all_reduce, all_gather, reduce_scatter,
    all_to_all, broadcast, p2p), the global ``ranks`` of its group, the bytes
    Comm counts, ``handle`` (None: blocking; else the request a Wait names),
    for p2p the ``sends`` and ``recvs`` as (peer, bytes), ``fused``: the
    all-reduce, residual add and norm in one kernel."""

    op: str
    axis: str
    ranks: tuple
    bytes: int
    handle: int | None = None
    sends: tuple = ()
    recvs: tuple = ()
    fused: bool = False


@dataclass(frozen=True, slots=True)
class Wait:
    handle: int


@dataclass(slots=True)
class Repeat:
    """A layer loop's regular iteration ``body``, run ``times`` times. ``carry``
    maps a request waited in the body but made before it to the body's own
    request that takes its place in the next iteration."""

    body: list
    times: int
    carry: dict = field(default_factory=dict)


# -- the GPU's choices --------------------------------------------------------------

_HALF = (torch.float16, torch.bfloat16)


def named_args(func, args, kwargs) -> dict:
    """An op's arguments by their schema names."""
    out = {a.name: v for a, v in zip(func._schema.arguments, args)}
    out.update(kwargs)
    return out


def sdp_backend(q, k, attn_mask, is_causal: bool, enable_gqa: bool) -> str:
    """The kernel ``scaled_dot_product_attention`` runs on an sm90 GPU under
    torch 2.11 (as traced there), within what ``sdpa_kernel`` leaves on:
    cuDNN for half precision, head_dim <= 128, no mask and equal head counts;
    else FlashAttention-2 (half precision, head_dim <= 256, no mask, a causal
    mask only when square); else the memory-efficient kernel (head_dim a
    multiple of 8, 4 in float32); else the math path."""
    half, d, T, S = q.dtype in _HALF, q.shape[-1], q.shape[-2], k.shape[-2]
    b = torch.backends.cuda
    if (b.cudnn_sdp_enabled() and half and d <= 128 and d % 8 == 0 and attn_mask is None
            and not enable_gqa and S > 1):
        return "cudnn"
    if (b.flash_sdp_enabled() and half and d <= 256 and d % 8 == 0 and attn_mask is None
            and (not is_causal or T == S)):
        return "flash"
    if b.mem_efficient_sdp_enabled() and d % (8 if half else 4) == 0:
        return "efficient"
    return "math"


def _sdp_flags() -> tuple:
    b = torch.backends.cuda
    return (b.cudnn_sdp_enabled(), b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled())


def gpu_sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
             enable_gqa=False):
    """``scaled_dot_product_attention`` lowered as a GPU lowers it (on meta,
    under a mode that collects the kernels): the backend :func:`sdp_backend`
    picks; for the kernels that take an additive bias, a boolean mask turned
    into one and a bias whose rows are not 16-element aligned padded."""
    backend = sdp_backend(query, key, attn_mask, is_causal, enable_gqa)
    if backend == "math":
        return aten.scaled_dot_product_attention.default.decompose(
            query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
    if backend == "flash":
        return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal,
                                                        False, scale=scale)[0]
    bias = attn_mask
    if bias is not None:
        if bias.dtype == torch.bool:
            bias = torch.where(bias.logical_not(), float("-inf"), 0.0).to(query.dtype)
        S = key.shape[-2]
        if S % 16:
            bias = aten.constant_pad_nd(bias, [0, 16 - S % 16])[..., :S]
        bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], S)
    if backend == "efficient":
        return aten._scaled_dot_product_efficient_attention(query, key, value, bias, False,
                                                            dropout_p, is_causal, scale=scale)[0]
    return aten._scaled_dot_product_cudnn_attention(query, key, value, bias, False, dropout_p,
                                                    is_causal, False, scale=scale)[0]


# -- what a kernel moves ------------------------------------------------------------

_ATTENTION = {"_scaled_dot_product_flash_attention": "flash",
              "_scaled_dot_product_efficient_attention": "efficient",
              "_scaled_dot_product_cudnn_attention": "cudnn"}
_GEMMS = {"mm": ("self", "mat2"), "addmm": ("mat1", "mat2"), "_addmm_activation": ("mat1", "mat2"),
          "bmm": ("self", "mat2"), "baddbmm": ("batch1", "batch2"), "mv": ("self", "vec"),
          "addmv": ("mat", "vec")}
# Writes at indices: the source rows, read and written (not the whole destination).
_INDEX_WRITES = {"index_copy_", "index_copy", "index_put_", "index_put", "_index_put_impl_",
                 "scatter_", "scatter", "scatter_add_", "scatter_add", "index_add_",
                 "index_add"}
# Reads at indices: the rows gathered, read and written (not the whole source).
_GATHERS = {"index_select", "index", "gather", "embedding", "take"}


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _dt(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _tensors(x) -> list:
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


def leaf_kernel(func, args, kwargs, out) -> Kernel | None:
    """The kernel a non-composite op on meta tensors launches, or None (a view,
    an allocation, nothing on the device)."""
    name = func.overloadpacket.__name__
    schema = func._schema
    outs = _tensors(out)
    if name in ALLOC_OPS or name == "detach_" or (not schema.is_mutable and (
            not outs or any(r.alias_info is not None for r in schema.returns)
            or {_storage(t) for t in outs} <= {_storage(t) for t in _tensors((args, kwargs))})):
        return None  # an allocation, or a view (by its schema or by its storage)
    a = named_args(func, args, kwargs)
    if name in _GEMMS:
        x, w = (a[n] for n in _GEMMS[name])
        batch = x.shape[0] if x.dim() == 3 else 1
        m, k = x.shape[-2], x.shape[-1]
        n = w.shape[-1] if w.dim() > 1 else 1
        moved = _nbytes(x) + _nbytes(w) + _nbytes(a.get("self") if "mat1" in a or "batch1" in a
                                                   else None) + _nbytes(outs[0])
        return Kernel("gemm", 2.0 * batch * m * k * n, float(moved), (batch, m, k, n), _dt(x))
    if name in _ATTENTION:
        q, k, bias = a["query"], a["key"], a.get("attn_bias")
        B, H, T, d = q.shape
        S = k.shape[2]
        causal = bool(a.get("is_causal", False))
        pairs = T * (T + 1) / 2 + T * (S - T) if causal else T * S
        moved = sum(_nbytes(a[n]) for n in ("query", "key", "value")) + _nbytes(bias)
        return Kernel("attention", 4.0 * B * H * d * pairs, float(moved + _nbytes(outs[0])),
                      (_ATTENTION[name], B, H, T, S, d, causal, bias is not None), _dt(q))
    if name in _INDEX_WRITES:
        src = a.get("source", a.get("src", a.get("values")))
        moved = 2 * _nbytes(src) if isinstance(src, torch.Tensor) else 2 * _nbytes(a.get("index"))
        return Kernel("index_write", 0.0, float(moved), (), _dt(a["self"]))
    if name in _GATHERS:
        return Kernel("copy", 0.0, 2.0 * _nbytes(outs[0]), (), _dt(outs[0]))
    writes = {id(t) for t in outs}
    reads = [t for t in _tensors((args, kwargs)) if id(t) not in writes]
    moved = sum(map(_nbytes, reads)) + sum(map(_nbytes, outs))
    return Kernel("copy", float(max(t.numel() for t in outs)), float(moved), (),
                  _dt(outs[0]))


def classify_op(func, args, kwargs, out) -> str:
    """A call on real tensors by what it did: ``kernels`` (it wrote an input or
    made a tensor sharing no input's storage), ``metas`` (views, reshapes
    without a copy, allocations, no tensor made), ``syncs`` (a read the host
    waits for: nonzero, item, a copy to the CPU) or ``skip`` (c10d's own ops,
    counted as collectives)."""
    if func.namespace in ("c10d", "_c10d_functional", "symm_mem"):
        return "skip"
    name = func.overloadpacket.__name__
    if name in SYNC_OPS:
        return "syncs"
    if name in ("to", "_to_copy") and str(kwargs.get("device", "")).startswith("cpu"):
        return "syncs"  # .cpu(): a device-to-host copy the host waits for
    if func._schema.is_mutable:
        return "kernels"
    if name in ALLOC_OPS:
        return "metas"
    outs = _tensors(out)
    if not outs:
        return "metas"  # e.g. promote_types: host work only
    ins = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))
           if t.device.type != "meta"}
    if all(t.untyped_storage().data_ptr() in ins for t in outs):
        return "metas"
    return "kernels"


# -- the router's choices -----------------------------------------------------------

@dataclass
class Routing:
    """Top-k choices drawn for a router whose scores the recorder cannot know:
    each token picks ``k`` distinct experts uniformly, seeded per call (so
    every rank of a step draws the same), or, with ``balance`` (the busiest
    of ``groups`` equal groups of experts over the mean, as a run measured
    it), the first group weighted to take that share."""

    balance: float | None = None
    groups: int = 1
    calls: int = 0

    MAX_DRAWN = 1 << 18  # rows drawn; a longer call repeats them

    def draw(self, rows: int, experts: int, k: int) -> torch.Tensor:
        self.calls += 1
        g = torch.Generator().manual_seed(1000003 * self.calls + 7919 * experts + k)
        n = max(1, min(rows, self.MAX_DRAWN))
        w = torch.ones(experts)
        size = experts // max(self.groups, 1)
        if self.balance and self.groups > 1 and size and self.balance * size < experts:
            # the first group's share, s G / (s G + E - G), is balance x G / E
            w[:size] = self.balance * (experts - size) / (experts - self.balance * size)
        keys = torch.rand(n, experts, generator=g).log() / w  # Gumbel top-k with weights w
        idx = keys.topk(k, dim=-1).indices
        return idx.repeat(-(-rows // n), 1)[:rows] if n < rows else idx


# -- the recorder -------------------------------------------------------------------

SHADOW_MAX = 1 << 24  # elements of an integer tensor computed on CPU beside its meta one
_INTEGRAL = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
_CACHE: dict = {}  # (op, input signature) -> _Cached
_SDPA = aten.scaled_dot_product_attention.default


@dataclass(slots=True)
class _Cached:
    call: Call | None  # None: the op runs every time (it returns a view)
    outs: tuple = ()  # per output leaf: ("arg", i) | ("new", size, stride, dtype) | ("value", v)
    spec: object = None


def _sig(x):
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), x.stride(), x.dtype, x.device.type)
    if isinstance(x, (list, tuple)):
        return tuple(_sig(v) for v in x)
    return x


def _shadow(t):
    return t.__dict__.get("_shadow") if isinstance(t, torch.Tensor) else None


def _is_meta(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_meta


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class Recorder(TorchDispatchMode):
    """Records every call of the code into :attr:`events` while active;
    ``events`` also takes :class:`Coll` and :class:`Wait` from the recording
    Comm and :class:`Repeat` from layer loops (:mod:`.record`). ``peak``: the
    most bytes the step's own tensors held at once."""

    def __init__(self, routing: Routing | None = None):
        super().__init__()
        self.routing = routing or Routing()
        self.events: list = []
        self._stack: list = []
        self.handles = 0
        self.live = self.peak = 0
        self._storages: dict = {}  # storage id -> [tensors alive, bytes]

    # -- loops and requests (the recording Comm and layer lists call these) --
    def begin_loop(self) -> None:
        self._stack.append(self.events)
        self.events = []

    def end_loop(self, times: int) -> None:
        body, self.events = self.events, self._stack.pop()
        self.events.append(Repeat(body, times, _carry(body)))

    def new_handle(self) -> int:
        self.handles += 1
        return self.handles

    # -- memory -------------------------------------------------------------
    def _track(self, t: torch.Tensor, new: bool) -> None:
        key = _storage(t)
        entry = self._storages.get(key)
        if entry is None:
            if not new:
                return  # a view of a tensor made before the step (weights, caches)
            entry = self._storages[key] = [0, t.untyped_storage().nbytes()]
            self.live += entry[1]
            self.peak = max(self.peak, self.live)
        entry[0] += 1
        weakref.finalize(t, self._release, key)

    def _release(self, key) -> None:
        entry = self._storages.get(key)
        if entry is not None:
            entry[0] -= 1
            if entry[0] == 0:
                self.live -= entry[1]
                del self._storages[key]

    # -- ops ----------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        factory = _meta_factory(kwargs)
        if not factory and not any(_is_meta(t) for t in tree_flatten((args, kwargs))[0]):
            return self._host_op(func, name, args, kwargs)  # a table on the host: CPU work
        if name in SYNC_OPS or (name in ("to", "_to_copy") and _to_host(func, args, kwargs)):
            return self._data_op(func, name, args, kwargs)
        if name == "topk" and _shadow(args[0]) is None:
            return self._route(func, args, kwargs)
        key = (func, _sig(args), _sig(tuple(sorted(kwargs.items()))))
        if func is _SDPA:
            key += _sdp_flags()
        hit = _CACHE.get(key)
        if hit is not None and hit.call is not None:
            out, call = _rebuild(hit, args), hit.call
        else:
            out, call, aliases = _run(func, args, kwargs)
            if hit is None:
                _CACHE[key] = _Cached(None) if aliases else _remember(call, out, args)
        self.events.append(call)
        ins = _tensors((args, kwargs))
        stores = {_storage(t) for t in ins}
        for t in _tensors(out):
            if t.is_meta and all(t is not i for i in ins):
                self._track(t, _storage(t) not in stores)
        if factory or any(_shadow(t) is not None for t in ins):
            _shadow_op(func, args, kwargs, out)
        return out

    def _host_op(self, func, name, args, kwargs):
        out = func(*args, **kwargs)
        kind = classify_op(func, args, kwargs, out)
        if kind != "skip":
            self.events.append(Call(kind, name))
        return out

    def _data_op(self, func, name, args, kwargs):
        """An op whose result sizes what follows: computed on the shadows; on
        the device it is a kernel and a read the host waits for."""
        real = func(*_on_cpu(args, name), **_on_cpu(kwargs, name))
        moved = float(sum(map(_nbytes, _tensors(args))))
        self.events.append(Call("syncs", name, (Kernel("copy", 0.0, moved),)))
        if name in ("to", "_to_copy"):
            return real  # the host's copy
        out = tree_map(lambda t: _meta_like(t) if isinstance(t, torch.Tensor) else t, real)
        for m, r in zip(tree_flatten(out)[0], tree_flatten(real)[0]):
            if isinstance(m, torch.Tensor):
                m._shadow = r
                self._track(m, True)
        return out

    def _route(self, func, args, kwargs):
        out, call, _ = _run(func, args, kwargs)
        self.events.append(call)
        scores, k = args[0], args[1]
        idx = self.routing.draw(math.prod(scores.shape[:-1]), scores.shape[-1], k)
        out[1]._shadow = idx.view(out[1].shape)
        for t in out:
            self._track(t, True)
        return out


def _meta_factory(kwargs) -> bool:
    dev = kwargs.get("device")
    return dev is not None and torch.device(dev).type == "meta"


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
            s = _shadow(v)
            if s is None:
                raise RuntimeError(
                    f"the recorder cannot run {what}: it reads a value computed on the device "
                    f"(shape {tuple(v.shape)}, {v.dtype}) that the recorder does not hold")
            return s
        if isinstance(v, torch.device) and v.type == "meta":
            return torch.device("cpu")
        return v

    return tree_map(cpu, x)


def _shadow_op(func, args, kwargs, out) -> None:
    """Give ``out``'s small integer tensors their values, computed on CPU from
    the inputs' shadows (in place for an op that writes its input)."""
    outs = [t for t in _tensors(out) if t.is_meta]
    if not any(t.dtype in _INTEGRAL and t.numel() <= SHADOW_MAX for t in outs):
        return
    if any(_is_meta(t) and _shadow(t) is None for t in tree_flatten((args, kwargs))[0]):
        return  # computed from a value not known here
    name = func.overloadpacket.__name__
    real = func(*_on_cpu(args, name), **_on_cpu(kwargs, name))
    for m, r in zip(tree_flatten(out)[0], tree_flatten(real)[0]):
        if _is_meta(m) and isinstance(r, torch.Tensor) and r.dtype in _INTEGRAL:
            m._shadow = r


class _Leaves(TorchDispatchMode):
    """Collects the kernels an op launches: its decomposition down to ops with
    kernels of their own (attention lowered as the GPU lowers it)."""

    def __init__(self):
        super().__init__()
        self.kernels: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            with self:
                return gpu_sdpa(*args, **kwargs)
        if _composite(func):
            with self:
                return func.decompose(*args, **kwargs)
        out = func(*args, **kwargs)
        k = leaf_kernel(func, args, kwargs, out)
        if k is not None:
            self.kernels.append(k)
        return out


def _composite(func) -> bool:
    return torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), "CompositeImplicitAutograd")


def _run(func, args, kwargs):
    """(output, Call, whether an output aliases an input) of ``func`` run on meta."""
    name = func.overloadpacket.__name__
    with _Leaves() as leaves:
        out = func(*args, **kwargs)
    kernels = tuple(leaves.kernels)
    ins = {_storage(t) for t in _tensors((args, kwargs))}
    aliases = any(_storage(t) in ins for t in _tensors(out))
    mutable = func._schema.is_mutable
    kind = "kernels" if kernels or (mutable and _tensors(out)) else "metas"
    return out, Call(kind, name, kernels), aliases and not mutable


def _remember(call: Call, out, args) -> _Cached:
    leaves, spec = tree_flatten(out)
    ins = tree_flatten(args)[0]
    outs = []
    for t in leaves:
        if isinstance(t, torch.Tensor):
            i = next((j for j, a in enumerate(ins) if a is t), None)
            outs.append(("arg", i) if i is not None else ("new", tuple(t.shape), t.stride(),
                                                          t.dtype))
        else:
            outs.append(("value", t))
    return _Cached(call, tuple(outs), spec)


def _rebuild(hit: _Cached, args):
    ins = tree_flatten(args)[0]
    leaves = []
    for o in hit.outs:
        if o[0] == "arg":
            leaves.append(ins[o[1]])
        elif o[0] == "new":
            leaves.append(torch.empty_strided(o[1], o[2], dtype=o[3], device="meta"))
        else:
            leaves.append(o[1])
    return tree_unflatten(leaves, hit.spec)


def _carry(body: list) -> dict:
    """Requests waited in a loop body but made before it, paired in order with
    the body's requests not waited in it: the next iteration waits on those."""
    made, waited_outside, escaping = set(), [], []
    for e in body:
        if isinstance(e, Coll) and e.handle is not None:
            made.add(e.handle)
            escaping.append(e.handle)
        elif isinstance(e, Wait):
            if e.handle in made:
                if e.handle in escaping:
                    escaping.remove(e.handle)
            else:
                waited_outside.append(e.handle)
    return dict(zip(waited_outside, escaping)) if len(waited_outside) == len(escaping) else {}


# -- counts -------------------------------------------------------------------------

def expand(events: list, times: int = 1):
    """(event, multiplicity) of every event, loops unrolled as counts."""
    for e in events:
        if isinstance(e, Repeat):
            yield from expand(e.body, times * e.times)
        else:
            yield e, times


def call_counts(events: list) -> dict[str, int]:
    """Host calls by :data:`CALL_KINDS`, as CallCounter counts a run."""
    out = dict.fromkeys(CALL_KINDS, 0)
    for e, n in expand(events):
        if isinstance(e, Call):
            out[e.kind] += n
            if e.kind == "kernels" and e.name in GEMM_OPS:
                out["gemms"] += n
            elif e.kind == "kernels" and is_attention(e.name):
                out["attns"] += n
        elif isinstance(e, Coll):
            out["tritons" if e.fused else e.op] += n
    return out


def comm_counts(events: list) -> dict[str, dict[str, int]]:
    """Calls and bytes per ``op/axis`` key, as Comm.snapshot() counts a run."""
    out: dict = {}
    for e, n in expand(events):
        if not isinstance(e, Coll):
            continue
        if e.op == "p2p":
            for _, nbytes in e.sends:
                s = out.setdefault(f"send/{e.axis}", {"calls": 0, "bytes": 0})
                s["calls"] += n
                s["bytes"] += n * nbytes
            continue
        s = out.setdefault(f"{e.op}/{e.axis}", {"calls": 0, "bytes": 0})
        s["calls"] += n
        s["bytes"] += n * e.bytes
    return dict(sorted(out.items()))
