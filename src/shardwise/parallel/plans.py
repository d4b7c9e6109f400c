"""What a plan is before it runs: its mesh dimensions, the ranks it needs,
its checks against a model and a world size, and the candidates a planner
tries. Pure Python, no torch: a plan is refused before any process starts,
and without waiting for torch to import.

Each strategy's rules are a class here (:class:`TpPpPlan`, ...) that its
runtime class in the strategy's own file inherits (``class TpPp(TpPpPlan,
Composed)``): one definition serves the check before launch
(:func:`~.registry.check_plan`) and the ranks that run it. The mesh
dimensions of a composed plan are described in :mod:`.compose`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from ..output import plural
from ..spec import ModelSpec, Plan, ShardwiseError, Workload
from .checks import (balanced_ranges, check_ep, check_helix, check_reduce, check_stages,
                     check_tp, check_tp_options, chunks_option, divisors, group_kv_heads,
                     repartition)
from .partition import (PartitionError, capacity_text, fmt_bytes, layer_costs, min_capacity,
                        parse_capacity, partition, plan_partition)
from .topology import Topology

# part -> (its mesh axes, its level: 0 outermost)
DIMS = {"dp": (("dp",), 0), "pp": (("pp",), 1), "ring": (("seq",), 2), "ep": (("ep",), 2),
        "tp": (("tp",), 3), "helix": (("group", "slice"), 3)}
ORDER_TEXT = "dp, pp, then ring or ep, then tp or helix"
# Pairs of dimensions that do not share a stage, and why.
APART = {
    frozenset({"ring", "ep"}): "ring splits a stage's sequence and ep its batch; choose one",
    frozenset({"tp", "helix"}): "helix already splits the heads (and their dims); choose one",
    frozenset({"ring", "helix"}): "ring composes with tp, not helix; write ring:C/tp:T",
    frozenset({"ep", "helix"}): "ep composes with tp (tensor-parallel attention), not helix; "
                                "write ep:E/tp:T",
}
SHORTHANDS = {"tp_pp": "pp:P/tp:T", "layerwise": "dp:R/pp:G"}


@dataclass(frozen=True)
class Composition:
    """The mesh dimensions of a plan (pure: no processes).

    ``parts``: one plan per dimension, outermost first; ``cuts``: the stage
    boundaries ``0 = c0 < ... < cP = n_layers`` (None: balanced stages)."""

    parts: tuple[Plan, ...]
    micro_batches: int = 1
    cuts: tuple[int, ...] | None = None
    text: str = ""

    def part(self, name: str) -> Plan | None:
        return next((p for p in self.parts if p.strategy == name), None)

    def has(self, name: str) -> bool:
        return self.part(name) is not None

    def degree(self, name: str) -> int:
        p = self.part(name)
        return 1 if p is None else math.prod(p.shape)

    @property
    def axes(self) -> tuple[str, ...]:
        return tuple(a for p in self.parts for a in DIMS[p.strategy][0])

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(d for p in self.parts for d in p.shape)

    def topology(self) -> Topology:
        helix = self.part("helix")
        flat = helix is not None and helix.option("reduce") == "flat"
        return Topology(self.axes, self.shape, spans=(("group", "slice"),) if flat else ())

    def stage_layers(self, n_layers: int, stage: int) -> range:
        if self.cuts is not None:
            return range(self.cuts[stage], self.cuts[stage + 1])
        return range(*balanced_ranges(n_layers, self.degree("pp"))[stage])

    # -- layouts ------------------------------------------------------------
    def rows(self, batch: int, dp: int, ep: int) -> tuple[int, int]:
        """The sequences of replica ``dp``'s ep rank ``ep``: the batch split
        over dp, then each replica's share over ep (first shares larger)."""
        a, b = balanced_ranges(batch, self.degree("dp"))[dp]
        c, d = balanced_ranges(b - a, self.degree("ep"))[ep]
        return a + c, a + d

    def micro(self, batch: int, dp: int, ep: int) -> list[tuple[int, int]]:
        """Micro-batches of that share (ranges of its rows). Every ep rank of
        a replica runs as many as its largest share (ep rank 0's) allows."""
        most = self.rows(batch, dp, 0)
        b0, b1 = self.rows(batch, dp, ep)
        return balanced_ranges(b1 - b0, max(1, min(self.micro_batches, most[1] - most[0])))

    # -- validation ---------------------------------------------------------
    def check_form(self) -> None:
        """Names, order, degrees and options of the dimensions (no model)."""
        plan, seen = self.text, []
        for p in self.parts:
            if p.strategy in SHORTHANDS:
                raise ShardwiseError(
                    f"plan {plan}: {p.strategy} is a whole plan, not a mesh dimension; inside a "
                    f"composition write its dimensions ({SHORTHANDS[p.strategy]})")
            if p.strategy not in DIMS:
                raise ShardwiseError(
                    f"plan {plan}: {p.strategy!r} is not a mesh dimension; write one of "
                    f"{', '.join(DIMS)} (e.g. pp:2/tp:2)")
            if p.strategy in seen:
                raise ShardwiseError(f"plan {plan} names {p.strategy} twice; write each "
                                     f"dimension once")
            want = 2 if p.strategy == "helix" else 1
            if len(p.shape) != want:
                form = "helix:NxM (head groups x head-dim slices)" if want == 2 else \
                    f"{p.strategy}:N (one degree)"
                raise ShardwiseError(f"plan {plan}: write {form}, e.g. "
                                     f"{'helix:2x2' if want == 2 else p.strategy + ':2'}")
            seen.append(p.strategy)
        levels = [DIMS[n][1] for n in seen]
        if levels != sorted(levels):
            ordered = "/".join(str(p) for p in sorted(self.parts,
                                                      key=lambda p: DIMS[p.strategy][1]))
            raise ShardwiseError(f"plan {plan}: write the dimensions outermost first "
                                 f"({ORDER_TEXT}): {ordered}")
        for pair, why in APART.items():
            if pair <= set(seen):
                raise ShardwiseError(f"plan {plan}: {' and '.join(sorted(pair))} do not compose "
                                     f"in one stage: {why}")
        for p in self.parts:
            check_options(p, plan)

    def check(self, spec: ModelSpec, workload: Workload) -> None:
        """The plan against the model and workload (each part's own checks)."""
        self.check_form()
        plan = self.text
        if self.has("pp"):
            check_stages(spec, self.degree("pp"), plan)
        dp = self.degree("dp")
        if dp > workload.batch:
            raise ShardwiseError(f"plan {plan} splits the batch into {dp} replicas but the batch "
                                 f"is {workload.batch}; use dp <= {workload.batch}")
        if self.has("ep"):
            check_ep(spec, self.degree("ep"), plan)
        if self.has("tp"):
            check_tp(spec, self.degree("tp"), plan, experts_over_tp=not self.has("ep"))
        if self.has("helix"):
            check_helix(spec, workload, *self.part("helix").shape, plan)


