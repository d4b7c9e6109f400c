"""Capacity-constrained layer partitioning: the planner of the layerwise strategy.

Given a per-device capacity C, cut the layers into contiguous groups, one
group per device of a pipeline, so that every group fits C and a step is as
short as possible. The seed's ``floor(C / layer bytes)`` layers per
group ignores the KV cache and the activations, gives 0 when one layer
exceeds C, and can leave the last group nearly empty; here the cut points
come from dynamic programming over per-layer costs, which need not be equal
(the first layer carries the embedding, the last the final norm and LM head).

What one device of group ``i..j-1`` must hold, for a replica's batch of ``b``
sequences in micro-batches of ``m``, prompt length ``T``:

    sum over the group's layers of  weights + KV cache (b x max_len)
  + max over its layers of the working set of one micro-batch (m x T tokens)
  + the outputs it holds: one micro-batch's in flight to the next group
    (m x T x D), or leaving the last group (m x T x D, or V)

A group's time is the sum over its layers of max(FLOPs / rate, bytes /
bandwidth) for the workload's prefill and decode steps. G groups on R ranks
run as floor(R / G) replicas of the pipeline (at most one per sequence), the
batch split between them, which shrinks each replica's KV cache and time;
leftover ranks idle. A step takes the slowest group's time x (m + G - 1) / m
for m micro-batches (the pipeline's fill and drain: with one micro-batch the
groups run one after the other). Of the partitions with the shortest step,
the one with the fewest groups (fewest hops) wins; for each group count the
cut points minimise the slowest group.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Callable

import numpy as np

from ..spec import ModelSpec, Plan, ShardwiseError, Workload, dtype_bytes, parse_bytes

# -- capacity ------------------------------------------------------------------

# Datasheet figures, so that a partition can be planned away from the GPU.
# H100 and H200 SXM are the same GH100 die with 50 MB of its 60 MB L2 enabled
# (torch reports L2_cache_size = 50 MiB on both).
DEVICE_CAPACITY = {
    "h100": {"L2": 50 * 2**20, "HBM": 80 * 10**9},
    "h200": {"L2": 50 * 2**20, "HBM": 141 * 10**9},
}
_NAMED = re.compile(r"(L2|HBM)(?:@(\w+))?(?:\*([0-9.eE+-]+))?", re.IGNORECASE)


def parse_capacity(text: str, cluster=None) -> int:
    """Bytes from a size (``80GB``, ``40GiB``) or from ``L2`` / ``HBM`` of
    ``cluster``'s GPU (a perf.clusters.Cluster) or, without one, of this
    machine's CUDA device; optionally of a named device (``L2@h100``) and
    scaled by a fraction (``HBM*0.9``)."""
    m = _NAMED.fullmatch(text.strip())
    if m is None:
        try:
            return parse_bytes(text)
        except ShardwiseError:
            raise ShardwiseError(
                f"cannot read capacity {text!r}; write bytes (80GB, 40GiB, 50MB) or L2 / HBM, "
                f"optionally @h100 or @h200 and a fraction (HBM*0.9)"
            ) from None
    level, device, fraction = m.group(1).upper(), m.group(2), m.group(3)
    if device is not None:
        if device.lower() not in DEVICE_CAPACITY:
            raise ShardwiseError(f"unknown device {device!r} in capacity {text!r}; use one of "
                                 f"{', '.join(DEVICE_CAPACITY)} or give bytes")
        size = DEVICE_CAPACITY[device.lower()][level]
    elif cluster is not None:
        size = cluster.l2_bytes if level == "L2" else cluster.hbm_bytes
        if not size:
            raise ShardwiseError(f"capacity {text!r}: cluster {cluster.name} records no "
                                 f"{level} size; give bytes (e.g. 50MB)")
    else:
        size = _cuda_capacity(level, text)
    if fraction is not None:
        try:
            f = float(fraction)
        except ValueError:
            f = -1.0
        if not 0 < f <= 1:
            raise ShardwiseError(f"capacity {text!r}: the fraction must be in (0, 1], e.g. {level}*0.9")
        size = int(size * f)
    return int(size)


def _cuda_capacity(level: str, text: str) -> int:
    import torch

    if not torch.cuda.is_available():
        raise ShardwiseError(
            f"capacity {text!r} is read from a CUDA device but none is visible; give bytes "
            f"(e.g. 50MB) or name the device ({level}@h100, {level}@h200)"
        )
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(props.L2_cache_size if level == "L2" else props.total_memory)


def capacity_text(n: int) -> str:
    """The shortest size of 3 significant digits (more where needed) that
    ``parse_capacity`` reads back as at least ``n`` bytes: a capacity a plan
    can name (``cap=16.7GB`` for 16686137344 bytes); a larger capacity fits
    whatever ``n`` fits."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            break
    else:
        return f"{n}B"
    for digits in range(3, 16):
        step = 10 ** (math.floor(math.log10(n / scale)) + 1 - digits)
        value = math.ceil(n / scale / step) * step
        text = f"{value:.{max(0, -math.floor(math.log10(step)))}f}"
        text = (text.rstrip("0").rstrip(".") if "." in text else text) + unit
        if parse_bytes(text) >= n:
            return text
    return f"{n}B"


