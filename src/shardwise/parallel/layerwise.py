"""layerwise: capacity-constrained layer partitioning on a micro-batched pipeline.

Given a per-device capacity C (``layerwise:cap=80GB``, ``cap=L2``,
``cap=HBM*0.9``), :mod:`shardwise.perf.partition` cuts the layers into
contiguous groups whose weights, KV cache and working set fit C, choosing the
cut points that minimise the slowest group (dynamic programming, not the
seed's ``floor(C / layer bytes)``). Each group is one stage of the shared
micro-batched :class:`~shardwise.parallel.pipeline.Pipeline`; when there are
fewer groups than ranks the pipeline is replicated and each replica runs a
contiguous slice of the batch with a KV cache sized to that slice.

Invariant: a replica computes exactly the reference layers, in order, on its
sequences (attention never mixes sequences), so concatenating the replicas'
outputs in batch order is the reference output; only the grouping of layers
onto ranks differs. Mesh axes ``("replica", "pp")``: pp varies fastest, so a
pipeline's stages are consecutive ranks and its activations cross the fastest
links. A model that fits one device (one group) is data parallel: nothing
crosses ranks inside a step. Decode steps replay CUDA graphs either way.
"""
from __future__ import annotations

import torch

from ..model.reference import KVCache, Transformer
from ..perf.partition import Partition, PartitionError, fmt_bytes, parse_capacity, partition
from ..spec import ModelSpec, Plan, ShardwiseError, Workload
from .base import Strategy, balanced_ranges, dense_moe_ok
from .pipeline import Pipeline
from .topology import Topology


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


class Layerwise(Strategy):
    name = "layerwise"

    @classmethod
    def ranks_needed(cls, plan: Plan) -> None:
        return None  # the partition adapts to the ranks it is given

    @classmethod
    def default_ranks(cls, spec, workload, plan) -> int | None:
        """The fewest ranks whose layer groups fit the capacity (one when the
        model fits one device); where no number does, one (validate says why)."""
        try:
            return plan_partition(spec, workload, plan, 1).ranks_used
        except PartitionError as e:
            return e.ranks_needed or 1

    @classmethod
    def validate(cls, spec: ModelSpec, workload: Workload, plan: Plan,
                 world_size: int) -> Topology:
        part = plan_partition(spec, workload, plan, world_size)
        if part.idle_ranks:
            # Idle ranks would still have to join every collective of the job;
            # asking for the ranks the partition uses keeps the mesh exact.
            # On that many ranks the partitioner finds the same groups.
            groups = len(part.groups)
            raise ShardwiseError(
                f"plan {plan} on {world_size} ranks uses {groups} groups x {part.replicas} "
                f"replicas = {part.ranks_used} ranks and would leave {part.idle_ranks} idle; "
                f"start {part.ranks_used} ranks (--nproc {part.ranks_used})"
            )
        return Topology(("replica", "pp"), (part.replicas, len(part.groups)))

    @classmethod
    def candidates(cls, spec, workload, world_size) -> list[str]:
        """The device's own capacities, and the tightest capacity in bytes at
        which the model fits ``world_size`` ranks (a device-free plan that
        cuts the model into as many groups as that capacity forces)."""
        from ..perf.partition import capacity_text, layer_costs, min_capacity

        cache: dict = {}

        def costs_for(batch: int):
            if batch not in cache:
                cache[batch] = layer_costs(spec, workload, batch)
            return cache[batch]

        tight = min_capacity(costs_for, spec.n_layers, world_size, workload.batch)
        return [f"layerwise:cap={capacity_text(tight)}", "layerwise:cap=HBM", "layerwise:cap=L2"]

    @classmethod
    def twin(cls, spec, workload, plan, topo, rank) -> int:
        """Replicas are alike when they split the batch evenly."""
        even = workload.batch % topo.size("replica") == 0
        return cls.first_along(topo, rank, "replica") if even else rank

    def __init__(self, spec, workload, plan, topo, comm, loader):
        super().__init__(spec, workload, plan, topo, comm, loader)
        self.partition = plan_partition(spec, workload, plan, topo.world_size)
        n_stages = topo.size("pp")
        stage = topo.coord("pp")
        self.stage_layers = self.partition.groups[stage].layers
        self.batch_ranges = balanced_ranges(workload.batch, topo.size("replica"))
        self.b0, self.b1 = self.batch_ranges[topo.coord("replica")]
        with torch.device("meta"):
            model = Transformer(spec, self.stage_layers, first=stage == 0,
                                last=stage == n_stages - 1)
        # Whole layers: every weight of the group, read straight onto the device.
        self.stage = loader.load_transformer(model)
        # Each replica caches only its own sequences.
        self.caches = [
            KVCache.allocate(self.b1 - self.b0, spec.kv_heads, workload.max_len, spec.head_dim,
                             self.dtype, self.device)
            for _ in self.stage_layers
        ]
        self.pipeline = Pipeline(comm, topo, "pp", self.stage, self.caches,
                                 plan.micro_batches, spec.d_model, self.dtype, self.device)

    @property
    def supports_graphs(self) -> bool:
        """A decode step is captured in a CUDA graph, the pipeline's
        point-to-point hops included (NCCL captures them; ``collect`` is
        outside the step). An MoE model needs its dense path (``dense_moe_ok``)."""
        return dense_moe_ok(self.spec, self.b1 - self.b0)

    def forward(self, inputs: torch.Tensor, pos: int):
        return self.pipeline.run(inputs[self.b0 : self.b1], pos)

    def collect(self, local):
        """Every replica's last stage sends its rows to rank 0, which places them
        in batch order."""
        topo, last = self.topo, self.topo.size("pp") - 1
        owners = [topo.rank_of(replica=r, pp=last) for r in range(topo.size("replica"))]
        if topo.rank in owners and topo.rank != 0:
            self.comm.send(local.contiguous(), 0, "collect")
            return None
        if topo.rank != 0:
            return None
        out = torch.empty(self.out_shape, dtype=self.dtype, device=self.device)
        for owner, (b0, b1) in zip(owners, self.batch_ranges):
            if owner == 0:
                out[b0:b1] = local
            else:
                self.comm.recv(out[b0:b1], owner, "collect")  # a dim-0 slice is contiguous
        return out

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
