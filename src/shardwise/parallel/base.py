"""What every strategy provides, and the registry that finds them by name.

A strategy is one file in this package: its layers on the sub-mesh of one
pipeline stage (``tp_stage``, ``helix_stage``, ...) and a class, a thin
wrapper of :class:`~.compose.Composed` that runs them over the whole world
(composed plans run the same stage code over several mesh dimensions). The
class:

* ``validate(spec, workload, plan, world_size) -> Topology`` (classmethod, no
  processes): checks the plan against the model and the world size and
  raises :class:`ShardwiseError` naming the problem and the fix;
* ``ranks_needed(plan)`` (classmethod): the world size the plan implies, or
  None when it adapts to any (layerwise);
* ``candidates(spec, workload, world_size)`` (classmethod): plan strings worth
  trying on that many ranks (the planner filters them through ``validate``);
* ``__init__(spec, workload, plan, topo, comm, loader)``: builds this rank's
  shard and its KV caches (``workload.batch`` x ``workload.max_len``);
* ``forward(inputs, pos)`` (called through ``step``): one prefill (``pos == 0``, ``inputs [B, L, ...]``)
  or decode step (``inputs [B, 1, ...]``). Every rank is given the same global
  inputs and takes its part; returns this rank's local result (of a prefill,
  the last position only where the strategy ``streams``, unless ``step`` is
  asked for every position);
* ``collect(local)``: the global output ``[B, T, D or V]`` (``T`` 1 for a
  prefill's last position) on rank 0, None elsewhere (verification only,
  outside the timed region);
* ``report()``: strategy-specific facts for the run's output (load balance...);
* ``supports_graphs`` (attribute or property, default False): a decode step
  may be captured once in a CUDA graph and replayed at every position, i.e.
  it accepts ``pos`` as a 0-d device tensor and does no host work that
  depends on it (see ``runtime/timing.py``);
* ``twin(spec, workload, plan, topo, rank)`` (classmethod, default: the rank
  itself): a rank whose steps are this rank's with the global ranks shifted
  along the mesh axes where the two differ. A recorder of a plan's steps
  (``shardwise.perf``) records a twin once; tests hold every twin to it.
"""
from __future__ import annotations

import dataclasses
import importlib
import itertools
import math
import re
from typing import ClassVar

import torch
from torch import nn

from ..model.reference import one_step
from ..model.weights import Rows
from ..spec import ModelSpec, Plan, ShardwiseError, Workload
from .comm import Comm
from .topology import Topology

STRATEGY_MODULES = ("tp_pp", "helix", "ring", "layerwise", "ep")
# Composed plans (pp:2/tp:2, ...) run parallel/compose.py, which every strategy
# above builds on; it is not listed among them (the planner draws its
# candidates from compose.composition_candidates).
COMPOSE = "compose"


def dense_moe_ok(spec: ModelSpec, tokens: int) -> bool:
    """Whether the reference MoE module runs ``tokens`` a call without host
    synchronisation (its dense path; always true of a dense model), as a
    decode step captured in a CUDA graph needs."""
    from ..model.reference import DENSE_MOE_MAX_TOKENS

    return not spec.is_moe or tokens <= DENSE_MOE_MAX_TOKENS


