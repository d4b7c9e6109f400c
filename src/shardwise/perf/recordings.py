"""A plan's recordings as the cost model reads them, without PyTorch: each
rank's steps (:class:`RankTrace`), the plan's check, and the ranks recorded
alone read back from the cache of recordings (:mod:`.tracecache`), every
other rank renamed from the one it is the twin of (the plan's rules name it:
``twin``, :mod:`shardwise.parallel.plans`).

Recording what the cache lacks runs the strategies' code on meta tensors
(:mod:`.record`, which imports torch); a ranking whose plans are all kept
reads them here and never imports torch. A twin's steps are renamed when
their events are first read: the schedule reads only the ranks it plays
(:func:`~.schedule.play`).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

from ..parallel.registry import check_plan
from ..parallel.topology import Topology
from ..spec import ModelSpec, Plan, Workload
from . import tracecache
from .events import call_counts, comm_counts
from .twins import moves, renamed_events

PHASES = ("prefill", "decode", "static")


@dataclass
class StepTrace:
    """One step of one rank: its events, the most bytes its own tensors held
    at once, and its calls and collectives counted as a run counts them."""

    events: list
    peak_bytes: int

    @functools.cached_property
    def calls(self) -> dict[str, int]:
        return call_counts(self.events)

    @functools.cached_property
    def comm(self) -> dict[str, dict[str, int]]:
        return comm_counts(self.events)


class RenamedStep(StepTrace):
    """A twin's step: another rank's ``step`` with every global rank moved
    (``move[r]``: where rank r goes), renamed when its events are first read."""

    def __init__(self, step: StepTrace, move: tuple):
        self.peak_bytes, self._step, self._move = step.peak_bytes, step, move

    @functools.cached_property
    def events(self) -> list:
        return renamed_events(self._step.events, self._move)


@dataclass
class RankTrace:
    """Rank r of a plan: its steps (:data:`PHASES`; ``static`` only where the
    strategy captures decode steps in CUDA graphs), the bytes of its weights,
    KV caches, inputs and symmetric-memory buffers, as a run allocates them."""

    rank: int
    steps: dict
    weights: int
    kv: int
    inputs: int
    symmetric: int
    facts: dict = field(default_factory=dict)  # the strategy's report (short entries)
    source: int | None = None  # the rank recorded, of which this is a renaming (renamed)


def renamed(trace: RankTrace, topo: Topology, rank: int) -> RankTrace:
    """``trace`` of another rank as ``rank``'s: every global rank in its steps
    shifted by the coordinates ``rank`` differs from the recorded one by
    (:func:`~.twins.moves`), when a step's events are first read."""
    move = moves(topo.axes, topo.shape, trace.rank, rank)
    steps = {k: RenamedStep(v, move) for k, v in trace.steps.items()}
    source = trace.rank if trace.source is None else trace.source
    return dataclasses.replace(trace, rank=rank, steps=steps, source=source)


@functools.lru_cache(maxsize=4096)
def checked(spec: ModelSpec, wl: Workload, plan: Plan | str, world: int | None):
    """``check_plan``'s answer (the plan's rules and topology), kept: a
    planner asks it of a plan several times (its row, its prediction, its
    recording, its twins). Its topology is read, never changed (a recording
    validates afresh for the topology it fills in)."""
    return check_plan(spec, wl, plan, world)


def twins(spec: ModelSpec, wl: Workload, plan: Plan, world: int) -> list[int]:
    """Each rank's twin (itself where it is recorded alone)."""
    rules, topo = checked(spec, wl, plan, world)
    return [rules.twin(spec, wl, plan, topo, r) for r in range(world)]


def recording_key(spec, wl, plan, world, backend="nccl", balance=None, phases=PHASES) -> str:
    """The cache key of ``plan``'s recordings (:mod:`.tracecache`): its ranks
    recorded alone."""
    return tracecache.key(spec, wl, plan, world, backend, balance, phases)


def with_twins(spec: ModelSpec, wl: Workload, plan: Plan, world: int,
               alone: dict) -> list[RankTrace]:
    """Every rank of ``plan``: those recorded alone from ``alone`` (rank ->
    its trace), each other one renamed from its twin."""
    _, topo = checked(spec, wl, plan, world)
    twin = twins(spec, wl, plan, world)

    def rank(r: int) -> RankTrace:
        return alone[r] if twin[r] == r else renamed(rank(twin[r]), topo, r)

    return [rank(r) for r in range(world)]


def read_alone(spec: ModelSpec, wl: Workload, plan: Plan, world: int, backend: str = "nccl",
               balance: float | None = None, phases: tuple = PHASES) -> dict | None:
    """The ranks of ``plan`` recorded alone (rank -> its trace), as the cache
    of recordings keeps them; None where it does not hold them all."""
    alone = tracecache.load(recording_key(spec, wl, plan, world, backend, balance, phases),
                            RankTrace, StepTrace)
    twin = twins(spec, wl, plan, world)
    if alone is None or sorted(alone) != [r for r in range(world) if twin[r] == r]:
        return None
    return alone


def from_cache(spec: ModelSpec, wl: Workload, plan: Plan, world: int, backend: str = "nccl",
               balance: float | None = None, phases: tuple = PHASES) -> list[RankTrace] | None:
    """Every rank of ``plan`` as :func:`~.record.record_plan` records it,
    read from the cache of recordings; None where it does not hold them."""
    alone = read_alone(spec, wl, plan, world, backend, balance, phases)
    return None if alone is None else with_twins(spec, wl, plan, world, alone)
