"""The strategies by name: each one's rules (:mod:`.plans`), the check of a
plan before launch that applies them, and the class that runs it on a rank.

The rules and the check import no torch, so that a plan is refused before
torch is loaded; the runtime classes (every strategy's module, the composed
plans' in :mod:`.stages`, the peers of :mod:`shardwise.bench.peers`) are
imported when one is asked for. This module sits above every strategy: they
build on :mod:`.base`, :mod:`.compose` and :mod:`.plans`, and none of them
looks another up by name.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import TYPE_CHECKING

from ..spec import ModelSpec, Plan, ShardwiseError, Workload
from .checks import Unsplittable
from .plans import COMPOSE, PLANS, ComposedPlan, PlanRules
from .topology import Topology

if TYPE_CHECKING:
    from .base import Strategy


# -- the rules by name and the check before launch ------------------------------------

def plan_rules(name: str) -> type[PlanRules]:
    """The rules of strategy ``name`` (torch-free); a peer (PyTorch's and
    Hugging Face's own, :mod:`shardwise.bench.peers`) is its runtime class."""
    if name == COMPOSE:
        return ComposedPlan
    if name in PLANS:
        return PLANS[name]
    return get_strategy(name)  # a peer, or an unknown name that it explains


def check_plan(spec: ModelSpec, workload: Workload, plan: Plan | str,
               world_size: int | None = None) -> tuple[type[PlanRules], Topology]:
    """Check a plan before launch: returns the strategy's rules and its topology.

    ``world_size`` None means "what the plan implies" (error if it implies none).
    """
    if isinstance(plan, str):
        plan = Plan.parse(plan)
    cls = plan_rules(plan.strategy)
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


# -- the classes that run them --------------------------------------------------------

def get_strategy(name: str) -> type[Strategy]:
    """The class that runs strategy ``name`` on a rank (it inherits the
    strategy's rules): a strategy's ``STRATEGY``, the composed plans' or a
    peer."""
    from ..bench.peers import PEERS  # PyTorch's and Hugging Face's own, timed beside ours
    from . import ep, helix, layerwise, ring, stages, tp_pp

    runners = {m.STRATEGY.name: m.STRATEGY for m in (tp_pp, helix, ring, layerwise, ep, stages)}
    runners.update(PEERS)
    if name not in runners:
        raise ShardwiseError(
            f"unknown strategy {name!r}; choose one of: {', '.join(PLANS)} "
            f"(or a peer: {', '.join(PEERS)}; or mesh dimensions, e.g. pp:2/tp:2)"
        )
    return runners[name]


def available_strategies() -> list[str]:
    """The strategies a planner ranks: every single-strategy plan (composed
    plans draw their candidates from :func:`~.plans.composition_candidates`;
    peers are timed beside them, not ranked)."""
    return list(PLANS)


def validate_plan(spec: ModelSpec, workload: Workload, plan: Plan | str,
                  world_size: int | None = None) -> tuple[type[Strategy], Topology]:
    """:func:`check_plan`, then the strategy class that runs the plan (its
    module imports torch): returns the class and its topology."""
    if isinstance(plan, str):
        plan = Plan.parse(plan)
    _, topo = check_plan(spec, workload, plan, world_size)
    return get_strategy(plan.strategy), topo
