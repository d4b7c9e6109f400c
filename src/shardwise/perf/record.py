"""Record each rank's steps of a plan by running the strategy's own code
without processes, devices or weights.

:func:`record_rank` builds rank r's shard exactly as a run does
(``validate_plan``, the strategy class with its Comm and ShardLoader) but
on ``meta`` tensors: weights from :class:`MetaSource` (shapes only), KV
caches allocated on meta, collectives through :class:`RecordingComm` (the
real Comm with its transport replaced: each call is recorded, with its group
and bytes, and whether it is issued asynchronously). It then runs, as
``shardwise bench`` does, a prefill, an eager decode step and, where the
strategy supports it, the static-shape decode step a CUDA graph captures,
under a :class:`~shardwise.perf.trace.Recorder`, each at its first call:
what the code makes at a first call and keeps (``once.made_once``: a
table, a symmetric buffer) is made aside from the step, so that it records
what a later call, the one a run times, does. A step whose routers draw
choices is recorded as a second call draws them, where a first call left
off: a router draws once a call whatever it picks, so a step draws as many
times at any point of the draws, and the step is run once, from as many
draws on as the last recording of that step made (the plan's, else any),
and again only where it drew another number.

A layer loop (an ``nn.ModuleList`` of three or more modules of one kind,
iterated) runs its first two iterations: the first may differ (it builds the
step's shared index tensors, it has no residual pending), the second is
recorded as the body of a :class:`~shardwise.perf.trace.Repeat` taken as
many times as the loop has regular layers. A 126-layer model records two
layers.

Recordings are kept per (model, workload, plan, world size, rank, backend,
routing balance): a planner asking for hundreds of plans records each rank
once; and on disk (:mod:`.tracecache`), so that the next process reads them
back (:mod:`.recordings`, which imports no torch) instead of recording them
again.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from ..model import kernels as model_kernels
from ..model import once, reference
from ..model.load import ShardLoader
from ..model.weights import Rows, WeightSource, layer_param_table, param_table
from ..parallel import base as parallel_base
from ..parallel import reduce_norm
from ..parallel.registry import validate_plan
from ..parallel.comm import Comm
from ..spec import ModelSpec, Plan, Workload, torch_dtype
from . import tracecache
from .events import Call, Coll, Wait
from .recordings import (PHASES, RankTrace, StepTrace, checked, read_alone, recording_key,
                         renamed, twins, with_twins)
from .shortcuts import batch_views, building
from .trace import Recorder, Routing, no_modes, set_shadow, shadow_of
from .tritons import TritonShim, stand_in

_ACTIVE: Recorder | None = None  # the recorder of the step being run


# -- weights of shape only ------------------------------------------------------------

class MetaSource(WeightSource):
    """The synthetic weights' names and shapes, handed out as meta tensors."""

    def __init__(self, spec: ModelSpec):
        self.spec, self.seed = spec, 0
        self._ends = param_table(spec.replace(n_layers=1))

    @functools.cached_property
    def table(self) -> dict:  # every layer's names (the loader asks for one at a time)
        return param_table(self.spec)

    def _info(self, name: str):
        if name.startswith("layers."):
            layer = int(name.split(".")[1])
            return layer_param_table(self.spec, layer)[name]
        return self._ends[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._info(name).shape

    def get(self, name, index=None, *, dtype, device):  # made with no mode (building)
        shape = list(self._info(name).shape)
        for dim, sel in enumerate(index or []):
            if sel is None:
                continue
            shape[dim] = (len(range(shape[dim])[sel]) if isinstance(sel, slice)
                          else torch.as_tensor(sel).numel())
        return torch.empty(shape, dtype=dtype, device="meta")


# -- collectives, recorded ------------------------------------------------------------

class _Group:
    """What ``Topology.group(axis)`` stands for while recording: the axis and
    its global ranks."""

    def __init__(self, axis: str, ranks):
        self.axis, self.ranks, self.group_name = axis, tuple(ranks), axis


class _Mesh:
    """What the DeviceMesh stands for while recording: ``get_group(axis)``
    for an axis, and (``span``) the group ``Topology.build`` flattens a span
    of axes into."""

    def __init__(self, topo, span: tuple[str, ...] = ()):
        self.topo, self.span = topo, span

    def get_group(self, axis: str | None = None) -> _Group:
        if self.span:
            return _Group(self.topo.axis_key(self.span), self.topo.group_ranks(self.span))
        return _Group(axis, self.topo.group_ranks(axis))


class _Request:
    """A request of an asynchronous collective: waiting on it is recorded. It
    holds the tensors it sends, as a real request does until it completes."""

    def __init__(self, handle: int, tensors: tuple = ()):
        self.handle, self.tensors = handle, tensors

    def wait(self, *args, **kwargs):
        if _ACTIVE is not None:
            _ACTIVE.events.append(Wait(self.handle))
        return True

    def is_completed(self) -> bool:
        return True


class RecordingComm(Comm):
    """:class:`~shardwise.parallel.comm.Comm` whose transport records instead of
    sending: every collective becomes a :class:`~shardwise.perf.trace.Coll`
    of the active recorder. ``one_shot``: whether small all-reduces take the
    symmetric-memory path (a GPU run on NCCL) or not (gloo).
    ``symmetric_bytes``: the symmetric-memory buffers it would hold."""

    def __init__(self, topo, one_shot: bool):
        super().__init__(topo)
        self.one_shot = one_shot
        self.symmetric_bytes = 0
        self._axis = ""  # of the collective being called (Comm._count names it)

    def _count(self, op: str, axis: str, nbytes: int) -> str:
        self._axis = axis
        return super()._count(op, axis, nbytes)

    def _group(self, group) -> _Group:
        return group if group is not None else _Group("world", range(self.topo.world_size))

    def _emit(self, op: str, group, nbytes: int, async_op: bool = False, **kw):
        if _ACTIVE is None:
            return None
        g = self._group(group)
        handle = _ACTIVE.new_handle() if async_op else None
        _ACTIVE.events.append(Coll(op, g.axis, g.ranks, int(nbytes), handle, **kw))
        return _Request(handle) if async_op else None

    def _reduce(self, t, group, async_op: bool = False):
        return self._emit("all_reduce", group, t.nbytes, async_op)

    def _one_shot(self, buf, t, axis: str):
        self._emit("all_reduce", self.topo.group(axis), t.nbytes)

    def _gather(self, out, t, group):
        s = shadow_of(t)
        if s is not None:  # every rank of the group taken to hold what this one holds
            set_shadow(out, torch.cat([s] * (out.shape[0] // max(t.shape[0], 1))))
        return self._emit("all_gather", group, out.nbytes)

    def _scatter(self, out, t, group):
        return self._emit("reduce_scatter", group, t.nbytes)

    def _swap(self, out, t, out_splits, in_splits, group, async_op: bool = False):
        return self._emit("all_to_all", group, t.nbytes, async_op)

    def _p2p(self, sends, recvs) -> list:
        axis = self._axis if sends else "recv"
        self._axis = ""
        if _ACTIVE is None:
            return [_Request(0)] * (len(sends) + len(recvs))
        handle = _ACTIVE.new_handle()
        _ACTIVE.events.append(Coll("p2p", axis, (), sum(t.nbytes for t, _ in sends), handle,
                                   tuple((p, t.nbytes) for t, p in sends),
                                   tuple((p, t.nbytes) for t, p in recvs)))
        return [_Request(handle, tuple(t for t, _ in sends))] * (len(sends) + len(recvs))

    def _broadcast(self, t, src: int):
        return self._emit("broadcast", None, t.nbytes)

    def _barrier(self):
        return None

    def _symmetric_buffer(self, t, axis: str):
        self.symmetric_bytes += t.nbytes
        with once.made_once():  # kept for every later call with its shape
            return torch.empty(t.shape, dtype=t.dtype, device="meta")

    def _reduce_norm_kernel(self, axis: str, device):
        return _FusedReduceNorm(self, axis)


class _FusedReduceNorm:
    """The one-kernel all-reduce + add + norm
    (:class:`~shardwise.parallel.reduce_norm.FusedReduceNorm`) as recorded: its
    two outputs and one collective kernel; its symmetric buffers counted."""

    def __init__(self, comm: RecordingComm, axis: str):
        self.comm, self.axis, self.made = comm, axis, set()
        world = comm.topo.size(axis)
        comm.symmetric_bytes += world * reduce_norm.MAX_ROWS * 4  # the flags

    def ready(self, dtype, d: int) -> bool:
        if (dtype, d) not in self.made:
            self.made.add((dtype, d))
            self.comm.symmetric_bytes += 2 * reduce_norm.MAX_ROWS * d * dtype.itemsize
        return True

    def __call__(self, p, x, module):
        h = torch.empty_like(x)
        y = torch.empty_like(x) if module is not None else h
        self.comm._emit("all_reduce", self.comm.topo.group(self.axis), p.nbytes, fused=True)
        return h, (y if module is not None else None)


# -- Triton kernels and layer loops, recorded -----------------------------------------

class _Recorded:
    """A Triton kernel as recorded: a launch is one call and the device kernel
    its stand-in describes (:mod:`.tritons`)."""

    def __init__(self, name: str):
        self.stand_in = stand_in(name)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if _ACTIVE is None:
                return
            with no_modes():  # what the stand-in reads is not the step's
                kernel = self.stand_in.kernel(grid, *args, **kwargs)
                self.stand_in.effect(_ACTIVE, grid, *args, **kwargs)
            _ACTIVE.events.append(Call("tritons", self.stand_in.name, (kernel,)))

        return launch


class _LayerList(nn.ModuleList):
    """A ModuleList of layers: while a step is recorded, iterating it yields the
    first layer, then the second as the body of a repeat for every layer
    after the first, and stops (module docstring)."""

    def __iter__(self):
        items = list(self._modules.values())
        rec = _ACTIVE
        if rec is None or len(items) < 3:
            yield from items
            return
        yield items[0]
        rec.begin_loop()
        yield items[1]
        rec.end_loop(len(items) - 1)


def _two_alike(items: list, fn) -> list:
    """``reference.each_alike`` while a plan is recorded: the first item, then
    the second (while a step is recorded, as the body of a repeat taken for
    every later one), whose result stands for the rest. A module standing
    for later layers is noted in ``_STOOD_FOR`` (their weights)."""
    n, rec = len(items), _ACTIVE
    if n < 3:
        return [fn(item) for item in items]
    first = fn(items[0])
    if rec is not None:
        rec.begin_loop()
    second = fn(items[1])
    if rec is not None:
        rec.end_loop(n - 1)
    if isinstance(second, nn.Module):
        _STOOD_FOR.append((second, n - 2))
    return [first] + [second] * (n - 1)


_STOOD_FOR: list = []  # (module, further items it stands for) of the plan being built
# Router draws a step made, by (phase, plan) and by phase: the guess of the
# next recording of that step (module docstring).
_DRAWS: dict = {}


def _same_work(n: int):
    """``reference.same_work`` while a step is recorded: the first iteration,
    as the body of a repeat taken ``n`` times."""
    rec = _ACTIVE
    if rec is None or n < 2:
        yield from range(n)
        return
    rec.begin_loop()
    yield 0
    rec.end_loop(n)


def _micro_batches(ranges, fn, alike) -> list:
    """``base.micro_batched`` while a step is recorded: of each run of
    micro-batches alike (one size, one ``alike``), the first, then the second
    as the body of a repeat taken for the rest; the skipped ones' outputs are
    the second's (the same shape)."""
    kinds = [(b1 - b0, None if alike is None else alike[i])
             for i, (b0, b1) in enumerate(ranges)]
    rec, out, i = _ACTIVE, [], 0
    while i < len(ranges):
        n = _run_length(kinds, i)
        out.append(fn(i, *ranges[i]))
        if n >= 3 and rec is not None:
            rec.begin_loop()
            y = fn(i + 1, *ranges[i + 1])
            rec.end_loop(n - 1)
            out += [y, *_held_like(rec, y, n - 2)]
        else:
            out += [fn(j, *ranges[j]) for j in range(i + 1, i + n)]
        i += n
    return out


def _run_length(kinds: list, i: int) -> int:
    """How many items from ``i`` on are of ``kinds[i]``."""
    return next((j for j in range(i, len(kinds)) if kinds[j] != kinds[i]), len(kinds)) - i


def _alike_steps(kinds: list, fn) -> None:
    """``base.alike_steps`` while a step is recorded: of each run of steps of
    one kind, the first, then the second as the body of a repeat taken for
    the rest, each of whose iterations the schedule plays (``every``)."""
    rec, i = _ACTIVE, 0
    while i < len(kinds):
        n = _run_length(kinds, i)
        fn(i)
        if n >= 3 and rec is not None:
            rec.begin_loop()
            fn(i + 1)
            rec.end_loop(n - 1, every=True)
        else:
            for j in range(i + 1, i + n):
                fn(j)
        i += n


def _held_like(rec: Recorder, y, n: int) -> list:
    """The outputs of ``n`` micro-batches run as a repeat's iterations and kept
    by the caller: one tensor shaped like ``y`` in their place, allocated
    (as all ``n``, for the step's peak) but not recorded as an event."""
    if not isinstance(y, torch.Tensor) or n <= 0:
        return [y] * n
    with no_modes():
        held = torch.empty_like(y)
    rec.track(held, True, n * held.untyped_storage().nbytes())
    return [held] * n


def _layer_lists(model: nn.Module) -> None:
    for m in model.modules():
        kids = list(m._modules.values()) if type(m) is nn.ModuleList else []
        if len(kids) >= 3 and len({type(k) for k in kids}) == 1:
            m.__class__ = _LayerList


@contextmanager
def _gpu_paths():
    """The code's GPU branches, on meta tensors: ``is_cuda`` answers True for
    them, Triton kernels load as recording stand-ins, what a module makes
    once is made aside from the step, and module calls are recorded (a KV
    cache's batch views as :func:`~.shortcuts.batch_views` makes them)."""
    saved_cuda = torch.Tensor.__dict__.get("is_cuda")
    real = torch._C.TensorBase.is_cuda
    saved_hook = model_kernels.LOAD_HOOK
    saved_capturing = torch.cuda.is_current_stream_capturing
    saved = (reference.SAME_WORK, reference.EACH_ALIKE, once.MADE_ONCE,
             parallel_base.RUN_MICRO_BATCHES, parallel_base.RUN_STEPS)
    reference.SAME_WORK, reference.EACH_ALIKE = _same_work, _two_alike
    once.MADE_ONCE = _made_once  # made aside from the step (Recorder.aside)
    parallel_base.RUN_MICRO_BATCHES, parallel_base.RUN_STEPS = _micro_batches, _alike_steps
    torch.Tensor.is_cuda = property(lambda t: t.is_meta or real.__get__(t))
    torch.cuda.is_current_stream_capturing = lambda: False  # on a CPU-only build it raises
    model_kernels.LOAD_HOOK = lambda module, name, loaded: (TritonShim, _Recorded(name))
    batch_view = reference.KVCache.batch_view
    reference.KVCache.batch_view = batch_views(batch_view, lambda: _ACTIVE)

    def module_call(module, args):
        if _ACTIVE is not None:
            _ACTIVE.events.append(Call("modules", type(module).__name__))

    hook = torch.nn.modules.module.register_module_forward_pre_hook(module_call)
    try:
        yield
    finally:
        hook.remove()
        model_kernels.LOAD_HOOK, reference.KVCache.batch_view = saved_hook, batch_view
        torch.cuda.is_current_stream_capturing = saved_capturing
        (reference.SAME_WORK, reference.EACH_ALIKE, once.MADE_ONCE,
         parallel_base.RUN_MICRO_BATCHES, parallel_base.RUN_STEPS) = saved
        if saved_cuda is None:
            del torch.Tensor.is_cuda
        else:
            torch.Tensor.is_cuda = saved_cuda


def _made_once():
    return _ACTIVE.aside() if _ACTIVE is not None else nullcontext()


@contextmanager
def _recording(rec: Recorder):
    global _ACTIVE
    outer, _ACTIVE = _ACTIVE, rec
    try:
        with rec:
            yield rec
    finally:
        _ACTIVE = outer
    while rec._stack:  # a loop left before its second layer ended
        rec.end_loop(1)


# -- one rank -------------------------------------------------------------------------

@functools.lru_cache(maxsize=8192)
def record_rank(spec: ModelSpec, wl: Workload, plan: Plan, world: int, rank: int,
                backend: str = "nccl", balance: float | None = None,
                phases: tuple = PHASES) -> RankTrace:
    """Rank ``rank`` of ``plan`` on ``world`` ranks, recorded (module docstring),
    or its twin's recording with the ranks renamed (``twin`` of the plan's rules).
    ``backend``: ``nccl`` (a GPU run), ``nccl-plain`` (NCCL without the
    symmetric-memory all-reduce) or ``gloo`` (a CPU run: the same code paths
    as ``nccl-plain``). ``balance``: a measured MoE routing balance
    (:class:`~shardwise.perf.trace.Routing`). ``phases``: the steps to record
    (``static`` where the strategy has it; asked alone, the eager step stands
    in where it has not)."""
    rules, topo = checked(spec, wl, plan, world)
    twin = rules.twin(spec, wl, plan, topo, rank)
    if twin != rank:
        return renamed(record_rank(spec, wl, plan, world, twin, backend, balance, phases),
                       topo, rank)
    return record_alone(spec, wl, plan, world, rank, backend, balance, phases)


def record_alone(spec: ModelSpec, wl: Workload, plan: Plan, world: int, rank: int,
                 backend: str = "nccl", balance: float | None = None,
                 phases: tuple = PHASES, warm_up: bool = False) -> RankTrace:
    """Rank ``rank`` recorded on its own (no twin), each phase at its first call
    (module docstring). ``warm_up``: each after a first call unrecorded
    instead: the same recording, at twice the cost."""
    cls, topo = validate_plan(spec, wl, plan, world)
    topo.rank, topo.device_type = rank, "cuda"
    topo.mesh = _Mesh(topo)
    topo._flat = {span: _Mesh(topo, span) for span in topo.spans}
    dtype = torch_dtype(spec.dtype)
    routing = Routing(balance, world)
    _STOOD_FOR.clear()
    with torch.inference_mode(), _gpu_paths(), building(MetaSource), \
            _recording(Recorder(memory=False)):
        # built under a recorder too: its ops on meta tensors come from the cache
        comm = RecordingComm(topo, backend == "nccl")
        model = cls(spec, wl, plan, topo, comm, ShardLoader(MetaSource(spec), dtype, "meta"))
    stood_for = list(_STOOD_FOR)
    _layer_lists(model)
    # The prompt as a timed run hands it over: a block of the sequences one
    # micro-batch takes (weights.Rows).
    hidden = spec.vocab_size is None  # hidden states in, else token ids
    shape, kind = (wl.batch, wl.seq_len, *[spec.d_model] * hidden), dtype if hidden else torch.long
    block = torch.empty(min(model.input_rows(), wl.batch), *shape[1:], dtype=kind, device="meta")
    prompt = Rows(block, shape)
    token = torch.empty(wl.batch, 1, *shape[2:], dtype=kind, device="meta")
    steps, reads = {}, False
    with torch.inference_mode(), _gpu_paths():
        static = "static" in phases and model.supports_graphs
        runs = [("prefill", prompt, 0)] * ("prefill" in phases)
        if "decode" in phases or ("static" in phases and not static):
            runs.append(("decode", token, wl.seq_len))
        if static:
            pos = torch.empty((), dtype=torch.long, device="meta")
            set_shadow(pos, torch.tensor(wl.seq_len))
            runs.append(("static", token, pos))
        for phase, x, at in runs:
            start = routing.calls
            guess = 0 if warm_up else _DRAWS.get((phase, plan), _DRAWS.get(phase, 0))
            routing.calls = start + guess
            with _recording(Recorder(routing, memory=not warm_up, inputs=x)) as rec:
                model.step(x, at)
            drew = routing.calls - start - guess
            if warm_up or not _as_guessed(drew, guess):
                # Again, drawing where a first call leaves off (a timed step
                # does: Routing): asked to, or routers drew, and not as many
                # as guessed (module docstring).
                routing.calls = start + drew
                with _recording(Recorder(routing, inputs=x)) as rec:
                    model.step(x, at)
            routing.calls = start + 2 * drew
            if not warm_up:
                _DRAWS[(phase, plan)] = _DRAWS[phase] = drew
            steps[phase] = StepTrace(rec.events, rec.peak)
            reads |= rec.read_input or prompt.taken
    weights = sum(p.nbytes for p in model.parameters()) + sum(
        n * sum(p.nbytes for p in m.parameters()) for m, n in stood_for)
    kv = sum(c.nbytes() for c in getattr(model, "caches", []))
    # The prompt's block and the new token where the rank's steps read them
    # (a pipeline's first stage), as a run hands them over.
    inputs = (prompt.nbytes + token.nbytes) * reads
    return RankTrace(rank, steps, weights, kv, inputs, comm.symmetric_bytes, _facts(model))


def _as_guessed(drew: int, guess: int) -> bool:
    """Whether a step run from ``guess`` draws on, that drew ``drew`` times,
    is what a second call records: it drew as many as guessed, or none."""
    return drew in (0, guess)


def _facts(model) -> dict:
    """The strategy's report of itself, its short entries (for a prediction's notes)."""
    def short(v) -> bool:
        if isinstance(v, (int, float, str)):
            return True
        return isinstance(v, (list, tuple)) and len(v) <= 8 and all(
            isinstance(x, (int, float, str)) or isinstance(x, (list, tuple)) and len(x) <= 2
            for x in v)

    try:
        report = model.report()
    except Exception:  # a report may need what a recording does not hold
        return {}
    return {k: v for k, v in report.items() if short(v)}


def record_plan(spec: ModelSpec, wl: Workload, plan: Plan, world: int,
                backend: str = "nccl", balance: float | None = None,
                phases: tuple = PHASES) -> list[RankTrace]:
    """Every rank of ``plan``, recorded: the ranks recorded alone (no twin)
    read from the cache of recordings (:mod:`.tracecache`) or recorded and
    kept there, their twins renamed from them as :func:`record_rank` does."""
    alone = _alone(spec, wl, plan, world, backend, balance, phases)
    return with_twins(spec, wl, plan, world, alone)


@functools.lru_cache(maxsize=256)
def _alone(spec, wl, plan, world, backend, balance, phases) -> dict:
    """The ranks of ``plan`` recorded alone, from the cache of recordings
    where it holds them (:func:`~.recordings.read_alone`), else recorded
    and kept there."""
    got = read_alone(spec, wl, plan, world, backend, balance, phases)
    if got is None:
        twin = twins(spec, wl, plan, world)
        got = {r: record_rank(spec, wl, plan, world, r, backend, balance, phases)
               for r in range(world) if twin[r] == r}
        tracecache.store(recording_key(spec, wl, plan, world, backend, balance, phases), got)
    return got