def fmt_bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


# -- per-layer counts (small on purpose: the cost model may take them over) -----

@dataclass(frozen=True)
class Rates:
    """Achievable device rates for the time model (default: H100 SXM datasheet,
    dense bf16 tensor cores and HBM3)."""

    flops_per_s: float = 989e12
    bytes_per_s: float = 3.35e12


def _is_last(spec: ModelSpec, layer: int) -> bool:
    return layer == spec.n_layers - 1


def layer_weight_bytes(spec: ModelSpec, layer: int) -> int:
    """A layer's weights; the first adds the embedding, the last the final norm
    and the LM head, so the sum over layers is the whole model."""
    params = spec.layer_params()
    if layer == 0:
        params += spec.embed_params()
    if _is_last(spec, layer):
        params += spec.norm_params() // 2 + spec.embed_params()
    return params * dtype_bytes(spec.dtype)


def kv_bytes_per_seq(spec: ModelSpec, max_len: int) -> int:
    """K and V of one layer for one sequence of ``max_len`` positions."""
    return 2 * spec.kv_heads * spec.head_dim * max_len * dtype_bytes(spec.dtype)


def work_bytes_per_token(spec: ModelSpec, layer: int) -> int:
    """Transient activations of one token in one layer: normed input and
    residual, q/k/v, attention output, the MLP's hidden units (each routed
    expert's for MoE, and the router logits), the logits on the last layer.
    Assumes a fused attention kernel (no T x S score matrix)."""
    width = 2 * spec.d_model + (2 * spec.n_heads + 2 * spec.kv_heads) * spec.head_dim
    hidden = spec.mlp_matrices * spec.d_ff  # w_in output(s) and the activated units
    width += (hidden * spec.top_k + spec.n_experts) if spec.is_moe else hidden
    if _is_last(spec, layer) and spec.vocab_size is not None:
        width += spec.vocab_size
    return width * dtype_bytes(spec.dtype)


def layer_time(spec: ModelSpec, layer: int, batch: float, new: int, past: int,
               rates: Rates) -> float:
    """Roofline time of one layer on ``batch`` sequences of ``new`` tokens after
    ``past`` cached ones: max(FLOPs / rate, bytes / bandwidth)."""
    nbytes, tokens = dtype_bytes(spec.dtype), batch * new
    mlp = (spec.top_k * spec.expert_params() + spec.n_experts * spec.d_model
           if spec.is_moe else spec.mlp_params())
    # 2 FLOPs per weight per token; Q.K^T and P.V over the causal context.
    flops = 2 * tokens * (spec.attn_params() + mlp)
    flops += 4 * batch * spec.n_heads * spec.head_dim * new * (past + (new + 1) / 2)
    moved = layer_weight_bytes(spec, layer) + 2 * tokens * spec.d_model * nbytes
    moved += batch * (past + new) * kv_bytes_per_seq(spec, 1)
    if layer == 0 and spec.vocab_size is not None:
        moved -= spec.embed_params() * nbytes  # a lookup reads only its rows
        moved += min(tokens, spec.vocab_size) * spec.d_model * nbytes
    if _is_last(spec, layer) and spec.vocab_size is not None:
        flops += 2 * tokens * spec.d_model * spec.vocab_size
        moved += tokens * spec.vocab_size * nbytes
    return max(flops / rates.flops_per_s, moved / rates.bytes_per_s)


