"""Predict a plan's speed, memory and communication without running it.

For (ModelSpec, Workload, Plan, Cluster) the model walks what each strategy
actually does on its busiest rank, layer by layer:

* every compute op costs max(FLOPs / achieved rate, bytes / HBM bandwidth),
  the roofline of Williams, Waterman & Patterson (2009). Ops: norms and
  residual adds, the QKV projection, the attention core (causal prefill
  scores ``T(T+1)/2`` (query, key) pairs per head, i.e. an average context
  of ``(T+1)/2``; a decode step reads the whole KV cache), W_o, the MLP (for
  MoE the router and the top-k experts each token visits; the weights read
  are those of the distinct experts that receive a token). The attention
  core runs at the rate of the kernel the code calls (SDPA as calibrated,
  FlashAttention-2 for attend_lse and eager decode, the memory-efficient
  kernel past head_dim 256). Elementwise passes the code makes (norms, adds,
  activation, KV-cache writes, each strategy's copies) run at the copy rate.
* issue: every kernel pays ``kernel_us`` on the GPU; an eager layer takes
  the longer of its GPU time and its host calls x ``launch_us``; a decode
  step replayed from a CUDA graph has no host work, reads the whole static
  cache and pays ``graph_latency_us`` per collective; the reference MoE loop
  waits for the device once per expert (see docs/costmodel.md).
* every collective costs alpha + factor x bytes / bus bandwidth on the link
  it crosses (:mod:`.clusters`): ring all-reduce 2(n-1)/n, all-gather,
  reduce-scatter and all-to-all (n-1)/n, point-to-point 1.
* pipelines (tp_pp, layerwise) pay fill and drain, GPipe style:
  (micro_batches + stages - 1) x the slowest stage's time per micro-batch.
* overlap where the strategy overlaps: ring hides each K/V hop behind the
  attention on the block in hand (max(hop, block) per ring step); ep hides
  the dispatch of chunk i+1 and the combine of chunk i behind the experts on
  chunk i (two streams, simulated).

Memory per rank: weights and KV cache exactly as the strategies allocate
them (tests compare them byte for byte with real runs), plus an estimate of
the activations (the global prompt every rank is handed, the largest layer's
working set of a micro-batch, the outputs a pipeline holds) and of the
communication buffers (receive buffers of the largest exchange).

All figures are for the busiest rank; a step waits for it.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from ..parallel.base import balanced_ranges, validate_plan
from ..spec import ModelSpec, Plan, ShardwiseError, Workload, dtype_bytes
from .clusters import Cluster

# What the reference block (model/reference.py) issues per decoder layer,
# outside collectives, counted from the code:
# * GPU kernels, eager: LayerNorm, QKV, K and V cache copies, SDPA, W_o, residual
#   add, LayerNorm, W_in, GELU, W_down, residual add (12). A decode step captured
#   in a CUDA graph takes the static-shape path instead: + arange/add for the
#   cache index (2), the mask's two aranges, add and compare (4), the mask's
#   conversion for SDPA (1) = 19.
# * host-side calls (each costs the profile's ``launch_us``, the measured host
#   time of one eager op): 9 module calls, 2 layer_norm, 4 linear, split and
#   3 views, 3 transposes, 2 cache slice-assigns (slice + copy_ each), 2 cache
#   slices, SDPA, transpose + reshape, 2 adds, GELU = 35; an eager decode step
#   also enters ``sdpa_kernel`` (the cuDNN exclusion) = 36.
BLOCK_KERNELS = 12
STATIC_DECODE_KERNELS = 19
BLOCK_HOST_OPS = 35
KERNELS_PER_EXPERT = 4  # a grouped-GEMM loop runs each local expert's matmuls and activation
HOST_OPS_PER_EXPERT = 9  # x[token], expert_mlp (2 matmuls, act, 2 transposes), weights[...], mul, index_add_
MOE_MISS_OPS = 4  # compare, nonzero, its device-to-host wait, numel
# FlashAttention-2 (and the memory-efficient kernel) compute a whole tile of
# query rows even when a decode step has one query: 128 rows for FA2 at
# head_dim 128 on sm90 (kBlockM), 64 for the memory-efficient kernel.
FLASH_Q_TILE = 128
EFFICIENT_Q_TILE = 64


@dataclass
class Op:
    """One compute op summed over a step on the busiest rank."""

    name: str
    flops: float = 0.0
    bytes: float = 0.0
    seconds: float = 0.0


@dataclass
class Coll:
    """One kind of collective (op / mesh axis) summed over a step on the busiest
    rank: bytes as :class:`~shardwise.parallel.comm.Comm` counts them."""

    key: str  # "all_reduce/tp"
    link: str
    calls: int = 0
    bytes: float = 0.0
    seconds: float = 0.0


@dataclass
class StepCost:
    """Time of one step (a whole prefill, or one decode step for the batch)."""

    seconds: float = 0.0
    compute_s: float = 0.0  # sum of the busiest rank's ops
    comm_s: float = 0.0  # sum of its collectives' times
    exposed_comm_s: float = 0.0  # the part not hidden behind compute
    bubble_s: float = 0.0  # pipeline fill and drain
    ops: dict[str, Op] = field(default_factory=dict)
    comms: dict[str, Coll] = field(default_factory=dict)

    def add_op(self, op: Op, times: float = 1.0) -> None:
        acc = self.ops.setdefault(op.name, Op(op.name))
        acc.flops += times * op.flops
        acc.bytes += times * op.bytes
        acc.seconds += times * op.seconds

    def add_comm(self, key: str, link: str, nbytes: float, seconds: float,
                 times: float = 1.0) -> None:
        if nbytes <= 0:
            return
        acc = self.comms.setdefault(key, Coll(key, link))
        acc.calls += int(round(times))
        acc.bytes += times * nbytes
        acc.seconds += times * seconds
        if acc.link != link and link == "ib":
            acc.link = link

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
    activations: int = 0
    comm_buffers: int = 0

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


# -- counting -----------------------------------------------------------------------

def fmt_bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def distinct_experts(local: int, n_experts: int, top_k: int, tokens: float) -> float:
    """Expected number of ``local`` experts (of ``n_experts``) that receive at
    least one of ``tokens`` tokens, each routed to ``top_k`` distinct experts
    uniformly: a given expert is missed by a token with probability 1 - k/E."""
    if tokens <= 0:
        return 0.0
    return local * (1.0 - (1.0 - top_k / n_experts) ** tokens)


@dataclass(frozen=True)
class Core:
    """The attention core of one rank in one layer."""

    seqs: float  # sequences
    heads: int  # query heads
    kv_heads: int  # key/value heads read
    queries: float  # query positions per sequence
    pairs: float  # (query, key) pairs scored per sequence and head
    keys: float  # key positions read per sequence (bytes of K and V)
    decode: bool = False
    # Which kernel runs it: "sdpa" = scaled_dot_product_attention as the
    # reference calls it in prefill (the profile's attention rate: cuDNN or
    # flash, whichever SDPA picks); "flash" = FlashAttention-2 (attend_lse calls
    # it directly; an eager decode step excludes cuDNN); "masked" = SDPA with an
    # explicit mask (the static-shape decode path: the memory-efficient kernel).
    # Past head_dim 256 every path runs the memory-efficient kernel.
    kernel: str = "sdpa"


@dataclass(frozen=True)
class LayerWork:
    """What one rank computes in one decoder layer for one micro-batch."""

    tokens: float  # rows through norms, QKV, W_o (and MLP unless MoE)
    qkv_out: int  # width of the local QKV projection's output
    wo_in: int  # input width of the local W_o rows
    core: Core
    ff: int = 0  # local d_ff of a dense MLP
    mlp_tokens: float | None = None  # rows through the dense MLP (default: tokens)
    expert_rows: float = 0.0  # MoE: (token, expert) rows computed here
    experts_hit: float = 0.0  # MoE: local experts whose weights are read
    experts_held: int = 0  # MoE: local experts (kernel launches)
    expert_ff: int = 0  # MoE: local d_ff of each expert
    router_tokens: float = 0.0  # MoE: tokens routed on this rank
    kv_rows: float | None = None  # (token x kv head) rows written to the KV cache (default tokens x core.kv_heads)
    copy_bytes: float = 0.0  # the strategy's own copies (bytes read + written)
    kernels: int = BLOCK_KERNELS  # GPU kernels outside collectives
    host_ops: int = BLOCK_HOST_OPS  # host-side calls outside collectives (eager)
    moe_loop: bool = True  # MoE through the reference loop (a host sync per expert)


class Roofline:
    """max(FLOPs / rate, bytes / bandwidth) for the ops of one model on one cluster.

    Bandwidths: elementwise passes (norms, adds, activation, copies: as many
    bytes written as read) at the device-copy rate ``hbm_gbps``; matmuls and
    the attention core, whose traffic is reads (weights, the KV cache), at the
    streaming rate (:meth:`Cluster.stream_rate`)."""

    def __init__(self, spec: ModelSpec, cluster: Cluster):
        self.spec, self.cluster = spec, cluster
        self.e = dtype_bytes(spec.dtype)
        # Compute rates held over a long run (Cluster.sustained_ratio; 1 unless
        # the profile measured it).
        self.derate = cluster.sustained_ratio
        self.mm = cluster.matmul_rate(spec.dtype) * self.derate
        self.attn = cluster.attention_rate(spec.head_dim, spec.dtype) * self.derate
        self.flash = (cluster.flash_rate(spec.dtype) * self.derate
                      if spec.head_dim <= 256 and self.e == 2 else self.attn)
        self.hbm = cluster.hbm_rate
        self.stream = cluster.stream_rate

    def op(self, name: str, flops: float, nbytes: float, rate: float | None = None,
           bw: float | None = None) -> Op:
        rate = rate or self.mm
        return Op(name, flops, nbytes, max(flops / rate, nbytes / (bw or self.hbm)))

    def copy(self, name: str, nbytes: float) -> Op:
        """An elementwise pass (``nbytes`` read + written) at the copy rate."""
        return Op(name, 0.0, nbytes, nbytes / self.hbm)

    def gemm(self, name: str, m: float, k: int, n: int, weight_reads: float = 1.0) -> Op:
        """``[m x k] @ [k x n]``: read both operands, write the result; the rate
        of the measured shape nearest (k, n)."""
        rate = self.cluster.gemm_rate(self.spec.dtype, k, n) * self.derate
        return self.op(name, 2 * m * k * n, (m * k + weight_reads * k * n + m * n) * self.e,
                       rate, self.stream)

    def core(self, c: Core) -> Op:
        """Prefill: 4 d FLOPs per scored pair and head at the kernel's rate. Decode
        (one query): the kernel still computes a whole tile of query rows
        (FA2 128, memory-efficient 64), and reads the keys it is given."""
        d = self.spec.head_dim
        flops = 4 * c.seqs * c.heads * d * c.pairs  # Q.K^T and P.V
        q_o = 2 * c.seqs * c.queries * c.heads * d
        kv = 2 * c.seqs * c.keys * c.kv_heads * d
        rate = self.flash if c.kernel == "flash" else self.attn
        work = flops
        if c.decode:
            tile = FLASH_Q_TILE if (c.kernel == "flash" and d <= 256) else EFFICIENT_Q_TILE
            work = 4 * c.seqs * c.heads * d * c.keys * max(c.queries, tile)
        t = max(work / rate, (q_o + kv) * self.e / self.stream)
        return Op("attention", flops, (q_o + kv) * self.e, t)

    def layer(self, w: LayerWork) -> list[Op]:
        s, D, e = self.spec, self.spec.d_model, self.e
        kv_rows = w.tokens * w.core.kv_heads if w.kv_rows is None else w.kv_rows
        ops = [
            # Two norms (read + write) and two residual adds (2 reads + 1 write).
            self.op("norms+residual", 16 * w.tokens * D, 10 * w.tokens * D * e),
            self.gemm("qkv", w.tokens, D, w.qkv_out),
            # K and V copied into the cache (read + write each).
            self.copy("kv write", 4 * kv_rows * self.spec.head_dim * e),
            self.core(w.core),
            self.gemm("w_o", w.tokens, w.wo_in, D),
        ]
        if w.copy_bytes:
            ops.append(self.copy("copies", w.copy_bytes))
        if s.is_moe:
            mats = s.mlp_matrices
            ops.append(self.gemm("router", w.router_tokens, D, s.n_experts))
            rows, F = w.expert_rows, w.expert_ff
            weights = w.experts_hit * mats * D * F * e
            acts = rows * (2 * D + (mats + 1) * F) * e  # in, out, hidden written and read
            ops.append(self.op("experts", 2 * rows * mats * D * F, weights + acts,
                               self.cluster.gemm_rate(s.dtype, D, F) * self.derate, self.stream))
        else:
            m = w.tokens if w.mlp_tokens is None else w.mlp_tokens
            n_in = 2 if s.activation == "swiglu" else 1
            ops.append(self.gemm("mlp", m, D, n_in * w.ff))
            ops.append(self.op("mlp", 8 * m * w.ff, (n_in + 1) * m * w.ff * e))  # activation
            ops.append(self.gemm("mlp", m, w.ff, D))
        merged: dict[str, Op] = {}
        for o in ops:
            acc = merged.setdefault(o.name, Op(o.name))
            acc.flops, acc.bytes, acc.seconds = (acc.flops + o.flops, acc.bytes + o.bytes,
                                                 acc.seconds + o.seconds)
        return list(merged.values())

    def kernels(self, w: LayerWork) -> int:
        return w.kernels + KERNELS_PER_EXPERT * w.experts_held

    def host_s(self, w: LayerWork) -> float:
        """Host time to issue the layer eagerly: its calls x the measured cost of
        one eager op (``launch_us``)."""
        ops = w.host_ops + (HOST_OPS_PER_EXPERT * w.experts_held if not w.moe_loop else 0)
        return ops * self.cluster.launch_us * 1e-6

    def launch_floor(self, w: LayerWork, collectives: int = 0) -> float:
        """Host time of the layer and its eager collectives' calls (a lower bound
        of an eager layer)."""
        return self.host_s(w) + collectives * self.cluster.launch_us * 1e-6


def layer_times(roof: Roofline, w: LayerWork, graph: bool = False) -> tuple[float, list[Op]]:
    """(seconds, ops) of one layer outside its collectives.

    GPU time: the ops' rooflines plus ``kernel_us`` per kernel (launch latency
    and tail, paid in a stream and in a CUDA graph alike). Eager, the host
    issues every call (``launch_us`` each) while the GPU runs what it has
    been given: the layer takes the longer of the two. A CUDA graph replay has
    no host work."""
    ops = roof.layer(w)
    cl = roof.cluster
    gpu = sum(o.seconds for o in ops) + roof.kernels(w) * cl.kernel_s
    if not (roof.spec.is_moe and w.moe_loop):
        return (gpu if graph else max(gpu, roof.host_s(w))), ops
    # The reference MoE loop asks the device which tokens chose each local expert
    # (torch.nonzero): the host waits for the GPU once per expert, so from the
    # first expert on, host calls and GPU work alternate instead of overlapping.
    # A miss costs the compare, nonzero and its device-to-host wait; a hit also
    # its gather, two matmuls, activation, weighting and index_add_.
    launch = cl.launch_us * 1e-6
    t_exp = sum(o.seconds for o in ops if o.name == "experts")
    rest_gpu = gpu - t_exp - KERNELS_PER_EXPERT * w.experts_held * cl.kernel_s
    rest_host = w.host_ops * launch
    loop = (t_exp + w.experts_held * (MOE_MISS_OPS * launch + cl.kernel_s)
            + w.experts_hit * HOST_OPS_PER_EXPERT * launch)
    return max(rest_gpu, rest_host) + loop, ops


def layer_seconds(roof: Roofline, w: LayerWork, collectives: int = 0,
                  graph: bool = False) -> tuple[float, list[Op]]:
    """A layer's compute time (see :func:`layer_times`); ``collectives`` is kept
    for callers that count them (their time is added by the strategy)."""
    return layer_times(roof, w, graph)


# -- weights and KV cache, exactly as the strategies allocate them -----------------

def norm_params(spec: ModelSpec) -> int:
    """One norm's parameters (LayerNorm: weight and bias; RMSNorm: weight)."""
    return spec.norm_params() // 2