class Strategy(nn.Module):
    name: ClassVar[str]
    supports_graphs: bool = False
    # Whether a prefill step keeps only the last position's output unless
    # asked for every one (``step``); PyTorch's own peers return every one.
    streams: ClassVar[bool] = False
    every_position: bool = True
    # What the plan's degrees are called in its errors (``choose tp among
    # [...]``), in the order of ``Plan.shape``: validate_plan checks every
    # value it suggests for one of them.
    degree_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, spec: ModelSpec, workload: Workload, plan: Plan, topo: Topology,
                 comm: Comm, loader):
        super().__init__()
        self.spec, self.workload, self.plan = spec, workload, plan
        self.topo, self.comm, self.loader = topo, comm, loader
        self.device, self.dtype = loader.device, loader.dtype

    @classmethod
    def ranks_needed(cls, plan: Plan) -> int | None:
        raise NotImplementedError

    @classmethod
    def default_ranks(cls, spec: ModelSpec, workload: Workload, plan: Plan) -> int | None:
        """For a plan that adapts to any number of ranks (``ranks_needed`` None):
        the number it runs on when none is given, or None (then one must be)."""
        return None

    @classmethod
    def twin(cls, spec: ModelSpec, workload: Workload, plan: Plan, topo: Topology,
             rank: int) -> int:
        return rank

    @staticmethod
    def first_along(topo: Topology, rank: int, *axes: str) -> int:
        """The rank with ``rank``'s coordinates, but 0 along ``axes``."""
        return topo.rank_of(**{**topo.coords(rank), **dict.fromkeys(axes, 0)})

    @classmethod
    def validate(cls, spec: ModelSpec, workload: Workload, plan: Plan,
                 world_size: int) -> Topology:
        raise NotImplementedError

    @classmethod
    def candidates(cls, spec: ModelSpec, workload: Workload, world_size: int) -> list[str]:
        return []

    def forward(self, inputs: torch.Tensor, pos: int):
        raise NotImplementedError

    def step(self, inputs, pos: int, every_position: bool = False):
        """Run ``forward`` and remember the global output shape for ``collect``.
        A prefill's output is the last position's where the strategy streams
        (``streams``: all a decode step needs, the next token), every
        position's with ``every_position`` (a run that verifies them)."""
        self.every_position = every_position or not self.streams
        self.out_shape = self.output_shape(inputs)
        if isinstance(inputs, Rows) and not self.streams:
            inputs = inputs.take(0, inputs.shape[0])
        with one_step():
            return self.forward(inputs, pos)

    def input_rows(self) -> int:
        """The most sequences of the inputs one call takes (a timed run hands
        over a block of them, :class:`~shardwise.model.weights.Rows`)."""
        return self.workload.batch

    def collect(self, local) -> torch.Tensor | None:
        raise NotImplementedError

    def report(self) -> dict:
        return {}

    # -- helpers shared by strategies ----------------------------------
    def output_shape(self, inputs: torch.Tensor) -> tuple[int, ...]:
        B, T = inputs.shape[:2]
        width = self.spec.vocab_size if self.spec.vocab_size is not None else self.spec.d_model
        return (B, T if self.every_position else 1, width)

    def send_to_root(self, local: torch.Tensor | None, owner: int) -> torch.Tensor | None:
        """Move the global output, held whole by global rank ``owner``, to rank 0."""
        rank, shape = self.topo.rank, self.out_shape
        if owner == 0:
            return local if rank == 0 else None
        if rank == owner:
            self.comm.send(local.contiguous(), 0, "collect")
        elif rank == 0:
            buf = torch.empty(shape, dtype=self.dtype, device=self.device)
            return self.comm.recv(buf, owner, "collect")
        return None


class Unsplittable(ShardwiseError):
    """A degree of a plan that the model cannot be split by. ``name`` is the
    degree as the fix names it (``tp``), None when the fix names none;
    :func:`validate_plan` replaces ``fix`` with the values of that degree that
    pass every check of the plan, so that following it works."""

    def __init__(self, problem: str, fix: str, name: str | None = None):
        super().__init__(f"{problem}; {fix}")
        self.problem, self.fix, self.name = problem, fix, name


def divides(what: str, n: int, by: int, by_what: str, fix: str) -> None:
    """Raise a one-line error when ``by`` does not divide ``n`` (``fix``:
    ``choose NAME among [...]`` names the degree, see :class:`Unsplittable`)."""
    if n % by:
        name = re.match(r"choose (\w+) among", fix)
        raise Unsplittable(f"{what} ({n}) is not divisible by {by_what} ({by})", fix,
                           name.group(1) if name else None)