@dataclass(frozen=True)
class LayerCosts:
    """Per-layer costs for one replica's batch. Group ``i..j-1`` needs
    ``sum(resident[i:j]) + max(work[i:j]) + held[j-1]`` bytes and takes
    ``sum(time[i:j])`` seconds."""

    resident: tuple[int, ...]  # weights + KV cache
    work: tuple[int, ...]  # working set of one micro-batch
    held: tuple[int, ...]  # the outputs a group ending at this layer holds
    time: tuple[float, ...]

    def group_bytes(self, i: int, j: int) -> int:
        return sum(self.resident[i:j]) + max(self.work[i:j]) + self.held[j - 1]

    def group_time(self, i: int, j: int) -> float:
        return sum(self.time[i:j])

    @cached_property
    def tables(self) -> tuple[np.ndarray, np.ndarray]:
        """``group_bytes`` and ``group_time`` for every ``i < j`` (0 elsewhere),
        computed once: each row's sums run left to right, as ``sum`` adds, so
        every entry is the float ``group_time`` returns."""
        L = len(self.time)
        nbytes = np.zeros((L + 1, L + 1), dtype=np.int64)
        secs = np.zeros((L + 1, L + 1))
        for i in range(L):
            resident, work, t = 0, 0, 0
            for j in range(i + 1, L + 1):
                resident += self.resident[j - 1]
                work = max(work, self.work[j - 1])
                t += self.time[j - 1]
                nbytes[i, j], secs[i, j] = resident + work + self.held[j - 1], t
        return nbytes, secs