def attn_weights(spec: ModelSpec, heads: int, kv_heads: int, dim: int) -> int:
    """Fused QKV ``[(H + 2 Hkv) d, D]`` plus W_o ``[D, H d]`` for a local slice."""
    return (heads + 2 * kv_heads) * dim * spec.d_model + spec.d_model * heads * dim


def mlp_weights(spec: ModelSpec, ff: int, experts: int = 0) -> int:
    """Dense: the MLP's matrices for ``ff`` units; MoE: ``experts`` experts of
    ``ff`` units each plus the full router (every strategy replicates it)."""
    per = spec.mlp_matrices * spec.d_model * ff
    return experts * per + spec.n_experts * spec.d_model if spec.is_moe else per


def kv_bytes(spec: ModelSpec, seqs: int, kv_heads: int, positions: int) -> int:
    """K and V of one layer."""
    return 2 * seqs * kv_heads * positions * spec.head_dim * dtype_bytes(spec.dtype)


# -- the strategies -------------------------------------------------------------------

@dataclass
class _Model:
    """What one strategy's model returns."""

    prefill: StepCost
    decode: StepCost
    weights: list[int]  # parameters x dtype bytes, per rank
    kv: list[int]
    activations: int  # the busiest rank's, estimated
    buffers: int
    notes: list[str] = field(default_factory=list)


