"""layerwise: capacity-constrained layer partitioning on a micro-batched pipeline.

Given a per-device capacity C (``layerwise:cap=80GB``, ``cap=L2``,
``cap=HBM*0.9``), :mod:`.partition` cuts the layers into
contiguous groups whose weights, KV cache and working set fit C, choosing the
cut points that minimise the slowest group (dynamic programming, not the
seed's ``floor(C / layer bytes)``). Each group is one stage of the shared
micro-batched :class:`~shardwise.parallel.pipeline.Pipeline`; when there are
fewer groups than ranks the pipeline is replicated and each replica runs a
contiguous slice of the batch with a KV cache sized to that slice.

Invariant: a replica computes exactly the reference layers, in order, on its
sequences (attention never mixes sequences), so concatenating the replicas'
outputs in batch order is the reference output; only the grouping of layers
onto ranks differs. Mesh axes ``("dp", "pp")``: pp varies fastest, so a
pipeline's stages are consecutive ranks and its activations cross the fastest
links. A model that fits one device (one group) is data parallel: nothing
crosses ranks inside a step. Decode steps replay CUDA graphs either way.

The plan is the composition ``dp:R/pp:G`` (:mod:`.compose`) with the
partitioner's cut points: whole layers per stage, and each stage holds one
micro-batch's activations at a time (:class:`~.pipeline.Pipeline`).
"""
from __future__ import annotations

from ..output import plural
from .partition import (Partition, PartitionError, capacity_text, fmt_bytes, parse_capacity,
                        partition)
from ..spec import ModelSpec, Plan, ShardwiseError, Workload
from .compose import Composed, Composition


def plan_partition(spec: ModelSpec, workload: Workload, plan: Plan,
                   world_size: int) -> Partition:
    """The partition a plan implies on ``world_size`` ranks (pure, no processes)."""
    if plan.shape:
        raise ShardwiseError(
            f"plan {plan}: layerwise takes no degrees, it derives them from the capacity; "
            f"write e.g. layerwise:cap=80GB"
        )
    unknown = [k for k, _ in plan.options if k != "cap"]
    if unknown:
        raise ShardwiseError(f"plan {plan}: unknown option(s) {', '.join(unknown)}; layerwise "
                             f"takes cap=CAPACITY and mb=N")
    cap = plan.option("cap")
    if cap is None:
        raise ShardwiseError(f"plan {plan}: layerwise needs a capacity per device; write e.g. "
                             f"layerwise:cap=80GB, layerwise:cap=L2 or layerwise:cap=HBM*0.9")
    return partition(spec, workload, parse_capacity(cap), world_size, plan.micro_batches)


def _checked_fix(spec: ModelSpec, workload: Workload, plan: Plan, world: int,
                 e: PartitionError) -> str:
    """The fixes for ``e`` that pass validation. A plan may not leave
    ranks idle, and at the smallest capacity that fits ``world`` ranks (read
    back from the size the fix writes) the partitioner may choose fewer: the
    capacity fix then names the most ranks that its capacity fills. The
    fewest ranks ``e`` names never leave one idle."""
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


class Layerwise(Composed):
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
            raise PartitionError(e.problem, _checked_fix(spec, workload, plan, world_size, e),
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
        from .partition import capacity_text, layer_costs, min_capacity

        cache: dict = {}

        def costs_for(batch: int):
            if batch not in cache:
                cache[batch] = layer_costs(spec, workload, batch)
            return cache[batch]

        tight = min_capacity(costs_for, spec.n_layers, world_size, workload.batch)
        return [f"layerwise:cap={capacity_text(tight)}", "layerwise:cap=HBM", "layerwise:cap=L2"]

    def __init__(self, spec, workload, plan, topo, comm, loader):
        super().__init__(spec, workload, plan, topo, comm, loader)
        self.partition = plan_partition(spec, workload, plan, topo.world_size)

    def report(self) -> dict:
        part = self.partition
        return {
            "groups": [[g.layers.start, g.layers.stop] for g in part.groups],
            "group_bytes": [g.total_bytes for g in part.groups],
            "group_bytes_text": [fmt_bytes(g.total_bytes) for g in part.groups],
            "predicted_group_ms": [1e3 * g.time_s for g in part.groups],
            "replicas": part.replicas,
            "capacity_bytes": part.capacity,
            "stage_layers": [self.stage_layers.start, self.stage_layers.stop],
        }


STRATEGY = Layerwise