def held_kv_heads(part: int, parts: int, kv_heads: int) -> range:
    """The key/value heads that part ``part`` of a ``parts``-way split of the
    query heads holds (consecutive query heads per part, as tp_pp and helix
    split them).

    ``parts`` <= ``kv_heads``: an equal share, nothing replicated. More parts
    than KV heads (``parts % kv_heads == 0``): the one KV head that the part's
    query heads all use, ``part * kv_heads // parts``, so each KV head (its
    K/V projection rows and its cache) is replicated over the
    ``parts // kv_heads`` parts that share it, as vLLM does. Either way a
    part's query heads see exactly the keys they see on one device."""
    if parts <= kv_heads:
        return range(part * kv_heads // parts, (part + 1) * kv_heads // parts)
    first = part * kv_heads // parts
    return range(first, first + 1)


def kv_replicas(parts: int, kv_heads: int) -> int:
    """How many parts hold each KV head under :func:`held_kv_heads`."""
    return max(1, parts // kv_heads)


def head_splits(spec: ModelSpec) -> list[int]:
    """Ways the heads of ``spec`` split (:func:`held_kv_heads`): divisors of
    n_heads that divide n_kv_heads or that n_kv_heads divides."""
    return [p for p in range(1, spec.n_heads + 1)
            if spec.n_heads % p == 0 and (spec.kv_heads % p == 0 or p % spec.kv_heads == 0)]


def check_head_split(spec: ModelSpec, parts: int, what: str, name: str) -> None:
    """Raise a one-line error unless the heads of ``spec`` split ``parts`` ways
    (``what``: the degree as the plan names it, ``name``: its letter in the fix)."""
    fix = f"choose {name} among {head_splits(spec)}"
    divides(f"{spec.name}: n_heads", spec.n_heads, parts, what, fix)
    Hkv = spec.kv_heads
    if Hkv % parts and parts % Hkv:
        raise Unsplittable(
            f"{spec.name}: n_kv_heads ({Hkv}) and {what} ({parts}): neither divides the "
            f"other (up to {Hkv} parts split the kv heads; more parts replicate each kv head "
            f"over the parts whose query heads use it)", fix, name)


def balanced_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """Split ``range(n)`` into ``parts`` contiguous ranges, sizes differing by <= 1
    (the first ranges get the extra items)."""
    base, extra = divmod(n, parts)
    out, start = [], 0
    for i in range(parts):
        size = base + (i < extra)
        out.append((start, start + size))
        start += size
    return out


def _each(ranges, fn, alike) -> list:
    return [fn(i, b0, b1) for i, (b0, b1) in enumerate(ranges)]


# How micro_batched runs its micro-batches; a recorder of what a step does
# (shardwise.perf) replaces it to run one of each kind and count it for all.
RUN_MICRO_BATCHES = _each


def _steps(kinds: list, fn) -> None:
    for i in range(len(kinds)):
        fn(i)


# How alike_steps runs its steps; a recorder of what a step does
# (shardwise.perf) replaces it to run two of each run of one kind.
RUN_STEPS = _steps


def alike_steps(kinds, fn) -> None:
    """``fn(i)`` for each step ``i`` of a loop, in order, where consecutive
    steps of equal ``kinds[i]`` do the same work (a ring's hops: the same
    block shapes and peers)."""
    RUN_STEPS(list(kinds), fn)


def micro_batched(ranges, fn, alike=None) -> list:
    """``fn(i, b0, b1)`` for each micro-batch ``i`` of ``ranges`` (ranges of
    sequences), in order: the outputs. ``alike[i]``: what, beside its size,
    decides micro-batch i's work (None: its size alone); micro-batches equal
    in both do the same work."""
    return RUN_MICRO_BATCHES(ranges, fn, alike)


def get_strategy(name: str) -> type[Strategy]:
    from ..bench.peers import PEERS  # PyTorch's and Hugging Face's own, timed beside ours

    if name in PEERS:
        return PEERS[name]
    if name == COMPOSE:
        from .compose import STRATEGY

        return STRATEGY
    if name not in STRATEGY_MODULES:
        raise ShardwiseError(
            f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGY_MODULES)} "
            f"(or a peer: {', '.join(PEERS)}; or mesh dimensions, e.g. pp:2/tp:2)"
        )
    try:
        module = importlib.import_module(f"shardwise.parallel.{name}")
    except ModuleNotFoundError as e:
        if e.name == f"shardwise.parallel.{name}":
            raise ShardwiseError(f"strategy {name!r} is not implemented in this version") from None
        raise
    return module.STRATEGY


def available_strategies() -> list[str]:
    out = []
    for name in STRATEGY_MODULES:
        try:
            get_strategy(name)
            out.append(name)
        except ShardwiseError:
            pass
    return out


