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

from .compose import Composed
from .partition import fmt_bytes, plan_partition
from .plans import LayerwisePlan
from .tp_pp import tp_stage


class Layerwise(LayerwisePlan, Composed):
    """layerwise on one rank (its rules, and the fix of a capacity that does
    not fit: :class:`~.plans.LayerwisePlan`): whole layers per stage, the
    code of tp_pp's stages on one rank each."""

    build_stage = staticmethod(tp_stage)

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
