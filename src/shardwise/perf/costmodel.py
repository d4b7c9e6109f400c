"""Predict a plan's speed, memory and communication without running it.

What a plan does is read from the strategies' own code: every rank's steps
run without processes on meta tensors (:mod:`.record`), which records every
host call, device kernel and collective (:mod:`.trace`); recordings are kept
on disk and read back without PyTorch (:mod:`.recordings`). What it costs comes
from a cluster profile (:mod:`.clusters`): each event by its shape class
(:mod:`.costs`), and all ranks' events played out together by one schedule
of hosts, compute and communication streams, groups and pipelines
(:mod:`.schedule`). Nothing here knows a strategy: a new strategy, or a new
kernel in the model, needs no change to this package.

A step: the prefill of the whole batch; a decode step (for the batch), eager
or, where the strategy captures it, the static-shape step replayed from a
CUDA graph. Compute rates follow the step's duty cycle: a GPU busy part of
the step runs at the clock its average power allows (:func:`.costs.duty_derate`),
so a step whose GPU waits much of the time (pipeline bubbles, a host-bound
step) is costed again at that rate.

Memory per rank is what the recorded rank allocates: its weights and KV
caches (as a run allocates them), the peak of the step's own tensors and its
inputs, and the symmetric-memory buffers of its collectives.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass, field

from ..parallel.plans import COMPOSE, PLANS
from ..spec import ModelSpec, Plan, ShardwiseError, Workload
from .clusters import Cluster
from .costs import Costs, duty_derate, fmt_bytes
from . import prerecord
from .prerecord import recorder
from .recordings import RankTrace, checked, from_cache
from .schedule import RankTime, play
from .twins import symmetries

# Below this busy share a step is costed again at the rate its duty cycle holds.
DUTY_REPREDICT = 0.98


@dataclass
class Op:
    """Kernels of one shape class summed over a step of the busiest rank."""

    name: str
    flops: float = 0.0
    bytes: float = 0.0
    seconds: float = 0.0


@dataclass
class CommCost:
    """One kind of collective (``op/axis``) summed over a step of the busiest
    rank: bytes as :class:`~shardwise.parallel.comm.Comm` counts them."""

    key: str
    link: str
    calls: int = 0
    bytes: float = 0.0
    seconds: float = 0.0


@dataclass
class StepCost:
    """Time of one step (a whole prefill, or one decode step for the batch)."""

    seconds: float = 0.0
    compute_s: float = 0.0  # the busiest rank's kernels
    comm_s: float = 0.0  # its collectives' device time
    exposed_comm_s: float = 0.0  # the step's time beyond its kernels
    bubble_s: float = 0.0  # the longest a rank's compute waited for another rank's data
    host_s: float = 0.0  # the busiest rank's host calls (0 in a CUDA graph)
    syncs: float = 0.0  # its device-to-host waits
    graph: bool = False  # replayed from a CUDA graph
    ops: dict[str, Op] = field(default_factory=dict)
    comms: dict[str, CommCost] = field(default_factory=dict)
    calls: dict[str, float] = field(default_factory=dict)  # its host calls by kind

    @property
    def comm_bytes(self) -> float:
        return sum(c.bytes for c in self.comms.values())

    @property
    def flops(self) -> float:
        return sum(o.flops for o in self.ops.values())


@dataclass
class Memory:
    """Bytes on one rank."""

    weights: int = 0
    kv_cache: int = 0
    activations: int = 0  # the step's own tensors at their peak, and its inputs
    comm_buffers: int = 0  # symmetric-memory buffers of its collectives

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.comm_buffers


@dataclass
class Prediction:
    spec: ModelSpec
    workload: Workload
    plan: Plan
    cluster: str
    world_size: int
    prefill: StepCost
    decode: StepCost
    memory: Memory  # the rank with the largest total
    weights_per_rank: list[int]
    kv_per_rank: list[int]
    hbm_bytes: int
    fits: bool = True
    reason: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def prefill_tps(self) -> float:
        return self.workload.batch * self.workload.seq_len / self.prefill.seconds

    @property
    def decode_step_ms(self) -> float:
        """Wall time of one decode step for the whole batch (``tpot_ms``)."""
        return 1e3 * self.decode.seconds

    @property
    def ms_per_token(self) -> float:
        """Decode step time divided by the batch (what some papers call TPOT)."""
        return self.decode_step_ms / self.workload.batch

    @property
    def decode_tps(self) -> float:
        return self.workload.batch / self.decode.seconds

    def step(self, phase: str) -> StepCost:
        return self.decode if phase == "decode" else self.prefill


# -- a step from the ranks' recordings --------------------------------------------

def step_cost(traces: list[RankTrace], phase: str, cluster: Cluster, graph: bool,
              images: tuple = ()) -> StepCost:
    """One step of every rank played on ``cluster`` (``phase``: prefill, decode
    or static; ``graph``: replayed from a CUDA graph), at the compute rate its
    duty cycle holds; ``images``: the symmetries of the ranks' steps on
    ``cluster`` (:func:`~.twins.symmetries`), under which one rank of each
    orbit is played."""
    steps = _Events(traces, phase)
    decoding = phase != "prefill"
    derate = duty_derate(cluster.sustained_ratio, 1.0)
    times = play(steps, _costs(cluster, graph, decoding, derate), cluster.overlap, images)
    st = _summary(times, graph)
    duty = st.compute_s / st.seconds if st.seconds > 0 else 1.0
    if duty < DUTY_REPREDICT and cluster.sustained_ratio < 1.0:
        derate = duty_derate(cluster.sustained_ratio, duty)
        times = play(steps, _costs(cluster, graph, decoding, derate), cluster.overlap,
                     images)
        st = _summary(times, graph)
    return st


class _Events:
    """The ranks' events in one phase, read as the schedule asks for them: it
    reads those of the ranks it plays, and a twin's are renamed when first
    read (:class:`~.recordings.RenamedStep`)."""

    def __init__(self, traces: list[RankTrace], phase: str):
        self.traces, self.phase = traces, phase

    def __len__(self) -> int:
        return len(self.traces)

    def __getitem__(self, rank: int) -> list:
        return self.traces[rank].steps[self.phase].events


_PRICED: dict = {}  # (cluster's id, graph, decoding, derate) -> (cluster, Costs)
PRICED_KEPT = 16


def _costs(cluster: Cluster, graph: bool, decoding: bool, derate: float) -> Costs:
    """The prices of events on ``cluster`` for these figures, shared by every
    step priced with them: an event's price is a function of the event (a
    planner's plans recur each other's calls), so what one step priced the
    next reads."""
    key = (id(cluster), graph, decoding, derate)
    got = _PRICED.get(key)
    if got is None or got[0] is not cluster:
        if len(_PRICED) >= PRICED_KEPT:
            del _PRICED[next(iter(_PRICED))]
        got = _PRICED[key] = (cluster, Costs(cluster, graph, decoding, derate))
    return got[1]


def _summary(times: list[RankTime], graph: bool) -> StepCost:
    seconds = max(t.end for t in times)
    busiest = max(times, key=lambda t: (t.compute_s, t.comm_s))
    st = StepCost(seconds=seconds, compute_s=busiest.compute_s, comm_s=busiest.comm_s,
                  bubble_s=max(t.bubble_s for t in times),
                  host_s=max(t.host_s for t in times), syncs=busiest.syncs, graph=graph,
                  calls=dict(busiest.calls))
    st.exposed_comm_s = max(0.0, seconds - st.compute_s) if len(times) > 1 else 0.0
    st.ops = {k: Op(k, *v) for k, v in sorted(busiest.ops.items())}
    st.comms = {k: CommCost(k, v[3], int(round(v[0])), v[1], v[2])
                for k, v in sorted(busiest.comms.items())}
    return st


# -- the prediction -----------------------------------------------------------------

_CAPACITY = re.compile(r"(L2|HBM)(?:\*([0-9.eE+-]+))?", re.IGNORECASE)


def size_text(n: int) -> str:
    """Bytes as the shortest exact size text ``parse_bytes`` reads back (80GB, 50MiB)."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("GiB", 2**30), ("MB", 10**6),
                        ("MiB", 2**20), ("KB", 10**3), ("KiB", 2**10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B"


def resolve_capacity(plan: Plan, cluster: Cluster) -> Plan:
    """``layerwise:cap=L2`` / ``cap=HBM[*f]`` name the device's memory; on a
    cluster profile that is the profile's, not the CUDA device's at hand."""
    cap = plan.option("cap")
    m = _CAPACITY.fullmatch(cap.strip()) if cap else None
    if m is None:
        return plan
    size = cluster.l2_bytes if m.group(1).upper() == "L2" else cluster.hbm_bytes
    if m.group(2) is not None:
        f = float(m.group(2))
        if not 0 < f <= 1:
            raise ShardwiseError(f"capacity {cap!r}: the fraction must be in (0, 1]")
        size = int(size * f)
    options = tuple((k, size_text(size) if k == "cap" else v) for k, v in plan.options)
    return dataclasses.replace(plan, options=options)


def recorded_phases(graphs: bool | None) -> tuple:
    """The steps :func:`predict` records: the prompt, and the decode step a
    CUDA graph replays (``static``) unless ``graphs`` is False (eager)."""
    return ("prefill", "decode" if graphs is False else "static")


def predict(spec: ModelSpec, workload: Workload, plan: Plan | str, cluster: Cluster,
            world_size: int | None = None, graphs: bool | None = None,
            moe_balance: float | None = None,
            prefill_graphs: bool | None = None) -> Prediction:
    """Predict ``plan`` on ``cluster``. The plan is validated first (a
    ShardwiseError names what is wrong); a plan that is valid but does not fit
    in memory is returned with ``fits`` False and the reason.

    ``graphs``: whether decode steps replay a CUDA graph. None (default): where
    the strategy supports it, as ``shardwise bench`` runs them on GPUs; False:
    every step eager (``--no-graphs``, or CPU). ``prefill_graphs``: whether
    the prompt's step replays a CUDA graph. None (default): where no rank's
    recorded prompt makes a host synchronisation (and ``graphs`` is not
    False), as ``shardwise bench`` runs it on GPUs
    (:func:`shardwise.runtime.timing.prefill_graph`); False: eager, as
    ``run`` and ``verify`` time it and benches before that ran it.

    ``moe_balance``: for MoE models, the routed rows of the busiest of the
    plan's ranks over the mean, as a run measured it (``rank_load_max_over_mean``
    in an ep record's report); None: routing drawn uniformly."""
    plan = resolve_capacity(Plan.parse(plan) if isinstance(plan, str) else plan, cluster)
    if plan.strategy != COMPOSE and plan.strategy not in PLANS and _peer(plan.strategy):
        raise ShardwiseError(f"{plan.strategy} is a peer (PyTorch's or Hugging Face's own "
                             f"method), timed beside shardwise's; the cost model predicts "
                             f"shardwise's strategies")
    if world_size is None and plan.strategy == "layerwise":
        world_size = cluster.n_gpus
    rules, topo = checked(spec, workload, plan, world_size)
    if topo.world_size > cluster.n_gpus:
        raise ShardwiseError(f"plan {plan} needs {topo.world_size} GPUs but cluster "
                             f"{cluster.name} has {cluster.n_gpus}")
    # The decode step as it runs: replayed from a CUDA graph where the strategy
    # captures it (unless graphs are off), else eager.
    config = (spec, workload, plan, topo.world_size, "nccl",
              moe_balance if spec.is_moe else None, recorded_phases(graphs))
    # Read back from the cache of recordings, without torch; or recorded (the
    # strategies' code run on meta tensors), and kept by the recorder in this
    # process: once it is loaded, it is asked first.
    loaded = f"{__package__}.record" in sys.modules
    traces = None if loaded else from_cache(*config)
    if traces is None:
        traces = recorder().record_plan(*config)
    images = symmetries(topo, [r if t.source is None else t.source for r, t in enumerate(traces)],
                        cluster.node_of)
    prompt_graph = (graphs is not False and prefill_graphs is not False
                    and not any(t.steps["prefill"].calls.get("syncs") for t in traces))
    graph = graphs is not False and all("static" in t.steps for t in traces)
    prefill, decode = _priced((config, cluster.name, prompt_graph, graph), lambda: (
        step_cost(traces, "prefill", cluster, prompt_graph, images),
        step_cost(traces, "static" if graph else "decode", cluster, graph, images)))
    weights = [t.weights for t in traces]
    kv = [t.kv for t in traces]
    mems = [Memory(t.weights, t.kv, t.inputs + max(s.peak_bytes for s in t.steps.values()),
                   t.symmetric) for t in traces]
    pred = Prediction(spec, workload, plan, cluster.name, topo.world_size, prefill, decode,
                      max(mems, key=lambda m: m.total), weights, kv, cluster.hbm_bytes,
                      notes=_notes(rules, traces))
    pred.fits, pred.reason = _fits(pred, cluster)
    return pred


def _priced(key: tuple, price) -> tuple[StepCost, StepCost]:
    """A plan's prefill and decode step costs, ``price()``: where a ranking
    shares its families with workers (:mod:`.prerecord`), a worker leaves
    what it priced in the ranking's folder, named by ``key``, and the
    planner reads it back instead of pricing the steps again (JSON: every
    figure to the last bit)."""
    if prerecord.PRICED is None:
        return price()
    folder, worker = prerecord.PRICED
    path = os.path.join(folder, hashlib.sha256(repr(key).encode()).hexdigest() + ".json")
    if not worker and os.path.exists(path):
        with open(path) as f:
            return tuple(_step_cost(d) for d in json.load(f))
    steps = price()
    if worker:
        with open(path + ".tmp", "w") as f:
            json.dump([dataclasses.asdict(st) for st in steps], f)
        os.replace(path + ".tmp", path)
    return steps


def _step_cost(d: dict) -> StepCost:
    d["ops"] = {k: Op(**v) for k, v in d["ops"].items()}
    d["comms"] = {k: CommCost(**v) for k, v in d["comms"].items()}
    return StepCost(**d)


def _peer(name: str) -> bool:
    """Whether ``name``, none of shardwise's strategies, is a peer (PyTorch's
    or Hugging Face's own method; its module imports torch, so a strategy's
    name is never looked up there)."""
    from ..bench.peers import PEERS

    return name in PEERS


def _notes(rules, traces: list[RankTrace]) -> list[str]:
    """What the strategy reports of itself on rank 0 (its layout), and what
    KV heads held by several ranks (its ``kv_head_replicas``) cost."""
    facts = traces[0].facts
    if not facts:
        return []
    notes = [f"{rules.name}: " + "; ".join(f"{k} {v}" for k, v in facts.items())]
    copies = facts.get("kv_head_replicas", 1)
    if isinstance(copies, int) and copies > 1:
        kv = max(t.kv for t in traces)
        notes.append(f"each KV head (its K/V projection rows and cache) is replicated on "
                     f"{copies} ranks: of the KV cache's {fmt_bytes(kv)} per rank, "
                     f"{fmt_bytes(kv * (copies - 1) / copies)} is replicated")
    return notes


def _fits(p: Prediction, cluster: Cluster) -> tuple[bool, str]:
    cap, P = cluster.hbm_bytes, p.world_size
    kv_total, w_total = sum(p.kv_per_rank), sum(p.weights_per_rank)
    gpus = f"{P} x {fmt_bytes(cap)}"
    if kv_total > P * cap:
        return False, f"KV cache {fmt_bytes(kv_total)} > {gpus}"
    if kv_total + w_total > P * cap:
        return False, (f"weights {fmt_bytes(w_total)} + KV cache {fmt_bytes(kv_total)} "
                       f"> {gpus}")
    m = p.memory
    if m.weights + m.kv_cache > cap:
        return False, (f"one rank holds weights {fmt_bytes(m.weights)} + KV cache "
                       f"{fmt_bytes(m.kv_cache)} > {fmt_bytes(cap)}")
    if m.total > cap:
        return False, (f"one rank needs {fmt_bytes(m.total)} (weights {fmt_bytes(m.weights)}, "
                       f"KV {fmt_bytes(m.kv_cache)}, activations {fmt_bytes(m.activations)}, "
                       f"buffers {fmt_bytes(m.comm_buffers)}) > {fmt_bytes(cap)}; "
                       + _memory_fix(p, cap))
    return True, ""


def _memory_fix(p: Prediction, cap: int) -> str:
    """What would make a rank that needs more than ``cap`` fit. More
    micro-batches shrink only the activations (a stage holds one micro-batch's),
    so they are named where the rest fits and the plan can take more of them
    (helix and ep alone take none: as one pipeline stage they do); the KV
    cache and the activations both shrink with the batch or the context."""
    m, plan, batch = p.memory, p.plan, p.workload.batch
    if m.weights + m.kv_cache + m.comm_buffers <= cap and plan.micro_batches < batch:
        if plan.takes_micro_batches:
            return "try more micro-batches (mb=) or a smaller batch"
        return (f"try it as one pipeline stage with micro-batches ({plan.one_stage()},mb=N, "
                f"N up to the batch) or a smaller batch")
    return "try a smaller batch or a shorter context, or more ranks for the KV cache"