def whole_layer(c, tokens: float, core, routed: float, kernels: int, **extra) -> LayerWork:
    """One rank running a whole decoder layer on ``tokens`` token rows (ring,
    layerwise): every head, and the dense MLP or every expert with ``routed``
    tokens choosing among them (an expert loop issues 3 kernels fewer than the
    dense MLP's count here; each expert's own are counted per expert)."""
    spec = c.spec
    H, Hkv, d = spec.n_heads, spec.kv_heads, c.d
    if spec.is_moe:
        return LayerWork(tokens, (H + 2 * Hkv) * d, H * d, core,
                         expert_rows=c.moe_rows(tokens, 1.0),
                         experts_hit=distinct_experts(spec.n_experts, spec.n_experts,
                                                      spec.top_k, routed),
                         experts_held=spec.n_experts, expert_ff=spec.d_ff,
                         router_tokens=tokens, kernels=kernels - 3, **extra)
    return LayerWork(tokens, (H + 2 * Hkv) * d, H * d, core, ff=spec.d_ff, kernels=kernels,
                     **extra)


class _Ctx:
    def __init__(self, spec: ModelSpec, wl: Workload, plan: Plan, cluster: Cluster, topo,
                 graphs: bool | None = None):
        self.spec, self.wl, self.plan, self.cluster, self.topo = spec, wl, plan, cluster, topo
        # Whether decode steps replay a CUDA graph (None: where the strategy can).
        self.graphs = graphs
        self.graph = False  # the step being modelled (set per step)
        self.roof = Roofline(spec, cluster)
        self.e = dtype_bytes(spec.dtype)
        self.P = topo.world_size
        self.D, self.d = spec.d_model, spec.head_dim
        self.T, self.B = wl.seq_len, wl.batch
        self.S = wl.seq_len + 1  # context a decode step attends to (its first step)
        self.in_width = self.D if spec.vocab_size is None else 0
        self.inputs = wl.batch * (wl.seq_len + wl.decode_steps) * max(self.in_width * self.e, 8)

    def groups(self, axis: str) -> list[list[int]]:
        """Every group of global ranks along ``axis`` (``world``: all ranks)."""
        topo = self.topo
        if axis == "world":
            return [list(range(self.P))]
        seen, out = set(), []
        for r in range(self.P):
            topo.rank = r
            g = tuple(topo.group_ranks(axis))
            if g not in seen:
                seen.add(g)
                out.append(list(g))
        topo.rank = 0
        return out

    def coll(self, op: str, axis: str, nbytes: float) -> tuple[float, str]:
        """Time of one collective on ``axis``: the slowest of its groups. The
        profile's latency is an eager call's (host work included); inside a
        CUDA graph a collective pays ``graph_latency_us`` instead."""
        groups = self.groups(axis)
        if len(groups[0]) <= 1 or nbytes <= 0:
            return 0.0, "-"
        t, link = max((self.cluster.collective_time(op, nbytes, g) for g in groups),
                      key=lambda x: x[0])
        return self.in_graph(t, op, link), link

    def in_graph(self, t: float, op: str, link: str) -> float:
        if not self.graph or link not in self.cluster.links:
            return t
        # What remains of an eager call without its host work: the growth of its
        # time over the smallest message's (whose apparent bandwidth is latency
        # jitter, not wire time), after the graph's own latency.
        lc = self.cluster.link(link, op)
        smallest = lc.table[0][0] if lc.table else 0.0
        t0 = lc.time(op, smallest, 2) if smallest else lc.latency_us * 1e-6
        return max(t - t0, 0.0) + self.cluster.graph_latency_s

    def add(self, step: StepCost, op: str, axis: str, nbytes: float, times: float = 1.0) -> float:
        """Record ``times`` collectives; return their total time."""
        t, link = self.coll(op, axis, nbytes)
        if t > 0:
            step.add_comm(f"{'send' if op == 'p2p' else op}/{axis}", link, nbytes, t, times)
        return t * times

    def ends(self, step: StepCost, tokens: float, vocab_rows: int | None = None) -> float:
        """Embedding lookup and LM head on the ranks holding them (vocab models)."""
        if self.spec.vocab_size is None:
            return 0.0
        V = self.spec.vocab_size if vocab_rows is None else vocab_rows
        ops = [self.roof.op("embedding", 0, 2 * tokens * self.D * self.e),
               self.roof.gemm("lm_head", tokens, self.D, V)]
        for o in ops:
            step.add_op(o)
        return sum(o.seconds for o in ops)

    def ends_weights(self, first: bool, last: bool, rows: int | None = None) -> int:
        """Embedding (first stage), final norm and LM head (last stage)."""
        V = self.spec.vocab_size
        n = norm_params(self.spec) if last else 0
        if V is not None:
            rows = V if rows is None else rows
            n += rows * self.D * (first + last)
        return n

    def layer_norms(self) -> int:
        return 2 * norm_params(self.spec)

    def moe_rows(self, tokens: float, share: float) -> float:
        """(token, expert) rows a rank holding ``share`` of the experts computes."""
        return tokens * self.spec.top_k * share