def layer_costs(spec: ModelSpec, workload: Workload, batch: int, micro_batches: int = 1,
                rates: Rates = Rates()) -> LayerCosts:
    """Costs of every layer for one replica running ``batch`` sequences. The
    working set is that of prefill (the engine always fills the cache)."""
    n_mb = min(micro_batches, batch)
    largest_mb = -(-batch // n_mb)
    T, nbytes = workload.seq_len, dtype_bytes(spec.dtype)
    kv = batch * kv_bytes_per_seq(spec, workload.max_len)
    resident, work, held, time = [], [], [], []
    for layer in range(spec.n_layers):
        out_width = spec.vocab_size if _is_last(spec, layer) and spec.vocab_size else spec.d_model
        resident.append(layer_weight_bytes(spec, layer) + kv)
        work.append(largest_mb * T * work_bytes_per_token(spec, layer))
        # A stage sends a micro-batch on before it sends the next, and the
        # last hands each on as it leaves (pipeline.Pipeline).
        held.append(largest_mb * T * out_width * nbytes)
        b = batch / n_mb  # every micro-batch streams the weights again
        t = layer_time(spec, layer, b, T, 0, rates) if workload.phase != "decode" else 0.0
        if workload.phase != "prefill":
            t += sum(layer_time(spec, layer, b, 1, T + s, rates)
                     for s in range(workload.decode_steps))
        time.append(n_mb * t)
    return LayerCosts(tuple(resident), tuple(work), tuple(held), tuple(time))


# -- the search ------------------------------------------------------------------

def split(costs: LayerCosts, groups: int, capacity: float = math.inf,
          key: str = "time") -> tuple[float, tuple[int, ...]] | None:
    """Cut the layers into exactly ``groups`` contiguous groups, each within
    ``capacity``, minimising the largest group ``time`` (or ``bytes``).
    Returns (that largest value, cut points ``0 = c0 < ... < cG = L``), or None.

    DP: ``best[g][j]`` is the smallest bottleneck of the first j layers in g
    groups; ``best[g][j] = min_i max(best[g-1][i], cost(i, j))``, of equal
    ones the latest ``i``. A group's bytes only grow as it starts earlier, so
    the groups that fit end ``j`` are those from some ``i`` on. Each ``g`` is
    one step over every (i, j) at once."""
    L = len(costs.time)
    if not 1 <= groups <= L:
        return None
    nbytes, secs = costs.tables
    cost = secs if key == "time" else nbytes.astype(np.float64)  # exact below 2**53 bytes
    i_of, j_of = np.indices((L + 1, L + 1))
    fits = (i_of < j_of) & (nbytes <= capacity)
    best = np.full(L + 1, math.inf)
    best[0] = 0.0
    cut = np.zeros((groups + 1, L + 1), dtype=np.int64)
    for g in range(1, groups + 1):
        # groups g+1.. need a layer each: the first g groups end at j <= L - (groups - g)
        ends = (j_of >= g) & (j_of <= L - (groups - g)) & (i_of >= g - 1)
        v = np.where(fits & ends, np.maximum(best[:, None], cost), math.inf)
        latest = L - np.argmin(v[::-1], axis=0)  # of the smallest, the latest i
        best = v[latest, np.arange(L + 1)]
        cut[g] = np.where(best < math.inf, latest, 0)
    if best[L] == math.inf:
        return None
    cuts, j = [L], L
    for g in range(groups, 0, -1):
        j = int(cut[g][j])
        cuts.append(j)
    value = float(best[L]) if key == "time" else int(best[L])
    return value, tuple(reversed(cuts))


def replicas_for(groups: int, ranks: int, batch: int) -> int:
    """Pipelines that fit the ranks, at most one per sequence."""
    return max(1, min(ranks // groups, batch))


def per_replica(batch: int, replicas: int) -> int:
    """The largest share of the batch (``balanced_ranges`` gives the first extra)."""
    return -(-batch // replicas)


CostsFor = Callable[[int], LayerCosts]  # replica batch -> per-layer costs


# More groups must be faster by more than rounding to be preferred: a compute-bound
# model is as fast on 1 group x R replicas as on R groups, up to the last bit.
TIE = 1e-9


def best_split(costs_for: CostsFor, n_layers: int, ranks: int, batch: int,
               capacity: float, micro_batches: int = 1
               ) -> tuple[int, int, tuple[int, ...], float] | None:
    """(groups, replicas, cuts, step seconds) of the fastest partition that
    fits, over 1..min(L, R) groups; ties (within ``TIE``) go to fewer groups.

    A step is the pipeline's: its micro-batches stream through the groups, so
    it takes the slowest group's time x (micro-batches + groups - 1) /
    micro-batches (GPipe's fill and drain). With one micro-batch two groups
    run one after the other, which replicas of one group do not."""
    found = None
    for groups in range(1, min(n_layers, ranks) + 1):
        replicas = replicas_for(groups, ranks, batch)
        b = per_replica(batch, replicas)
        s = split(costs_for(b), groups, capacity)
        if s is None:
            continue
        n_mb = min(micro_batches, b)
        step = s[0] * (n_mb + groups - 1) / n_mb
        if found is None or step < found[3] * (1 - TIE):
            found = (groups, replicas, s[1], step)
    return found


def min_capacity(costs_for: CostsFor, n_layers: int, ranks: int, batch: int) -> int:
    """The smallest capacity at which some partition fits ``ranks`` ranks."""
    return int(min(
        split(costs_for(per_replica(batch, replicas_for(g, ranks, batch))), g, key="bytes")[0]
        for g in range(1, min(n_layers, ranks) + 1)
    ))


def ranks_needed(costs_for: CostsFor, n_layers: int, batch: int, capacity: float) -> int | None:
    """The fewest ranks at which a partition fits ``capacity`` (None: no number
    does). For G groups, memory falls as replicas grow, so bisect the replicas.
    A group holds at least its largest layer, so where one layer alone does not
    fit at one sequence a replica (the least memory), nothing does; and past
    G = the best rank count so far, G groups take at least G ranks."""
    least = costs_for(per_replica(batch, batch))
    if any(least.group_bytes(k, k + 1) > capacity for k in range(n_layers)):
        return None
    best = None
    for groups in range(1, n_layers + 1):
        if best is not None and groups >= best:
            break
        def fits(replicas: int) -> bool:
            return split(costs_for(per_replica(batch, replicas)), groups, capacity) is not None

        if not fits(batch):
            continue
        lo, hi = 1, batch
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
        best = groups * lo if best is None else min(best, groups * lo)
    return best


# -- the result ----------------------------------------------------------------

class PartitionError(ShardwiseError):
    """No partition fits; carries the smallest capacity that works on the
    given ranks and the fewest ranks that work at the given capacity."""

    def __init__(self, problem: str, fix: str, min_capacity: int, ranks_needed: int | None):
        super().__init__(f"{problem}; {fix}")
        self.problem, self.min_capacity, self.ranks_needed = problem, min_capacity, ranks_needed


@dataclass(frozen=True)
class Group:
    layers: range
    weight_bytes: int
    kv_bytes: int
    work_bytes: int  # working set and held outputs
    time_s: float

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.work_bytes


@dataclass(frozen=True)
class Partition:
    groups: tuple[Group, ...]
    replicas: int
    ranks: int
    capacity: int

    @property
    def ranks_used(self) -> int:
        return len(self.groups) * self.replicas

    @property
    def idle_ranks(self) -> int:
        return self.ranks - self.ranks_used

    @property
    def bottleneck_s(self) -> float:
        return max(g.time_s for g in self.groups)


@lru_cache(maxsize=256)
def partition(spec: ModelSpec, workload: Workload, capacity: int, ranks: int,
              micro_batches: int = 1, rates: Rates = Rates(), ranks_flag: str = "--nproc",
              capacity_flag: str = "cap=") -> Partition:
    """The layer groups for ``capacity`` bytes per device on ``ranks`` ranks,
    or a :class:`PartitionError` that names the capacity / ranks that work
    (``ranks_flag``, ``capacity_flag``: how the command at hand sets them).
    Kept per arguments: a plan is validated and built once per rank, and a
    deep model's search takes a while."""
    if ranks < 1:
        raise ShardwiseError(f"need at least one rank to partition {spec.name} (got {ranks})")
    cache: dict[int, LayerCosts] = {}

    def costs_for(batch: int) -> LayerCosts:
        if batch not in cache:
            cache[batch] = layer_costs(spec, workload, batch, micro_batches, rates)
        return cache[batch]

    L, B = spec.n_layers, workload.batch
    found = best_split(costs_for, L, ranks, B, capacity, micro_batches)
    if found is None:
        need_c = min_capacity(costs_for, L, ranks, B)
        need_r = ranks_needed(costs_for, L, B, capacity)
        on = f"{ranks} rank" + ("s" if ranks > 1 else "")
        fix = f"the smallest capacity that works on {on} is {fmt_bytes(need_c)} ({capacity_flag}{capacity_text(need_c)})"
        if need_r is None:
            one = costs_for(1)
            k = max(range(L), key=lambda i: one.group_bytes(i, i + 1))
            raise PartitionError(
                f"{spec.name}: layer {k} alone needs {fmt_bytes(one.group_bytes(k, k + 1))} "
                f"(weights, KV cache and working set of one sequence), more than the capacity "
                f"{fmt_bytes(capacity)}", fix, need_c, None)
        raise PartitionError(
            f"{spec.name}: no layer partition fits {fmt_bytes(capacity)} per device on {on}",
            f"start {need_r} ranks ({ranks_flag} {need_r}), or {fix}", need_c, need_r)
    groups, replicas, cuts, _ = found
    return _partition_at(spec, workload, costs_for(per_replica(B, replicas)), cuts, replicas,
                         ranks, capacity)


def partition_at(spec: ModelSpec, workload: Workload, cuts, replicas: int, ranks: int,
                 capacity: int, micro_batches: int = 1, rates: Rates = Rates()) -> Partition:
    """The partition with the given cut points (``0 = c0 < ... < cG = L``) and
    replicas, as a run reports what it ran (its ``groups``), whatever the
    search would choose today."""
    costs = layer_costs(spec, workload, per_replica(workload.batch, replicas), micro_batches,
                        rates)
    return _partition_at(spec, workload, costs, tuple(cuts), replicas, ranks, capacity)


def _partition_at(spec, workload, costs: LayerCosts, cuts, replicas, ranks, capacity):
    b = per_replica(workload.batch, replicas)
    out = []
    for i, j in zip(cuts, cuts[1:]):
        weights = sum(layer_weight_bytes(spec, k) for k in range(i, j))
        kv = (j - i) * b * kv_bytes_per_seq(spec, workload.max_len)
        out.append(Group(range(i, j), weights, kv, costs.group_bytes(i, j) - weights - kv,
                         costs.group_time(i, j)))
    return Partition(tuple(out), replicas, ranks, capacity)


def plan_partition(spec: ModelSpec, workload: Workload, plan: Plan,
                   world_size: int) -> Partition:
    """The partition a layerwise plan implies on ``world_size`` ranks (pure, no processes)."""
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
