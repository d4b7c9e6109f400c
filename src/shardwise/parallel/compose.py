"""compose: N-dimensional plans over one DeviceMesh.

A composed plan names its mesh dimensions from the outermost (slowest
links, least traffic) to the innermost (fastest links, most traffic),
separated by ``/``, each with its degrees and options, and ``mb=N`` once at
the end: ``dp:2/pp:2/ring:2/tp:2,mb=4``. The slash form is the mesh as it
is laid out (consecutive global ranks differ on the last dimension, which
lands on one node's NVLink), every dimension carries its own options
(``tp:4,overlap=2``, ``helix:2x2,reduce=flat``, ``ep:4,chunks=2``), and a
plan of one dimension is exactly the single-strategy syntax, so every
existing plan name reads as a composition of one part. A keyed form
(``tp=2,pp=2``) would hide the order and mix the dimensions' options.

Dimensions, outermost first (the order a plan must use):

====== ============= ===================================================
part   mesh axes     what it splits; the activations it consumes/produces
====== ============= ===================================================
dp:R   dp            the batch: R replicas, no traffic in a step (batch-sharded)
pp:P   pp            the layers: P stages, point-to-point hops (micro-batched)
ring:C seq           the sequence: zig-zag shards, K/V round the ring (sequence-sharded)
ep:E   ep            the experts; attention data-parallel over the batch (batch-sharded)
tp:T   tp            heads and d_ff (experts under tp alone; each expert's d_ff under ep)
helix  group, slice  heads x head dims, hierarchical or flat sums (replicated)
====== ============= ===================================================

A stage (the ranks of one pipeline stage and one replica) runs one of:
nothing (whole layers), ``tp``, ``helix``, ``ring``, ``ring/tp`` (sequence
over one axis, heads over the other), ``ep`` (data-parallel attention) or
``ep/tp`` (tensor-parallel attention, each expert's d_ff split over tp).
Each of these is the strategy's own code (``tp_stage``, ``helix_stage``,
``ring_stage``, ``ep_stage``: its layers on the sub-mesh of the stage), and
the single-strategy plans (``tp_pp:TxP`` = ``pp:P/tp:T``, ``helix:NxM``,
``ring:P``, ``ep:P``, ``layerwise:cap=C`` = ``dp:R/pp:G`` with the
partitioner's cuts) are thin wrappers of this module's :class:`Composed`.

Layouts: the batch is split over dp (contiguous shares), then over ep
inside a replica; each rank's share is split into the plan's micro-batches,
which the :class:`~.pipeline.Pipeline` carries stage to stage between ranks
with the same coordinates on every other axis. Under ring a rank's tokens
are its zig-zag shard of the prompt (every rank of the ring takes the new
token in decode). The output is gathered on rank 0 only to verify (outside
the timed step): from the last stage's owner of each batch share and
sequence shard (tp, helix: the rank at coordinate 0, after helix's vocabulary
shards are gathered).

What a plan is before it runs (its :class:`~.plans.Composition`, the checks
and the candidates) lives in :mod:`.plans`, which imports no torch, so that
a plan is refused before torch is loaded; this module runs it, with the
stage code its subclass names (:mod:`.stages` names every kind).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from torch import nn

from ..model.weights import take_rows
from ..spec import ModelSpec, Workload
from .base import Strategy
from .pipeline import BeforeFn, Pipeline
from .plans import ComposedPlan, Composition
from .topology import Topology

# -- one rank's stage ----------------------------------------------------------------

@dataclass
class StageContext:
    """What a part's code needs to build its layers on this rank's sub-mesh."""

    spec: ModelSpec
    workload: Workload
    topo: Topology
    comm: object
    loader: object
    comp: Composition
    layers: range
    first: bool
    last: bool
    rows: int  # sequences this rank holds (its KV cache's batch)
    micro: list[tuple[int, int]]  # this rank's micro-batches (ranges of its rows)
    largest: list[int]  # per micro-batch: the most sequences any rank of the stage runs
    zigzag: object = None  # ring's ZigZag layout, when the plan has ring

    def option(self, part: str, key: str, default: str | None = None) -> str | None:
        p = self.comp.part(part)
        return default if p is None else p.option(key, default)


@dataclass
class Stage:
    """A rank's part of a pipeline stage, as its strategy's code builds it."""

    module: nn.Module  # (x, caches, pos) -> y, on this rank's layout
    caches: list
    graphs: bool  # a decode step of this stage can be captured in a CUDA graph
    before: BeforeFn | None = None  # settings per micro-batch (pipeline.BeforeFn)
    gather: Callable | None = None  # the last stage's output -> the whole rows' output
    info: dict = field(default_factory=dict)  # facts for the report
    report: Callable[[], dict] | None = None  # facts of the last step, for the report
    whole: bool = False  # one micro-batch runs on the caches themselves (Pipeline)


class Composed(ComposedPlan, Strategy):
    """A composed plan on one rank (its rules: :class:`~.plans.ComposedPlan`);
    the single-strategy plans subclass it with their own rules
    (``TpPp(TpPpPlan, Composed)``) and reports.

    The strategies' modules build on this one, so it names none of them: a
    subclass gives the code that builds its stages (``build_stage``) and,
    where its plans have ring, the layout of the sequence over the ``seq``
    axis (``sequence_layout``: ring's :class:`~.ring.ZigZag`).
    :class:`~.stages.AnyComposed` runs a plan of any parts."""

    streams = True
    sequence_layout: ClassVar[type | None] = None

    @staticmethod
    def build_stage(ctx: StageContext) -> Stage:
        """This rank's part of its pipeline stage, built by the strategy's code."""
        raise NotImplementedError

    def __init__(self, spec, workload, plan, topo, comm, loader):
        super().__init__(spec, workload, plan, topo, comm, loader)
        comp = self.comp = self.composition(spec, workload, plan, topo.world_size)
        stage, stages = topo.coord("pp"), topo.size("pp")
        B = workload.batch
        dp, ep = topo.coord("dp"), topo.coord("ep")
        self.stage_layers = comp.stage_layers(spec.n_layers, stage)
        self.rows = comp.rows(B, dp, ep)
        micro = comp.micro(B, dp, ep)
        largest = [b - a for a, b in comp.micro(B, dp, 0)]
        self.zigzag = None
        if comp.has("ring"):
            self.zigzag = self.sequence_layout(topo.size("seq"), workload.seq_len,
                                               workload.decode_steps)
            self.local_index = torch.tensor(self.zigzag.positions(topo.coord("seq")),
                                            dtype=torch.long, device=self.device)
        ctx = StageContext(spec, workload, topo, comm, loader, comp, self.stage_layers,
                           stage == 0, stage == stages - 1, self.rows[1] - self.rows[0],
                           micro, largest, self.zigzag)
        built = self.built = self.build_stage(ctx)
        self.stage, self.caches = built.module, built.caches
        self.stage_graphs, self.gather, self.stage_info = built.graphs, built.gather, built.info
        self.pipeline = Pipeline(comm, topo, "pp", self.stage, self.caches, micro, spec.d_model,
                                 self.dtype, self.device, built.before, built.whole, largest)
        self.prefilled = True

    def input_rows(self) -> int:
        """The most sequences one micro-batch of this rank takes from the
        inputs: its largest micro-batch on the first stage, none elsewhere."""
        return max(b - a for a, b in self.pipeline.micro) if self.pipeline.is_first else 0

    @property
    def supports_graphs(self) -> bool:
        """A decode step can be captured in a CUDA graph when the stage's own
        code can (its pipeline hops too: NCCL captures point-to-point)."""
        return self.stage_graphs

    def forward(self, inputs: torch.Tensor, pos):
        self.prefilled = not isinstance(pos, torch.Tensor) and pos == 0
        tokens = inputs.shape[1]
        r0, zz = self.rows[0], self.zigzag
        keep = None if self.every_position or tokens == 1 else slice(tokens - 1, tokens)
        select = None
        if zz is not None and self.prefilled:
            if tokens != zz.prompt:
                raise ValueError(f"ring was built for a {zz.prompt}-token prompt, got {tokens}")
            tokens = zz.real(self.topo.coord("seq"))
            select = self.local_index
            if keep is not None:  # the last position, on the sequence shard that holds it
                held = self.last_held()
                keep = slice(held, held + 1) if held is not None else slice(0, 0)

        def take(b0: int, b1: int) -> torch.Tensor:
            """This rank's sequences b0:b1 of the inputs, when the first stage runs them."""
            x = take_rows(inputs, r0 + b0, r0 + b1)
            return x if select is None else x.index_select(1, select)  # [b, n, ...] zig-zag

        return self.pipeline.run(take if self.pipeline.is_first else None, pos, tokens, keep)

    def last_held(self, seq: int | None = None) -> int | None:
        """Under ring: where sequence shard ``seq`` (this rank's by default)
        holds the prompt's last position, in its local order (None: it does not)."""
        zz = self.zigzag
        local = zz.positions(self.topo.coord("seq") if seq is None else seq)
        return local.index(zz.prompt - 1) if zz.prompt - 1 in local else None

    def collect(self, local):
        """Every batch share's (and sequence shard's) output from its owner on
        the last stage to rank 0, in batch and position order."""
        topo, comp, zz = self.topo, self.comp, self.zigzag
        last = self.pipeline.is_last
        if last and self.gather is not None:
            local = self.gather(local)
        if topo.rank != 0 and not last:
            return None
        shards, spread = [0], False  # spread: each shard holds its zig-zag positions
        if zz is not None and self.prefilled:
            spread = self.every_position and topo.size("seq") > 1
            shards = range(topo.size("seq")) if self.every_position else \
                [c for c in range(topo.size("seq")) if self.last_held(c) is not None]
        blocks = []  # (owner, rows, positions or None)
        for dp in range(topo.size("dp")):
            for ep in range(topo.size("ep")):
                rows = comp.rows(self.workload.batch, dp, ep)
                for c in shards:
                    owner = topo.rank_of(dp=dp, pp=topo.size("pp") - 1, ep=ep, seq=c, tp=0,
                                         group=0, slice=0)
                    blocks.append((owner, rows, zz.positions(c) if spread else None))
        if topo.rank != 0:
            for owner, _, _ in blocks:
                if owner == topo.rank and local.numel():
                    self.comm.send(local.contiguous(), 0, "collect")
            return None
        B, T, W = self.out_shape
        out = torch.empty(self.out_shape, dtype=self.dtype, device=self.device)
        for owner, (b0, b1), positions in blocks:
            shape = (b1 - b0, T if positions is None else len(positions), W)
            if not math.prod(shape):
                continue
            block = local if owner == 0 else self.comm.recv(
                torch.empty(shape, dtype=self.dtype, device=self.device), owner, "collect")
            if positions is None:
                out[b0:b1] = block
            else:
                out[b0:b1, positions] = block
        return out

    def stage_report(self) -> dict:
        return self.built.report() if self.built.report is not None else {}

    def report(self) -> dict:
        return {"mesh": dict(zip(self.topo.axes, self.topo.shape)),
                "stage_layers": [self.stage_layers.start, self.stage_layers.stop],
                "batch_rows": list(self.rows), "micro_batches": len(self.pipeline.micro),
                **self.stage_info, **self.stage_report()}