def check_options(part: Plan, plan: str) -> None:
    """A dimension's options, checked as the strategy whose code runs it reads them."""
    if part.strategy == "tp":
        check_tp_options(part.options, plan, "tp")
    elif part.strategy == "helix":
        check_reduce(part.options, plan)
    elif part.strategy == "ep":
        chunks_option(part.options, plan)
    elif part.options:
        raise ShardwiseError(f"plan {plan}: {part.strategy} has no option "
                             f"{part.options[0][0]!r}; write {part.strategy}:N")


def composition_candidates(world_size: int, experts: bool = True) -> list[str]:
    """Composed plans of ``world_size`` ranks with two or more dimensions of
    more than one rank, none of them a single-strategy plan (``pp:P/tp:T`` is
    ``tp_pp:TxP``), with an ep dimension only where the model has
    ``experts``; the planner filters them through ``validate``."""
    def splits(n: int, parts: int):
        if parts == 1:
            yield (n,)
            return
        for d in range(1, n + 1):
            if n % d == 0:
                for rest in splits(n // d, parts - 1):
                    yield (d, *rest)

    stages = [("tp:{}",), ("helix:{}x{}",), ("ring:{}",), ("ring:{}", "tp:{}")]
    if experts:
        stages += [("ep:{}",), ("ep:{}", "tp:{}")]
    out = []
    for inner in stages:
        width = sum(s.count("{}") for s in inner)
        for degrees in splits(world_size, 2 + width):
            parts, rest = [], list(degrees)
            for s in ("dp:{}", "pp:{}", *inner):
                n = s.count("{}")
                if math.prod(rest[:n]) > 1:
                    parts.append(s.format(*rest[:n]))
                rest = rest[n:]
            if len(parts) >= 2 and not _shorthand(parts):
                text = "/".join(parts)
                if text not in out:
                    out.append(text)
    return out


def _shorthand(parts: list[str]) -> bool:
    """Whether the parts are what a single-strategy plan runs."""
    names = [p.split(":")[0] for p in parts]
    return names == ["pp", "tp"]


# -- each strategy's rules -----------------------------------------------------------

class PlanRules:
    """What a strategy says of a plan without running it (classmethods, no
    processes; :mod:`.base` describes each)."""

    name: ClassVar[str]
    # What the plan's degrees are called in its errors (``choose tp among
    # [...]``), in the order of ``Plan.shape``: check_plan checks every
    # value it suggests for one of them.
    degree_names: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def ranks_needed(cls, plan: Plan) -> int | None:
        raise NotImplementedError

    @classmethod
    def default_ranks(cls, spec: ModelSpec, workload: Workload, plan: Plan) -> int | None:
        """For a plan that adapts to any number of ranks (``ranks_needed`` None):
        the number it runs on when none is given, or None (then one must be)."""
        return None

    @classmethod
    def validate(cls, spec: ModelSpec, workload: Workload, plan: Plan,
                 world_size: int) -> Topology:
        raise NotImplementedError

    @classmethod
    def candidates(cls, spec: ModelSpec, workload: Workload, world_size: int) -> list[str]:
        return []

    @classmethod
    def twin(cls, spec: ModelSpec, workload: Workload, plan: Plan, topo: Topology,
             rank: int) -> int:
        return rank

    @staticmethod
    def first_along(topo: Topology, rank: int, *axes: str) -> int:
        """The rank with ``rank``'s coordinates, but 0 along ``axes``."""
        return topo.rank_of(**{**topo.coords(rank), **dict.fromkeys(axes, 0)})


class ComposedPlan(PlanRules):
    """A composed plan (``pp:2/tp:2``); the single-strategy plans subclass it
    with their own degrees, checks and messages."""

    name = "compose"

    @classmethod
    def composition(cls, spec: ModelSpec, workload: Workload, plan: Plan,
                    world_size: int) -> Composition:
        """The dimensions ``plan`` runs on ``world_size`` ranks."""
        return Composition(plan.parts, plan.micro_batches, text=str(plan))

    @classmethod
    def ranks_needed(cls, plan: Plan) -> int:
        return math.prod(d for p in plan.parts for d in p.shape)

    @classmethod
    def validate(cls, spec, workload, plan, world_size) -> Topology:
        comp = cls.composition(spec, workload, plan, world_size)
        comp.check(spec, workload)
        return comp.topology()

    @classmethod
    def candidates(cls, spec, workload, world_size) -> list[str]:
        return composition_candidates(world_size, spec.is_moe)

    @classmethod
    def twin(cls, spec, workload, plan, topo, rank) -> int:
        """Ranks alike along an axis hold equal shares of every matrix and run
        the same rows: tp (but for experts spread over tp alone, each rank its
        own and the tokens routed to them), helix's head groups and, on its
        heads re-partition, its slices (on the sequence one each slice takes
        its own chunk), and replicas that split the batch evenly; and the
        pipeline's inner stages of as many layers as the second (each receives,
        runs its layers and sends on)."""
        comp = cls.composition(spec, workload, plan, topo.world_size)
        axes = []
        if comp.has("tp") and (comp.has("ep") or not spec.is_moe):
            axes.append("tp")
        if comp.has("helix"):
            N, M = comp.part("helix").shape
            axes += ["group", "slice"] if repartition(spec, N, M) == "heads" else ["group"]
        if comp.has("dp") and workload.batch % comp.degree("dp") == 0:
            axes.append("dp")
        twin = cls.first_along(topo, rank, *axes)
        P, stage = topo.size("pp"), topo.coords(twin).get("pp", 0)
        if 1 < stage < P - 1 and (len(comp.stage_layers(spec.n_layers, stage))
                                  == len(comp.stage_layers(spec.n_layers, 1))):
            twin = topo.rank_of(**{**topo.coords(twin), "pp": 1})
        return twin


class TpPpPlan(ComposedPlan):
    name = "tp_pp"
    degree_names = ("tp", "pp")

    @staticmethod
    def degrees(plan: Plan) -> tuple[int, int]:
        if len(plan.shape) == 1:
            return plan.shape[0], 1
        if len(plan.shape) == 2:
            return plan.shape
        raise ShardwiseError(
            f"plan {plan}: tp_pp takes TPxPP degrees, e.g. tp_pp:8x2 (TP=8, PP=2)"
        )

    @classmethod
    def composition(cls, spec, workload, plan, world_size) -> Composition:
        tp, pp = cls.degrees(plan)
        return Composition((Plan("pp", (pp,)), Plan("tp", (tp,), options=plan.options)),
                           plan.micro_batches, text=str(plan))

    @classmethod
    def ranks_needed(cls, plan: Plan) -> int:
        tp, pp = cls.degrees(plan)
        return tp * pp

    @classmethod
    def validate(cls, spec: ModelSpec, workload: Workload, plan: Plan,
                 world_size: int):
        tp, pp = cls.degrees(plan)
        check_tp(spec, tp, plan)
        check_tp_options(plan.options, plan)
        check_stages(spec, pp, plan)
        return cls.composition(spec, workload, plan, world_size).topology()

    @classmethod
    def candidates(cls, spec, workload, world_size) -> list[str]:
        return [f"tp_pp:{world_size // pp}x{pp}" for pp in divisors(world_size)]


class HelixPlan(ComposedPlan):
    name = "helix"
    degree_names = ("N", "M")

    @staticmethod
    def degrees(plan: Plan) -> tuple[int, int]:
        if len(plan.shape) != 2:
            raise ShardwiseError(f"plan {plan}: helix takes NxM degrees (N head groups x M "
                                 f"head-dim slices); write e.g. helix:4x4")
        return plan.shape

    group_kv_heads = staticmethod(group_kv_heads)
    repartition = staticmethod(repartition)

    @classmethod
    def composition(cls, spec, workload, plan, world_size) -> Composition:
        return Composition((Plan("helix", cls.degrees(plan), options=plan.options),),
                           plan.micro_batches, text=str(plan))

    @classmethod
    def ranks_needed(cls, plan: Plan) -> int:
        return math.prod(cls.degrees(plan))

    @classmethod
    def validate(cls, spec: ModelSpec, workload: Workload, plan: Plan, world_size: int):
        N, M = cls.degrees(plan)
        check_reduce(plan.options, plan)
        if plan.micro_batches != 1:
            raise ShardwiseError(f"plan {plan}: helix runs the whole batch in one pass "
                                 f"(no pipeline to fill); remove mb={plan.micro_batches}")
        check_helix(spec, workload, N, M, plan)
        return cls.composition(spec, workload, plan, world_size).topology()

    @classmethod
    def candidates(cls, spec, workload, world_size) -> list[str]:
        out = []
        for N in divisors(world_size):
            M = world_size // N
            out.append(f"helix:{N}x{M}")
            if N > 1 and M > 1:  # otherwise both reductions are the same calls
                out.append(f"helix:{N}x{M},reduce=flat")
        return out


class RingPlan(ComposedPlan):
    name = "ring"

    @classmethod
    def ranks_needed(cls, plan: Plan) -> int | None:
        return plan.shape[0] if plan.shape else None

    @classmethod
    def composition(cls, spec, workload, plan, world_size) -> Composition:
        P = plan.shape[0] if plan.shape else world_size
        return Composition((Plan("ring", (P,)),), plan.micro_batches, text=str(plan))

    @classmethod
    def validate(cls, spec: ModelSpec, workload: Workload, plan: Plan, world_size: int):
        if len(plan.shape) > 1:
            raise ShardwiseError(
                f"plan {plan}: ring takes one degree, the number of sequence shards; "
                f"write ring:{math.prod(plan.shape)}, or compose it with tensor "
                f"parallelism as ring:P/tp:T"
            )
        if plan.options:
            raise ShardwiseError(
                f"plan {plan}: ring has no option {plan.options[0][0]!r}; write ring:P or ring:P,mb=N"
            )
        return cls.composition(spec, workload, plan, world_size).topology()

    @classmethod
    def candidates(cls, spec, workload, world_size) -> list[str]:
        return [f"ring:{world_size}"]


class EpPlan(ComposedPlan):
    name = "ep"
    degree_names = ("ep",)

    @staticmethod
    def degree(plan: Plan) -> int:
        if len(plan.shape) != 1:
            raise ShardwiseError(
                f"plan {plan}: ep takes one degree, the number of expert-parallel ranks, "
                f"e.g. ep:16 or ep:16,chunks=2"
            )
        return plan.shape[0]

    @staticmethod
    def chunks_option(plan: Plan) -> int | None:
        return chunks_option(plan.options, plan)

    @classmethod
    def ranks_needed(cls, plan: Plan) -> int:
        return cls.degree(plan)

    @classmethod
    def composition(cls, spec, workload, plan, world_size) -> Composition:
        return Composition((Plan("ep", (cls.degree(plan),), options=plan.options),),
                           plan.micro_batches, text=str(plan))

    @classmethod
    def validate(cls, spec: ModelSpec, workload: Workload, plan: Plan, world_size: int):
        P = cls.degree(plan)
        cls.chunks_option(plan)
        check_ep(spec, P, plan)
        if plan.micro_batches != 1:
            raise ShardwiseError(
                f"plan {plan}: ep does not micro-batch; drop mb= (chunks=K overlaps "
                f"the all-to-alls with the experts instead)"
            )
        return cls.composition(spec, workload, plan, world_size).topology()

    @classmethod
    def candidates(cls, spec, workload, world_size) -> list[str]:
        if spec.is_moe and spec.n_experts % world_size == 0:
            return [f"ep:{world_size}"]
        return []


class LayerwisePlan(ComposedPlan):
    name = "layerwise"

    @classmethod
    def ranks_needed(cls, plan: Plan) -> None:
        return None  # the partition adapts to the ranks it is given

    @classmethod
    def composition(cls, spec, workload, plan, world_size) -> Composition:
        part = plan_partition(spec, workload, plan, world_size)
        cuts = tuple(g.layers.start for g in part.groups) + (spec.n_layers,)
        return Composition((Plan("dp", (part.replicas,)), Plan("pp", (len(part.groups),))),
                           plan.micro_batches, cuts, text=str(plan))

    @classmethod
    def default_ranks(cls, spec, workload, plan) -> int | None:
        """The fewest ranks whose layer groups fit the capacity (one when the
        model fits one device); where no number does, one (validate says why)."""
        try:
            return plan_partition(spec, workload, plan, 1).ranks_used
        except PartitionError as e:
            return e.ranks_needed or 1

    @classmethod
    def validate(cls, spec: ModelSpec, workload: Workload, plan: Plan, world_size: int):
        try:
            part = plan_partition(spec, workload, plan, world_size)
        except PartitionError as e:
            # Still a PartitionError: the planner tells memory from other refusals by it.
            raise PartitionError(e.problem, _layerwise_fix(spec, workload, plan, world_size, e),
                                 e.min_capacity, e.ranks_needed) from None
        if part.idle_ranks:
            # Idle ranks would still have to join every collective of the job;
            # asking for the ranks the partition uses keeps the mesh exact.
            # On that many ranks the partitioner finds the same groups.
            groups = len(part.groups)
            raise ShardwiseError(
                f"plan {plan} on {plural(world_size, 'rank')} uses {plural(groups, 'group')} x "
                f"{plural(part.replicas, 'replica')} = {plural(part.ranks_used, 'rank')} and "
                f"would leave {part.idle_ranks} idle; start {plural(part.ranks_used, 'rank')} "
                f"(--nproc {part.ranks_used})"
            )
        return cls.composition(spec, workload, plan, world_size).topology()

    @classmethod
    def candidates(cls, spec, workload, world_size) -> list[str]:
        """The device's own capacities, and the tightest capacity in bytes at
        which the model fits ``world_size`` ranks (a device-free plan that
        cuts the model into as many groups as that capacity forces)."""
        cache: dict = {}

        def costs_for(batch: int):
            if batch not in cache:
                cache[batch] = layer_costs(spec, workload, batch)
            return cache[batch]

        tight = min_capacity(costs_for, spec.n_layers, world_size, workload.batch)
        return [f"layerwise:cap={capacity_text(tight)}", "layerwise:cap=HBM", "layerwise:cap=L2"]


def _layerwise_fix(spec: ModelSpec, workload: Workload, plan: Plan, world: int,
                   e: PartitionError) -> str:
    """The fixes for the partition error ``e`` that pass validation. A plan
    may not leave ranks idle, and at the smallest capacity that fits
    ``world`` ranks (read back from the size the fix writes) the partitioner
    may choose fewer: the capacity fix then names the most ranks that its
    capacity fills. The fewest ranks ``e`` names never leave one idle."""
    mb = plan.micro_batches
    fixes = [f"start {plural(e.ranks_needed, 'rank')} (--nproc {e.ranks_needed})"
             ] if e.ranks_needed else []
    for ranks in range(world, 0, -1):
        if ranks == world:
            need = e.min_capacity
        else:
            try:
                partition(spec, workload, 0, ranks, mb)  # nothing fits 0 bytes
            except PartitionError as least:
                need = least.min_capacity
        cap = capacity_text(need)
        if not partition(spec, workload, parse_capacity(cap), ranks, mb).idle_ranks:
            with_ranks = "" if ranks == world else f" with --nproc {ranks}"
            fixes.append(f"the smallest capacity that works on {plural(ranks, 'rank')} is "
                         f"{fmt_bytes(need)} (cap={cap}{with_ranks})")
            break
    return ", or ".join(fixes)


# -- the rules by name ----------------------------------------------------------------

# The strategies by name; each one's runtime class is ``STRATEGY`` in
# ``shardwise.parallel.NAME`` and inherits these rules (:mod:`.registry`
# finds both, and the peers', by name).
PLANS: dict[str, type[PlanRules]] = {c.name: c for c in (TpPpPlan, HelixPlan, RingPlan,
                                                          LayerwisePlan, EpPlan)}
COMPOSE = ComposedPlan.name
