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
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..model.weights import take_rows
from ..spec import ModelSpec, Plan, ShardwiseError, Workload
from .base import Strategy, balanced_ranges
from .pipeline import BeforeFn, Pipeline
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
        from . import ep, helix, tp_pp

        self.check_form()
        plan = self.text
        if self.has("pp"):
            tp_pp.check_stages(spec, self.degree("pp"), plan)
        dp = self.degree("dp")
        if dp > workload.batch:
            raise ShardwiseError(f"plan {plan} splits the batch into {dp} replicas but the batch "
                                 f"is {workload.batch}; use dp <= {workload.batch}")
        if self.has("ep"):
            ep.check_ep(spec, self.degree("ep"), plan)
        if self.has("tp"):
            tp_pp.check_tp(spec, self.degree("tp"), plan, experts_over_tp=not self.has("ep"))
        if self.has("helix"):
            helix.check_helix(spec, workload, *self.part("helix").shape, plan)


def check_options(part: Plan, plan: str) -> None:
    """A dimension's options, checked by the strategy whose code runs it."""
    from . import ep, helix, tp_pp

    if part.strategy == "tp":
        tp_pp.check_options(part.options, plan, "tp")
    elif part.strategy == "helix":
        helix.check_reduce(part.options, plan)
    elif part.strategy == "ep":
        ep.chunks_option(part.options, plan)
    elif part.options:
        raise ShardwiseError(f"plan {plan}: {part.strategy} has no option "
                             f"{part.options[0][0]!r}; write {part.strategy}:N")


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


def build_stage(ctx: StageContext) -> Stage:
    from . import ep, helix, ring, tp_pp

    if ctx.comp.has("helix"):
        return helix.helix_stage(ctx)
    if ctx.comp.has("ring"):
        return ring.ring_stage(ctx)
    if ctx.comp.has("ep"):
        return ep.ep_stage(ctx)
    return tp_pp.tp_stage(ctx)


class Composed(Strategy):
    """A composed plan on one rank; the single-strategy plans subclass it
    with their own checks, messages and reports."""

    name = "compose"
    streams = True

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
        return composition_candidates(world_size)

    @classmethod
    def twin(cls, spec, workload, plan, topo, rank) -> int:
        """Ranks alike along an axis hold equal shares of every matrix and run
        the same rows: tp (but for experts spread over tp alone, each rank its
        own and the tokens routed to them), helix's head groups and, on its
        heads re-partition, its slices (on the sequence one each slice takes
        its own chunk), and replicas that split the batch evenly; and the
        pipeline's inner stages of as many layers as the second (each receives,
        runs its layers and sends on)."""
        from .helix import repartition

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
            from .ring import ZigZag

            self.zigzag = ZigZag(topo.size("seq"), workload.seq_len, workload.decode_steps)
            self.local_index = torch.tensor(self.zigzag.positions(topo.coord("seq")),
                                            dtype=torch.long, device=self.device)
        ctx = StageContext(spec, workload, topo, comm, loader, comp, self.stage_layers,
                           stage == 0, stage == stages - 1, self.rows[1] - self.rows[0],
                           micro, largest, self.zigzag)
        built = self.built = build_stage(ctx)
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


def composition_candidates(world_size: int) -> list[str]:
    """Composed plans of ``world_size`` ranks with two or more dimensions of
    more than one rank, none of them a single-strategy plan (``pp:P/tp:T`` is
    ``tp_pp:TxP``); the planner filters them through ``validate``."""
    def splits(n: int, parts: int):
        if parts == 1:
            yield (n,)
            return
        for d in range(1, n + 1):
            if n % d == 0:
                for rest in splits(n // d, parts - 1):
                    yield (d, *rest)

    stages = [("tp:{}",), ("helix:{}x{}",), ("ring:{}",), ("ring:{}", "tp:{}"), ("ep:{}",),
              ("ep:{}", "tp:{}")]
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


STRATEGY = Composed