def validate_plan(spec: ModelSpec, workload: Workload, plan: Plan | str,
                  world_size: int | None = None) -> tuple[type[Strategy], Topology]:
    """Check a plan before launch: returns the strategy class and its topology.

    ``world_size`` None means "what the plan implies" (error if it implies none).
    """
    if isinstance(plan, str):
        plan = Plan.parse(plan)
    cls = get_strategy(plan.strategy)
    if world_size is None:
        world_size = cls.ranks_needed(plan) or cls.default_ranks(spec, workload, plan)
        if world_size is None:
            raise ShardwiseError(f"plan {plan} adapts to any number of ranks; give its degree "
                                 f"or the ranks to run on (--nproc)")
    try:
        topo = cls.validate(spec, workload, plan, world_size)
    except Unsplittable as e:
        raise ShardwiseError(f"{e.problem}; {_checked_fix(cls, spec, workload, plan, e)}") from None
    # After the strategy's own checks: one that takes no micro-batches (helix,
    # ep) says to remove mb=, which fixes this too.
    if plan.micro_batches > workload.batch:
        raise ShardwiseError(
            f"plan {plan} asks for {plan.micro_batches} micro-batches but the batch is "
            f"{workload.batch}; use mb <= {workload.batch}"
        )
    topo.check_world(world_size, str(plan))
    return cls, topo


# Degrees tried when a fix is checked (each variant is validated, no process starts).
MAX_DEGREE = 64


def _groups(cls, plan: Plan) -> list[tuple[tuple[str, ...], int | None]]:
    """The plan's groups of degrees, each with the names its fixes use and
    the part of a composition it belongs to (None: the plan's own shape)."""
    if not plan.is_composed:
        return [(cls.degree_names[:len(plan.shape)], None)]
    return [(("N", "M") if p.strategy == "helix" else (p.strategy,), k)
            for k, p in enumerate(plan.parts)]


def _with_shape(plan: Plan, part: int | None, shape: tuple[int, ...]) -> Plan:
    if part is None:
        return dataclasses.replace(plan, shape=shape)
    parts = list(plan.parts)
    parts[part] = dataclasses.replace(parts[part], shape=shape)
    return dataclasses.replace(plan, parts=tuple(parts))


def _checked_fix(cls, spec, workload, plan: Plan, e: Unsplittable) -> str:
    """The fix for ``e`` that works when followed: the values of the degree
    it names with which the plan, its other degrees and options unchanged,
    validates (each at the ranks it implies); where none does, or the fix
    names no single degree, the nearest plans of the same strategy that the
    model accepts (a composition: varying one dimension's degrees)."""
    def valid(variant: Plan) -> bool:
        try:
            cls.validate(spec, workload, variant, cls.ranks_needed(variant))
        except ShardwiseError:
            return False
        return True

    def shape_of(part: int | None) -> tuple[int, ...]:
        return plan.shape if part is None else plan.parts[part].shape

    values = range(1, MAX_DEGREE + 1)
    groups = _groups(cls, plan)
    fix = e.fix
    for names, part in groups:
        if e.name in names and names.index(e.name) < len(shape_of(part)):
            i, shape = names.index(e.name), shape_of(part)
            ok = [v for v in values
                  if valid(_with_shape(plan, part, shape[:i] + (v,) + shape[i + 1:]))]
            if ok:
                return f"choose {e.name} among {ok}"
            fix = f"no {e.name} works with the plan's other degrees"
            break
    ranks = cls.ranks_needed(plan) or math.prod(plan.shape)
    variants = []
    for _, part in groups:
        n = len(shape_of(part))
        variants += [_with_shape(plan, part, s) for s in itertools.product(values, repeat=n)
                     if math.prod(s) <= MAX_DEGREE and s != shape_of(part)]
    size = lambda v: cls.ranks_needed(v) or 0  # noqa: E731
    near = sorted(variants, key=lambda v: (abs(size(v) - ranks), size(v), str(v)))
    ok = [str(v) for v in itertools.islice((v for v in near if valid(v)), 4)]
    kind = "composed" if plan.is_composed else plan.strategy
    return (f"{fix}, e.g. {', '.join(ok)}" if ok
            else f"{fix}; no {kind} plan of up to {MAX_DEGREE} ranks splits "
                 f"{spec.name}, choose another strategy")