def _pipeline(stage_s: list[float], hop_s: float, micro_batches: int) -> tuple[float, float]:
    """GPipe without backward: (total, bubble) for ``micro_batches`` through
    stages of the given per-micro-batch times, each hop costing ``hop_s``."""
    slot = max(stage_s) + (hop_s if len(stage_s) > 1 else 0.0)
    total = (micro_batches + len(stage_s) - 1) * slot
    return total, total - micro_batches * max(stage_s)


def _decode_core(c: _Ctx, b: float, heads: int, kv_heads: int, held: int, capacity: int,
                 graph: bool) -> Core:
    """One new token per sequence. Eager (``pos`` an int) the reference reads the
    cache up to the position with FlashAttention-2 (``sdpa_kernel`` leaves cuDNN
    out); in a CUDA graph (``pos`` a device tensor) it reads the whole static
    cache (``capacity`` positions) with a mask."""
    if graph:
        return Core(b, heads, kv_heads, 1, capacity, capacity, True, "masked")
    return Core(b, heads, kv_heads, 1, held, held, True, "flash")


def _tp_pp(c: _Ctx) -> _Model:
    from ..parallel.tp_pp import TpPp

    spec, topo = c.spec, c.topo
    tp, pp = TpPp.degrees(c.plan)
    mb = min(c.plan.micro_batches, c.B)
    stages = [b - a for a, b in balanced_ranges(spec.n_layers, pp)]
    H, Hkv = spec.n_heads // tp, spec.kv_heads // tp
    El = spec.n_experts // tp if spec.is_moe else 0
    b = -(-c.B // mb)  # the largest micro-batch
    can_graph = pp == 1 and not spec.is_moe  # TpPp.supports_graphs
    graph_decode = can_graph if c.graphs is None else (c.graphs and can_graph)

    def work(tokens: float, core: Core, static: bool) -> LayerWork:
        # ReduceAfter wraps attention and MLP (2 module calls + 2 Comm calls);
        # a pipeline takes a batch view of each layer's cache (2 slices).
        kernels = STATIC_DECODE_KERNELS if static else BLOCK_KERNELS
        host = BLOCK_HOST_OPS + 4 + (2 if pp > 1 or mb > 1 else 0) + (core.kernel == "flash")
        if spec.is_moe:
            return LayerWork(tokens, (H + 2 * Hkv) * c.d, H * c.d, core,
                             expert_rows=c.moe_rows(tokens, El / spec.n_experts),
                             experts_hit=distinct_experts(El, spec.n_experts, spec.top_k, tokens),
                             experts_held=El, expert_ff=spec.d_ff, router_tokens=tokens,
                             kernels=kernels - 3, host_ops=host)
        return LayerWork(tokens, (H + 2 * Hkv) * c.d, H * c.d, core, ff=spec.d_ff // tp,
                         kernels=kernels, host_ops=host)

    def step(tokens_per_seq: int, core: Core, graph: bool = False) -> StepCost:
        c.graph = graph
        st = StepCost()
        w = work(b * tokens_per_seq, core, graph)
        t_layer, ops = layer_times(c.roof, w, graph)
        # The largest micro-batch sets the slot; traffic is recorded for the
        # micro-batches as they are (balanced sizes, averaged).
        y, y_avg = b * tokens_per_seq * c.D * c.e, c.B * tokens_per_seq * c.D * c.e / mb
        t_ar_layer = 2 * c.coll("all_reduce", "tp", y)[0]
        c.add(st, "all_reduce", "tp", y_avg, 2 * max(stages) * mb)
        stage_s = []
        for s, n in enumerate(stages):
            t = n * (t_layer + t_ar_layer)
            if s == 0 or s == pp - 1:
                t += c.ends(StepCost(), b * tokens_per_seq)
            stage_s.append(t)
        for o in ops:
            st.add_op(o, max(stages) * c.B / b)
        c.ends(st, c.B * tokens_per_seq)
        hop = c.coll("p2p", "pp", y)[0] if pp > 1 else 0.0
        if pp > 1:
            c.add(st, "p2p", "pp", y_avg, mb)
        st.seconds, st.bubble_s = _pipeline(stage_s, hop, mb)
        st.compute_s = sum(o.seconds for o in st.ops.values())
        st.comm_s = sum(x.seconds for x in st.comms.values())
        st.exposed_comm_s = (mb + pp - 1) * (max(stages) * t_ar_layer + hop)
        c.graph = False
        return st

    T, S = c.T, c.S
    prefill = step(T, Core(b, H, Hkv, T, T * (T + 1) / 2, T))
    decode = step(1, _decode_core(c, b, H, Hkv, S, c.wl.max_len, graph_decode), graph_decode)
    weights, kv = [], []
    for r in range(c.P):
        coords = topo.coords(r)
        s = coords["pp"]
        n = stages[s]
        per_layer = attn_weights(spec, H, Hkv, c.d) + mlp_weights(
            spec, spec.d_ff // tp if not spec.is_moe else spec.d_ff, El) + c.layer_norms()
        weights.append((n * per_layer + c.ends_weights(s == 0, s == pp - 1)) * c.e)
        kv.append(n * kv_bytes(spec, c.B, Hkv, c.wl.max_len))
    # One micro-batch's layer: input and residual, normed copy, QKV, attention
    # output, the all-reduced partial sum, MLP hidden; the pipeline's outputs.
    hidden = (spec.top_k * spec.d_ff * spec.mlp_matrices * El / max(spec.n_experts, 1)
              if spec.is_moe else spec.mlp_matrices * spec.d_ff // tp)
    width = 4 * c.D + (2 * H + 2 * Hkv) * c.d + hidden
    act = c.inputs + b * T * width * c.e + c.B * T * c.D * c.e
    buffers = b * T * c.D * c.e if pp > 1 else 0  # receive buffer of a stage
    return _Model(prefill, decode, weights, kv, act, buffers)


def _helix(c: _Ctx) -> _Model:
    from ..parallel.helix import Helix, positions_held

    spec = c.spec
    N, M = Helix.degrees(c.plan)
    P = N * M
    mode = Helix.repartition(spec, N, M)
    how = c.plan.option("reduce", "hier")
    H, Hkv, d, D, e = spec.n_heads // N, spec.kv_heads // N, c.d, c.D, c.e
    B, T, S = c.B, c.T, c.S
    chunks = balanced_ranges(T, M)
    F = spec.d_ff // P

    can_graph = mode == "heads"  # Helix.supports_graphs
    graph_decode = can_graph if c.graphs is None else (c.graphs and can_graph)

    def work(tokens: float, core: Core, static: bool, copies: float, kernels: int,
             host: int, kv_rows: float | None = None) -> LayerWork:
        kernels += STATIC_DECODE_KERNELS if static else BLOCK_KERNELS
        host += BLOCK_HOST_OPS + (core.kernel == "flash")
        if spec.is_moe:  # every expert, 1/P of its d_ff
            return LayerWork(tokens, (H + 2 * Hkv) * d // M, H * d // M, core,
                             expert_rows=c.moe_rows(tokens, 1.0),
                             experts_hit=distinct_experts(spec.n_experts, spec.n_experts,
                                                          spec.top_k, tokens),
                             experts_held=spec.n_experts, expert_ff=F, router_tokens=tokens,
                             kv_rows=kv_rows, copy_bytes=copies, kernels=kernels - 3,
                             host_ops=host)
        return LayerWork(tokens, (H + 2 * Hkv) * d // M, H * d // M, core, ff=F,
                         kv_rows=kv_rows, copy_bytes=copies, kernels=kernels, host_ops=host)

    # Partial sums over all P ranks: attention and MLP of every layer, and the
    # vocabulary-sharded embedding of a model with token ids.
    n_sums = 2 * spec.n_layers + (spec.vocab_size is not None)

    def reduce(st: StepCost, y: float) -> tuple[float, float]:
        """Sum a partial [rows x D] over all P ranks ``n_sums`` times: (time,
        bytes of the zero-padding copy SumOverMesh makes when M does not divide
        the rows x D elements)."""
        if how == "flat":
            return c.add(st, "all_reduce", "world", y * e, n_sums), 0.0
        padded = -(-y // M) * M * e
        t = c.add(st, "reduce_scatter", "slice", padded, n_sums)
        t += c.add(st, "all_reduce", "group", padded / M, n_sums)
        t += c.add(st, "all_gather", "slice", padded, n_sums)
        return t, (y * e + padded if padded != y * e else 0.0)

    def step(decode: bool) -> StepCost:
        graph = decode and graph_decode
        c.graph = graph
        st, L = StepCost(), spec.n_layers
        tokens = B * (1 if decode else T)
        qkv_local = tokens * (H + 2 * Hkv) * d // M * e  # bytes of this rank's QKV output
        kv_rows = None
        if mode == "heads":
            core = (_decode_core(c, B, H // M, Hkv // M, S, c.wl.max_len, graph) if decode
                    else Core(B, H // M, Hkv // M, T, T * (T + 1) / 2, T))
            t_x = c.add(st, "all_to_all", "slice", tokens * (H + 2 * Hkv) * d // M * e, L)
            # HeadSliceAttention: the send buffer (cat), Comm's contiguous copy of
            # its movedim view (M > 1), and the permute + reshape of what arrives.
            n_copy = 3 if M > 1 else 2
            copies, kernels, host = n_copy * 2 * qkv_local, n_copy, 10
        elif decode:
            held = max(positions_held(M, s, T, S) for s in range(M))
            core = Core(B, H, Hkv, 1, held, held, True, "flash")  # attend_lse
            t_x = c.add(st, "all_gather", "slice", B * (H + 2 * Hkv) * d * e, L)
            t_x += c.add(st, "all_to_all", "slice", M * B * H * (d // M + 1) * 4, L)
            kv_rows = B * Hkv / M  # one rank of M stores the new token
            copies, kernels, host = 0.0, 14, 30  # cat, splits, merge_stack, casts
        else:
            # The masked core scores a full (chunk x keys up to the chunk's end)
            # rectangle; the last chunk is the busiest.
            rect = max((b - a) * b for a, b in chunks)
            n = max(b - a for a, b in chunks)
            core = Core(B, H, Hkv, n, rect, T, False, "masked")
            t_x = c.add(st, "all_to_all", "slice", B * T * H * d // M * e, L)  # queries out
            t_x += c.add(st, "all_to_all", "slice", B * n * H * d * e, L)  # outputs back
            t_x += c.add(st, "all_gather", "slice", B * T * 2 * Hkv * d * e, L)
            kv_rows = B * n * Hkv
            # Received queries permuted, K/V concatenated and split, the output
            # permuted before and after its exchange (read + write each).
            copies = 2 * e * B * (T * H * d // M + n * H * d + 2 * T * 2 * Hkv * d // M
                                  + 2 * n * H * d)
            kernels, host = 6, 20
        t_red, pad_copy = reduce(st, tokens * D)
        # SumAfter and SumOverMesh (reshape, pad check, slice, view) for both sums.
        host += 2 * 5
        kernels += 2 * (1 if pad_copy else 0)
        w = work(tokens, core, graph, copies + 2 * pad_copy, kernels, host, kv_rows)
        t_layer, ops = layer_times(c.roof, w, graph)
        for o in ops:
            st.add_op(o, L)
        t_ends = c.ends(st, tokens, -(-spec.vocab_size // P) if spec.vocab_size else None)
        st.compute_s = L * t_layer + t_ends
        st.comm_s = st.exposed_comm_s = t_x + t_red
        st.seconds = st.compute_s + st.comm_s  # helix's collectives are blocking
        c.graph = False
        return st

    prefill, decode = step(False), step(True)
    rows = -(-spec.vocab_size // P) if spec.vocab_size else None
    per_layer = (attn_weights(spec, H, Hkv, d // M) + mlp_weights(spec, F, spec.n_experts)
                 + c.layer_norms())
    w = (spec.n_layers * per_layer + c.ends_weights(True, True, rows)) * e
    if mode == "heads":
        kv = [spec.n_layers * kv_bytes(spec, B, Hkv // M, c.wl.max_len)] * P
    else:
        kv = [spec.n_layers * kv_bytes(spec, B, Hkv,
                                       positions_held(M, r % M, T, c.wl.max_len))
              for r in range(P)]
    # Every rank carries every token: input, residual, normed copy, QKV slice
    # and its re-partitioned copy, the partial output and its gathered sum.
    hidden = (spec.top_k * F * spec.mlp_matrices if spec.is_moe else spec.mlp_matrices * F)
    width = 5 * D + 2 * (H + 2 * Hkv) * d // M + hidden
    if mode == "sequence":
        width += 2 * Hkv * d  # K/V of the whole group, gathered
    act = c.inputs + B * T * width * e
    return _Model(prefill, decode, [w] * P, kv, act, B * T * D * e // M)


def _ring(c: _Ctx) -> _Model:
    from ..parallel.ring import ZigZag

    spec, P = c.spec, c.P
    mb = min(c.plan.micro_batches, c.B)
    b = -(-c.B // mb)
    H, Hkv, d, D, e, T = spec.n_heads, spec.kv_heads, c.d, c.D, c.e, c.T
    zz = ZigZag(P, T, c.wl.decode_steps)
    n = max(zz.real(r) for r in range(P))  # the busiest rank's prompt tokens
    busiest = max(range(P), key=zz.pairs)
    blocks = zz.blocks(busiest)
    L = spec.n_layers

    def work(tokens: float, core: Core, routed: float, copies: float, kernels: int,
             host: int, kv_rows: float | None = None) -> LayerWork:
        return whole_layer(c, tokens, core, routed, kernels, host_ops=host, kv_rows=kv_rows,
                           copy_bytes=copies)

    # Prefill: local tokens only; the core is P ring steps, each hop hidden
    # behind the attention on the block in hand. attend_lse runs FlashAttention-2
    # (head_dim <= 256) or the memory-efficient kernel, both with the lse.
    st = StepCost()
    rows = b * n  # token rows of a micro-batch on the busiest rank
    core = Core(b, H, Hkv, n, zz.pairs(busiest), P * zz.block_rows, False, "flash")
    # RingAttention.prefill's own passes (bytes read + written):
    merged_rows = sum(q1 - q0 for _, q0, q1, *_ in blocks)
    copies = (2 * rows * (H + 2 * Hkv) * d * e  # q, k, v of the two zig-zag chunks concatenated
              + 2 * 2 * rows * Hkv * d * e  # k, v copied into the block that travels
              + 2 * b * Hkv * (zz.block_rows - n) * d * e  # its unused rows zeroed
              + b * n * H * d * 4  # the float32 accumulator zeroed
              # merge_into per computed block: o *= share (fp32 read + write),
              # o += share_b * o_b (read o and o_b, write o)
              + merged_rows * b * H * d * (16 + e)
              + b * n * H * d * (4 + e)  # o.to(dtype)
              + 2 * b * n * H * d * e)  # transpose + reshape for W_o
    # Kernels and calls beyond the reference block: a second QKV and its chunk
    # handling, 3 concatenations, the block fills, accumulator and lse set-up;
    # per ring step the exchange, attend_lse and merge_into (~10 elementwise).
    w_pre = work(rows, core, rows, copies, BLOCK_KERNELS + 12 + 11 * P,
                 BLOCK_HOST_OPS + 20 + 15 * P)
    rest_ops = c.roof.layer(w_pre)
    core_op = next(o for o in rest_ops if o.name == "attention")
    # The core's time split over the ring steps by the pairs each block scores.
    pairs_at = {s_: ((q1 - q0) * (q1 - q0 + 1) / 2 if causal else (q1 - q0) * (k1 - k0))
                for s_, q0, q1, k0, k1, causal in blocks}
    total_pairs = sum(pairs_at.values()) or 1.0
    hop_bytes = 2 * b * Hkv * zz.block_rows * d * e
    hop = max((c.cluster.p2p_time(hop_bytes, r, (r + 1) % P)[0] for r in range(P)), default=0.0)
    hop_link = "ib" if any(c.cluster.node_of(r) != c.cluster.node_of((r + 1) % P)
                           for r in range(P)) else "nvlink"
    ring_s = sum(max(hop if s_ < P - 1 else 0.0, core_op.seconds * pairs_at.get(s_, 0) / total_pairs)
                 for s_ in range(P))
    gpu = (sum(o.seconds for o in rest_ops if o.name != "attention") + ring_s
           + c.roof.kernels(w_pre) * c.cluster.kernel_s)
    t_layer = max(gpu, c.roof.host_s(w_pre))
    for o in rest_ops:
        st.add_op(o, L * c.B / b)
    if P > 1:
        st.add_comm("send/seq", hop_link, hop_bytes * c.B / (b * mb), hop, (P - 1) * L * mb)
    # Every rank picks its zig-zag rows out of the global prompt once (index_select).
    pick = c.roof.copy("copies", 2 * c.B * n * max(c.in_width * e, 8))
    st.add_op(pick)
    st.compute_s = sum(o.seconds for o in st.ops.values())
    st.comm_s = sum(x.seconds for x in st.comms.values())
    st.seconds = mb * (L * t_layer + c.ends(st, b * n)) + pick.seconds
    st.exposed_comm_s = max(0.0, st.seconds - st.compute_s)
    prefill = st

    # Decode (eager: the shard's length depends on the position): every rank
    # runs the whole layer on every new token, attends to its cache shard with
    # attend_lse, and one all-gather of (o, lse) merges the shards (merge_stack:
    # ~12 small kernels; ~23 calls more than the reference attention).
    st = StepCost()
    held = max(zz.kv_len(r, min(T + 1, c.wl.max_len)) if c.wl.decode_steps else zz.real(r)
               for r in range(P))
    width = d + max(1, 4 // e)
    part = P * b * H * width * e  # the gathered (o, lse) pairs
    copies = 2 * b * H * width * e + 6 * part + 2 * b * H * d * 4
    w = work(b, Core(b, H, Hkv, 1, held, held, True, "flash"), c.B, copies,
             BLOCK_KERNELS + 14, BLOCK_HOST_OPS + 23, kv_rows=b * Hkv / P)
    t_layer, ops = layer_times(c.roof, w)
    t_ag = L * mb * c.coll("all_gather", "seq", P * b * H * width * e)[0]
    c.add(st, "all_gather", "seq", P * c.B / mb * H * width * e, L * mb)
    for o in ops:
        st.add_op(o, L * c.B / b)
    st.compute_s = mb * (L * t_layer + c.ends(st, b))
    st.comm_s = st.exposed_comm_s = t_ag
    st.seconds = st.compute_s + t_ag
    decode = st

    w_all = (L * (attn_weights(spec, H, Hkv, d) + mlp_weights(spec, spec.d_ff, spec.n_experts)
                  + c.layer_norms()) + c.ends_weights(True, True)) * e
    kv = [L * kv_bytes(spec, c.B, Hkv, zz.kv_len(r, c.wl.max_len)) for r in range(P)]
    hidden = spec.top_k * spec.d_ff * spec.mlp_matrices if spec.is_moe else spec.mlp_matrices * spec.d_ff
    width = 4 * D + (H + 2 * Hkv) * d + hidden
    act = (c.inputs + b * n * width * e + b * H * n * (d + 1) * 4  # float32 accumulator
           + c.B * n * D * e)  # outputs of every micro-batch
    return _Model(prefill, decode, [w_all] * P, kv, act, 2 * hop_bytes)


def _ep(c: _Ctx) -> _Model:
    from ..parallel.ep import MIN_CHUNK_TOKENS, ExpertParallel

    spec, P = c.spec, c.P
    E, k, L = spec.n_experts, spec.top_k, spec.n_layers
    El = E // P
    H, Hkv, d, D, e, T, S = spec.n_heads, spec.kv_heads, c.d, c.D, c.e, c.T, c.S
    ranges = balanced_ranges(c.B, P)
    b = ranges[0][1] - ranges[0][0]  # rank 0 holds the most sequences
    fixed = ExpertParallel.chunks_option(c.plan)

    def chunks_for(tokens: int) -> int:  # ExpertParallel.chunk_count
        if fixed is not None:
            return max(1, min(fixed, tokens))
        return 2 if tokens >= 2 * MIN_CHUNK_TOKENS else 1

    def step(new: int) -> StepCost:
        st = StepCost()
        local, routed = b * new, c.B * new
        K = chunks_for(local)
        core = (_decode_core(c, b, H, Hkv, S, c.wl.max_len, False) if new == 1
                else Core(b, H, Hkv, T, T * (T + 1) / 2, T))
        rows = routed * k / P  # (token, expert) rows a rank computes, balanced routing
        w = LayerWork(local, (H + 2 * Hkv) * d, H * d, core, expert_rows=rows,
                      experts_hit=distinct_experts(El, E, k, routed), experts_held=El,
                      expert_ff=spec.d_ff, router_tokens=local, kernels=BLOCK_KERNELS - 3 + 8,
                      host_ops=BLOCK_HOST_OPS + 20 + (new == 1), moe_loop=False)
        ops = c.roof.layer(w)
        t_exp = next(o.seconds for o in ops if o.name == "experts")
        t_rest = sum(o.seconds for o in ops if o.name != "experts")
        t_tab = c.add(st, "all_gather", "ep", P * K * E * 8, L)  # routing table (int64)
        disp, comb = local * k * D * e, rows * D * e
        t_d = c.coll("all_to_all", "ep", disp / K)[0]
        t_c = c.coll("all_to_all", "ep", comb / K)[0]
        c.add(st, "all_to_all", "ep", disp / K, L * K)
        c.add(st, "all_to_all", "ep", comb / K, L * K)
        # Two streams: the exchanges in issue order d0, d1, c0, d2, c1, ...;
        # experts on chunk i after its dispatch and the experts on chunk i-1.
        comm_free = d_end_next = t_d
        comp_free = 0.0
        d_end = [t_d]
        for i in range(K):
            if i + 1 < K:
                d_end_next = comm_free + t_d
                comm_free = d_end_next
                d_end.append(d_end_next)
            comp_free = max(comp_free, d_end[i]) + t_exp / K
            comm_free = max(comm_free, comp_free) + t_c
        moe_s = comm_free
        # Routing, argsort and the routing table before the host reads the counts
        # (.tolist(): the host waits for the GPU once a layer); then per chunk
        # the gather, the exchanges, the expert loop (host-known sizes).
        launch = c.cluster.launch_us * 1e-6
        t_rest += c.roof.kernels(w) * c.cluster.kernel_s
        host_pre = (w.host_ops + 8) * launch
        host_moe = (K * 12 + K * El * HOST_OPS_PER_EXPERT) * launch
        t_layer = max(t_rest, host_pre) + t_tab / L + launch + max(moe_s, host_moe)
        for o in ops:
            st.add_op(o, L)
        st.compute_s = sum(o.seconds for o in st.ops.values())
        st.comm_s = sum(x.seconds for x in st.comms.values())
        st.seconds = L * t_layer + c.ends(st, local)
        st.exposed_comm_s = max(0.0, st.seconds - st.compute_s)
        return st

    prefill, decode = step(T), step(1)
    per_layer = attn_weights(spec, H, Hkv, d) + mlp_weights(spec, spec.d_ff, El) + c.layer_norms()
    w = (L * per_layer + c.ends_weights(True, True)) * e
    kv = [L * kv_bytes(spec, b1 - b0, Hkv, c.wl.max_len) for b0, b1 in ranges]
    rows = c.B * T * k / P
    act = (c.inputs + b * T * (4 * D + (2 * H + 2 * Hkv) * d) * e
           + rows * (2 * D + spec.mlp_matrices * spec.d_ff) * e  # received rows, hidden, results
           + b * T * k * D * e)  # the sorted copy sent out
    return _Model(prefill, decode, [w] * P, kv, act, int(rows * D * e))


def _layerwise(c: _Ctx) -> _Model:
    from ..parallel.layerwise import plan_partition

    spec = c.spec
    part = plan_partition(spec, c.wl, c.plan, c.P)
    G, R = len(part.groups), part.replicas
    H, Hkv, d, D, e, T, S = spec.n_heads, spec.kv_heads, c.d, c.D, c.e, c.T, c.S
    replica_ranges = balanced_ranges(c.B, R)
    rb = replica_ranges[0][1] - replica_ranges[0][0]
    mb = min(c.plan.micro_batches, rb)
    b = -(-rb // mb)

    def work(tokens: float, core: Core) -> LayerWork:
        # The pipeline takes a batch view of each layer's cache (2 slices); an
        # eager decode step enters sdpa_kernel.
        host = BLOCK_HOST_OPS + 2 + (core.kernel == "flash")
        return whole_layer(c, tokens, core, tokens, BLOCK_KERNELS, host_ops=host)

    def step(new: int, core: Core) -> StepCost:
        st = StepCost()
        t_layer, ops = layer_times(c.roof, work(b * new, core))
        stage_s = []
        for i, g in enumerate(part.groups):
            t = len(g.layers) * t_layer
            if i in (0, G - 1):
                t += c.ends(StepCost(), b * new)
            stage_s.append(t)
        biggest = max(len(g.layers) for g in part.groups)
        for o in ops:
            st.add_op(o, biggest * rb / b)
        c.ends(st, rb * new)
        hop = 0.0
        if G > 1:
            y = b * new * D * e
            hop = max(c.cluster.p2p_time(y, r * G + i, r * G + i + 1)[0]
                      for r in range(R) for i in range(G - 1))
            link = "ib" if any(c.cluster.node_of(r * G + i) != c.cluster.node_of(r * G + i + 1)
                               for r in range(R) for i in range(G - 1)) else "nvlink"
            st.add_comm("send/pp", link, rb * new * D * e / mb, hop, mb)
        st.seconds, st.bubble_s = _pipeline(stage_s, hop, mb)
        st.compute_s = sum(o.seconds for o in st.ops.values())
        st.comm_s = st.exposed_comm_s = (mb + G - 1) * hop if G > 1 else 0.0
        return st

    prefill = step(T, Core(b, H, Hkv, T, T * (T + 1) / 2, T))
    decode = step(1, _decode_core(c, b, H, Hkv, S, c.wl.max_len, False))  # no CUDA graph
    per_layer = attn_weights(spec, H, Hkv, d) + mlp_weights(spec, spec.d_ff, spec.n_experts) + c.layer_norms()
    weights, kv = [], []
    for r in range(c.P):
        rep, i = divmod(r, G)
        g = part.groups[i]
        n = len(g.layers)
        weights.append((n * per_layer + c.ends_weights(i == 0, i == G - 1)) * e)
        b0, b1 = replica_ranges[rep]
        kv.append(n * kv_bytes(spec, b1 - b0, Hkv, c.wl.max_len))
    hidden = spec.top_k * spec.d_ff * spec.mlp_matrices if spec.is_moe else spec.mlp_matrices * spec.d_ff
    act = c.inputs + b * T * (4 * D + (2 * H + 2 * Hkv) * d + hidden) * e + rb * T * D * e
    notes = [f"layerwise: {G} group(s) x {R} replica(s), layers "
             + ", ".join(f"{g.layers.start}-{g.layers.stop - 1}" for g in part.groups)]
    return _Model(prefill, decode, weights, kv, act, b * T * D * e if G > 1 else 0, notes)


STRATEGY_MODELS = {"tp_pp": _tp_pp, "helix": _helix, "ring": _ring, "ep": _ep,
                   "layerwise": _layerwise}


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


def predict(spec: ModelSpec, workload: Workload, plan: Plan | str, cluster: Cluster,
            world_size: int | None = None, graphs: bool | None = None) -> Prediction:
    """Predict ``plan`` on ``cluster``. The plan is validated first (a
    ShardwiseError names what is wrong); a plan that is valid but does not fit
    in memory is returned with ``fits`` False and the reason.

    ``graphs``: whether decode steps replay a CUDA graph. None (default): where
    the strategy supports it, as ``shardwise bench`` runs them on GPUs; False:
    every step eager (``--no-graphs``, or CPU)."""
    plan = resolve_capacity(Plan.parse(plan) if isinstance(plan, str) else plan, cluster)
    if world_size is None and plan.strategy == "layerwise":
        world_size = cluster.n_gpus
    _, topo = validate_plan(spec, workload, plan, world_size)
    if topo.world_size > cluster.n_gpus:
        raise ShardwiseError(f"plan {plan} needs {topo.world_size} GPUs but cluster "
                             f"{cluster.name} has {cluster.n_gpus}")
    if plan.strategy not in STRATEGY_MODELS:
        raise ShardwiseError(f"the cost model has no formulas for strategy {plan.strategy!r}")
    ctx = _Ctx(spec, workload, plan, cluster, topo, graphs)
    m = STRATEGY_MODELS[plan.strategy](ctx)
    totals = [w + k for w, k in zip(m.weights, m.kv)]
    worst = max(range(len(totals)), key=totals.__getitem__)
    mem = Memory(m.weights[worst], m.kv[worst], int(m.activations), int(m.buffers))
    pred = Prediction(spec, workload, plan, cluster.name, topo.world_size, m.prefill, m.decode,
                      mem, m.weights, m.kv, cluster.hbm_bytes, notes=m.notes)
    pred.fits, pred.reason = _fits(pred, cluster)
    return pred


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
                       f"KV {fmt_bytes(m.kv_cache)}, activations ~{fmt_bytes(m.activations)}, "
                       f"buffers ~{fmt_bytes(m.comm_buffers)}) > {fmt_bytes(cap)}; "
                       f"try more micro-batches (mb=) or a smaller batch")
    return True, ""
