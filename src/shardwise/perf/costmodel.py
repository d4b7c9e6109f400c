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
  kernel past head_dim 256; shardwise's own at head_dim 256 and 512 where
  the code takes it and the profile measured it). Elementwise passes the code makes (norms, adds,
  activation, KV-cache writes, each strategy's copies) run at the copy rate.
* issue: every kernel pays ``kernel_us`` on the GPU. The host side of
  eager work is counted call by call from the code (:class:`Calls`,
  :class:`Flavour`; ``shardwise.perf.calibrate.count_calls`` counts them on
  a run and the tests hold the two equal): ops that launch a kernel
  (``op_us`` each), ops that launch none (``view_us``), nn.Module calls
  (``module_us``), collective calls (``collective_us`` by kind). Host and
  device overlap between device-to-host reads (:class:`Work`): a stretch
  takes the longer of the two; at a read (torch.nonzero in the reference
  MoE loop, ep's routing table) the host waits for the device and pays
  ``sync_us``. A decode step replayed from a CUDA graph has no host work,
  reads the whole static cache and pays a collective kernel's latency in a
  graph (``graph_collective_us`` by kind, else ``graph_latency_us``) per
  collective.
* every collective costs alpha + factor x bytes / bus bandwidth on the link
  it crosses (:mod:`.clusters`): ring all-reduce 2(n-1)/n, all-gather,
  reduce-scatter and all-to-all (n-1)/n, point-to-point 1. The eager alpha
  is the host's call; on the device a collective takes its kernel's latency
  and the wire time.
* pipelines (tp_pp, layerwise): every stage's host issues its micro-batches
  at once (a receive does not hold the host); a stage's device runs
  micro-batch i when it has finished i-1 and i has arrived. Device-bound,
  that is GPipe's (micro_batches + stages - 1) slots; host-bound, the
  hosts' time (:func:`_pipeline`).
* overlap where the strategy overlaps, simulated on two streams: tp_pp's
  prefill in K chunks (each chunk's all-reduce beside the next chunks'
  compute), ring's K/V hop beside the attention on the block in hand, ep's
  dispatch of chunk i+1 and combine of chunk i beside the experts on chunk
  i. A collective beside compute slows it by (1 - ``overlap_efficiency``) of
  the time they share.
* MoE: the busiest rank's routed rows (the routing's imbalance: measured,
  or the expected maximum of uniform routing) and, in decode, the experts
  it reads (the expected maximum over ranks of distinct experts hit).

Memory per rank: weights and KV cache exactly as the strategies allocate
them (tests compare them byte for byte with real runs), plus an estimate of
the activations (the global prompt every rank is handed, the largest layer's
working set of a micro-batch, the outputs a pipeline holds) and of the
communication buffers (receive buffers of the largest exchange).

All figures are for the busiest rank; a step waits for it.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field

from ..bench.metrics import distinct_experts
from ..model.flash import CONFIGS as WIDE_CONFIGS
from ..parallel.base import (balanced_ranges, dense_moe_ok, held_kv_heads, kv_replicas,
                             validate_plan)
from ..spec import ModelSpec, Plan, ShardwiseError, Workload, dtype_bytes
from .clusters import Cluster

# GPU kernels a layer of a decode step captured in a CUDA graph (the
# static-shape path of the reference block, model/reference.py), with the
# fused norms and the tanh GELU in the GEMM's epilogue: the fused residual-add
# + norm twice, QKV, one index_copy_ of the packed K/V, SDPA, W_o, the
# up-projection, the down-projection (the position mask and cache slots are
# built once a step, model/reference.py one_step); a graph has no host work,
# so only these launches' GPU time counts. Flavour.static_decode adds the
# activation's kernels where it is not fused.
STATIC_DECODE_KERNELS = 8
# Rows up to which a graph decode GEMM's time comes from calibrate's decode
# kernel probes (16 rows; Cluster.decode_gemm_s), where the profile has them.
DECODE_PROBE_MAX_ROWS = 64
# FlashAttention-2 (and the memory-efficient kernel) compute a whole tile of
# query rows even when a decode step has one query: 128 rows for FA2 at
# head_dim 128 on sm90 (kBlockM), 64 for the memory-efficient kernel.
FLASH_Q_TILE = 128
EFFICIENT_Q_TILE = 64
# Widest row the fused residual-add + norm kernel takes (model/kernels.py).
FUSED_NORM_MAX_D = 32768

COLL_KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p")


# -- host calls: what the Python code asks of the host, counted from the code --------

@dataclass
class Calls:
    """Host calls of eager work, by kind, as ``shardwise.perf.calibrate.CallCounter``
    counts them on a run: aten ops that launch a kernel (``kernels``) or none
    (``metas``: views, reshapes without a copy, allocations), nn.Module calls,
    device-to-host reads the host waits for (``syncs``), and calls of each
    collective (``p2p``: one batched send/receive call)."""

    kernels: float = 0.0
    metas: float = 0.0
    modules: float = 0.0
    syncs: float = 0.0
    all_reduce: float = 0.0
    all_gather: float = 0.0
    reduce_scatter: float = 0.0
    all_to_all: float = 0.0
    p2p: float = 0.0
    # Of the kernels: GEMMs (mm, addmm, bmm, linear's) and attentions (SDPA's
    # kernels), which cost the host and the device more than the others.
    gemms: float = 0.0
    attns: float = 0.0
    norms: float = 0.0  # the fused residual-add + norm (a Triton launch)

    def __add__(self, o: "Calls") -> "Calls":
        return Calls(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(o))))

    def __sub__(self, o: "Calls") -> "Calls":
        return self + o * -1

    def __mul__(self, f: float) -> "Calls":
        return Calls(*(a * f for a in dataclasses.astuple(self)))

    __rmul__ = __mul__

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    def host_s(self, cl: Cluster, link: str = "nvlink", decoding: bool = False) -> float:
        """Host time of these calls on ``cl`` in a step (device-to-host waits
        excluded: they are where host and device meet, see :class:`Work`):
        each kind's per-call figure, measured back to back, times the
        profile's ratio for a step that starts from a wait (``step_host``).
        GEMMs and attentions cost their own figures (an attention its
        phase's: ``decoding``)."""
        return cl.step_host * cl.host_scale * (
            (self.kernels - self.gemms - self.attns - self.norms) * cl.op_s
            + self.gemms * cl.gemm_s + self.attns * cl.attn_s(decoding) + self.norms * cl.norm_s
            + self.metas * cl.view_s + self.modules * cl.module_s
            + sum(getattr(self, op) * cl.collective_host_s(op, link) for op in COLL_KINDS))


# The static decode layer's launches as Calls (the fused flavour; see
# Flavour.static_decode): of its kernels, the QKV, W_o, up- and
# down-projection GEMMs, one attention and the two fused norms.
STATIC_DECODE = Calls(kernels=STATIC_DECODE_KERNELS, gemms=4, attns=1, norms=2)


# RingAttention.decode_static's kernels beyond STATIC_DECODE's, on CUDA
# (parallel/ring.py, parallel/lse.py): a layer's V index_copy_ of its own,
# the (o, lse) pair's cat and the Triton merge; once a step, the slot lookup
# (subtract, index_select) and attend_lse_prefix's mask (arange, compare,
# zeroed bias, invert, masked_fill_). Before the merge was one kernel and the
# mask built once a step, a traced ring:2 step held 172 kernels over 4
# layers, 42 a layer (results/diag/bench-miss.jsonl): logsumexp alone
# launched 9.
RING_STATIC_EXTRA = Calls(kernels=3)
# Once a static decode step (model/reference.py one_step): the cache slots
# (arange, add) and the position mask of causal_attention (two aranges, the
# add, the compare, the zeroed bias, the invert, masked_fill_). Ring's
# instead: the slots, its slot lookup (subtract, index_select) and
# attend_lse_prefix's mask (arange, compare, zeroed bias, invert,
# masked_fill_). Counted on a CPU static step (CudaPaths).
STATIC_STEP = Calls(kernels=2 + 7)
RING_STATIC_STEP = Calls(kernels=2 + 2 + 5)


def _calls(k: float = 0, m: float = 0, mod: float = 0, sync: float = 0, g: float = 0,
           a: float = 0, n: float = 0, **colls) -> Calls:
    """``k`` kernel ops, of which ``g`` GEMMs, ``a`` attentions and ``n`` fused
    norms; ``m`` views and allocations; ``mod`` module calls; ``sync``
    device-to-host reads."""
    return Calls(k, m, mod, sync, gemms=g, attns=a, norms=n, **colls)


class Flavour:
    """Which of the reference code's paths a model takes on a GPU (each branch
    of model/reference.py and model/kernels.py that the counts depend on), and
    the host calls of its pieces, counted from that code."""

    def __init__(self, spec: ModelSpec):
        e = dtype_bytes(spec.dtype)
        self.spec = spec
        self.half = e == 2
        self.fp32 = e == 4
        # norm() / add_norm(): one Triton kernel for half-precision rows that fit a block.
        self.fused_norm = self.half and spec.d_model <= FUSED_NORM_MAX_D
        # up_projection: the tanh GELU in the GEMM's epilogue (half precision).
        self.fused_up = self.half and spec.activation == "gelu_tanh"
        # _copy_rows: cache rows copied as 8-byte words when a row's bytes allow it.
        self.row8 = (spec.head_dim * e) % 8 == 0 and e < 8

    def norm(self) -> Calls:
        """norm(module, x): the fused kernel and its output, or the module."""
        return _calls(k=1, n=1, m=1) if self.fused_norm else _calls(k=1, mod=1)

    def add_norm(self) -> Calls:
        """add_norm: one kernel writing h and norm(h), or the add and the module."""
        return _calls(k=1, n=1, m=2) if self.fused_norm else _calls(k=2, mod=1)

    def static_decode(self) -> Calls:
        """A static decode layer's kernels in a CUDA graph (:data:`STATIC_DECODE`)
        with this model's up-projection: the exact GELU a kernel of its own
        after the GEMM, SwiGLU's SiLU and product two."""
        return STATIC_DECODE + _calls(k=self.up().kernels - 1)

    def merge(self) -> Calls:
        """merge_stack on a GPU: the partials' and lses' row views, the two
        outputs, one Triton launch (parallel/lse.py)."""
        return _calls(k=1, m=4)

    def batch_view(self) -> Calls:
        """KVCache.batch_view: the packed storage's slice, K's and V's views."""
        return _calls(m=5)

    def copy_rows(self, contiguous_rows: bool = True) -> Calls:
        """_copy_rows: one copy (of 8-byte words: two views first, when the rows'
        bytes allow it and the source's rows are contiguous)."""
        return _calls(k=1, m=2 if self.row8 and contiguous_rows else 0)

    def qkv(self) -> Calls:
        """Attention.qkv (the strategies' own attention): W_qkv, split, three views."""
        return _calls(k=1, g=1, m=4, mod=1)

    def cache_write(self, contiguous_rows: bool = True) -> Calls:
        """KVCache.write: K and V (slice, copy each) and the cache up to the
        position. ``contiguous_rows``: False when K and V come out of an
        all-gather over head-dim slices (their last dim strided)."""
        return (_calls(m=1) + self.copy_rows(contiguous_rows)) * 2 + _calls(m=2)

    def attention(self, tokens_per_seq: int = 1, seqs: int = 1, wide: bool = False) -> Calls:
        """The reference Attention with its cache (no rotary embedding). A prompt
        of >= DIRECT_CACHE_MIN_TOKENS: W_q on all rows, then per sequence its
        K/V GEMM into the cache's rows (its row, W_kv's transpose, the cache
        rows' view); otherwise W_qkv, q's slice and view, and K/V written with
        one copy (write_packed: slice, view, the cache slice). Then q's
        transpose, SDPA, o's transpose and reshape, W_o (with ``wide``,
        tp_pp's WideOutputLinear: reshape, transpose, view around one mm)."""
        if tokens_per_seq >= _direct_cache_min_tokens():
            c = _calls(k=1, g=1, m=1 + 1 + 2, mod=1) + _calls(k=1, g=1, m=5) * seqs
        else:
            c = _calls(k=1, g=1, m=2, mod=2) + _calls(m=3) + self.copy_rows() + _calls(m=2)
        c = c + _calls(k=1, a=1, m=3)
        return c + (_calls(k=1, g=1, m=3, mod=1) if wide else _calls(k=1, g=1, mod=1))

    def up(self) -> Calls:
        """up_projection: the fused GEMM (reshape, transpose, view), or a linear
        and the activation (SwiGLU: chunk, SiLU, product)."""
        if self.fused_up:
            return _calls(k=1, g=1, m=3)
        return _calls(k=3, g=1, m=1) if self.spec.activation == "swiglu" else _calls(k=2, g=1)

    def mlp(self) -> Calls:
        """The MLP module: up_projection, W_down (a Linear)."""
        return _calls(mod=1) + self.up() + _calls(k=1, g=1, mod=1)

    def block(self, attn: Calls, mlp: Calls) -> Calls:
        """Block.residual_parts in a stack (steady state): the previous
        layer's residual added in the attention norm (add_norm), attention,
        add_norm, the MLP (its output is added in the next layer's norm)."""
        return self.add_norm() + attn + self.add_norm() + mlp

    def stack_ends(self, last: bool, vocab: bool, first: bool = True) -> Calls:
        """A Transformer stack beyond its layers' steady state: the module, the
        first layer's plain norm (an add_norm fewer), the last residual added
        (with the final norm on the last stage), embedding and LM head."""
        c = _calls(mod=1) + self.norm() - self.add_norm()
        c += self.add_norm() if last else _calls(k=1)
        if vocab and first:
            c += _calls(k=1, mod=1)
        if vocab and last:
            c += _calls(k=1, g=1, mod=1)
        return c

    def moe_router(self) -> Calls:
        """The MoE module up to its expert loop: reshape, the fp32 router
        (promote_types, two casts, linear), top-k and its softmax (a no-op
        cast first), the zeroed output; after the loop, out.view."""
        casts = _calls(m=2) if self.fp32 else _calls(k=2)
        return _calls(k=4, g=1, m=4, mod=1) + casts

    def moe_dense(self, held: int) -> Calls:
        """MoE._dense: the held experts' ids (arange), the gate (compare,
        product, sum, cast), the zeroed output; per expert its slices,
        up_projection, the matmul, the weighting and the in-place add."""
        cast = _calls(m=1) if self.fp32 else _calls(k=1)
        per = self.up() + _calls(k=3, g=1, m=5)
        return _calls(k=4, m=2) + cast + per * held

    def moe_expert(self, hit: bool) -> Calls:
        """One local expert of the reference loop: the compare and torch.nonzero
        (the host waits for its count); an expert that receives tokens also
        gathers them, runs expert_mlp (the experts' slices and W_down's
        transpose, up_projection, the matmul), indexes its router weights,
        casts them, weights its output and index_add_s it."""
        c = _calls(k=1, sync=1)
        if hit:
            c = c + self.up() + _calls(k=5 + (0 if self.fp32 else 1), g=1,
                                       m=4 + (1 if self.fp32 else 0))
        return c


def _dense_moe_max_tokens() -> int:
    """Rows a call up to which the reference MoE runs every held expert densely."""
    from ..model import reference

    return reference.DENSE_MOE_MAX_TOKENS


def _direct_cache_min_tokens() -> int:
    """Prompt length from which the reference projects K/V straight into the cache."""
    from ..model import reference

    return getattr(reference, "DIRECT_CACHE_MIN_TOKENS", 1 << 62)


def _busiest(a: Calls, b: Calls) -> Calls:
    """Each kind's larger count (the busiest rank's, kind by kind)."""
    return Calls(*(max(x, y) for x, y in zip(dataclasses.astuple(a), dataclasses.astuple(b))))


@dataclass
class Work:
    """Eager work as the host and the device see it: segments ``(host_s, gpu_s)``
    separated by device-to-host waits. Within a segment the host issues while
    the device runs what it has been given, so a segment takes the longer of
    the two; at a wait the host stops until the device is done, then pays the
    read's round trip, and the device idles until the host issues again."""

    segs: list = field(default_factory=lambda: [[0.0, 0.0]])

    def add(self, host_s: float = 0.0, gpu_s: float = 0.0) -> "Work":
        self.segs[-1][0] += host_s
        self.segs[-1][1] += gpu_s
        return self

    def sync(self) -> "Work":
        self.segs.append([0.0, 0.0])
        return self

    def extend(self, other: "Work", times: int = 1) -> "Work":
        for _ in range(times):
            self.add(*other.segs[0])
            for seg in other.segs[1:]:
                self.segs.append(list(seg))
        return self

    @property
    def host_s(self) -> float:
        return sum(h for h, _ in self.segs)

    @property
    def gpu_s(self) -> float:
        return sum(g for _, g in self.segs)

    @property
    def syncs(self) -> int:
        return len(self.segs) - 1

    def seconds(self, sync_s: float) -> float:
        return sum(max(h, g) for h, g in self.segs) + sync_s * self.syncs

    def stage(self, sync_s: float) -> tuple[float, float, bool]:
        """This work as one pipeline stage of :func:`_pipeline`: (host, device,
        serial). A stage that waits for its device inside runs serially."""
        if self.syncs:
            t = self.seconds(sync_s)
            return t, t, True
        return self.host_s, self.gpu_s, False


@dataclass
class Op:
    """One compute op summed over a step on the busiest rank."""

    name: str
    flops: float = 0.0
    bytes: float = 0.0
    seconds: float = 0.0
    # Of ``seconds``, the launches' own time that Roofline.launches would
    # charge for this op's kernels (a graph decode kernel timed by
    # calibrate's probes includes it); Roofline.gpu does not charge it twice.
    launch_s: float = 0.0


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
    host_s: float = 0.0  # the busiest rank's host calls (eager; 0 in a CUDA graph)
    syncs: float = 0.0  # device-to-host waits of the busiest rank
    ops: dict[str, Op] = field(default_factory=dict)
    comms: dict[str, Coll] = field(default_factory=dict)
    # Host calls of the busiest rank (eager steps), as calibrate.count_calls
    # counts them: per decoder layer (all its micro-batches, halves and chunks)
    # and the rest of the step.
    layer_calls: Calls = field(default_factory=Calls)
    step_calls: Calls = field(default_factory=Calls)
    # A decode step replayed from a CUDA graph: the kernels of one layer (the
    # non-MoE static path) and of the rest of the step it charges, as
    # calibrate.count_calls counts a static step's (its "static" phase).
    graph_layer_kernels: float = 0.0
    graph_step_kernels: float = 0.0

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


def _hypergeom(N: int, K: int, n: int) -> list[float]:
    """P(i of n draws without replacement from N items land in a set of K), i = 0..n."""
    total = math.comb(N, n)
    return [math.comb(K, i) * math.comb(N - K, n - i) / total if i <= K and n - i <= N - K else 0.0
            for i in range(n + 1)]


def hit_distribution(local: int, n_experts: int, top_k: int, tokens: int) -> list[float]:
    """P(exactly j of a rank's ``local`` experts receive a token), j = 0..local,
    when ``tokens`` tokens each choose ``top_k`` distinct experts of
    ``n_experts`` uniformly and independently (exact, by dynamic programming
    over the tokens: a token's picks among the rank's experts are
    hypergeometric, and so are the new ones among those)."""
    dist = [1.0] + [0.0] * local
    into = _hypergeom(n_experts, local, top_k)  # picks landing on this rank's experts
    for t in range(int(tokens)):
        nxt = [0.0] * (local + 1)
        for j, pj in enumerate(dist):
            if pj < 1e-15:
                continue
            for i, pi in enumerate(into):
                if pi == 0.0:
                    continue
                for new, pn in enumerate(_hypergeom(local, local - j, i)):
                    if pn:
                        nxt[j + new] += pj * pi * pn
        dist = nxt
        if dist[local] > 1 - 1e-12:
            break
    return dist


def expected_max(dist: list[float], n: int) -> float:
    """E[max of n independent draws] of a variable on 0..len(dist)-1."""
    cdf, acc = [], 0.0
    for p in dist:
        acc += p
        cdf.append(min(acc, 1.0))
    return sum(1.0 - (cdf[j - 1] if j else 0.0) ** n for j in range(1, len(dist)))


def _joint_max_hits(local: int, ranks: int, top_k: int, tokens: int) -> float:
    """E[max over ``ranks`` ranks of the distinct experts hit], each rank holding
    ``local`` of ``ranks x local`` experts, exactly: dynamic programming over
    the tokens on the vector of hits per rank. A token's ``top_k`` distinct
    picks fall on the 2 x ranks classes (each rank's hit and unhit experts)
    multivariate-hypergeometrically."""
    E = local * ranks
    total = math.comb(E, top_k)

    def splits(n: int, parts: int):
        if parts == 1:
            yield (n,)
            return
        for i in range(n + 1):
            for rest in splits(n - i, parts - 1):
                yield (i,) + rest

    dist = {(0,) * ranks: 1.0}
    for _ in range(tokens):
        nxt: dict = {}
        for state, p in dist.items():
            sizes = [x for j in state for x in (j, local - j)]  # hit, unhit per rank
            for pick in splits(top_k, 2 * ranks):
                ways = 1
                for n_, k_ in zip(sizes, pick):
                    ways *= math.comb(n_, k_)
                if not ways:
                    continue
                new = tuple(j + pick[2 * r + 1] for r, j in enumerate(state))
                nxt[new] = nxt.get(new, 0.0) + p * ways / total
        dist = nxt
    return sum(p * max(state) for state, p in dist.items())


def busiest_hits(local: int, n_experts: int, top_k: int, tokens: float, ranks: int) -> float:
    """Expected number of experts whose weights the busiest of ``ranks`` ranks
    reads (each holding ``local``), under uniform routing: exactly when the
    state space is small (:func:`_joint_max_hits`), else from each rank's exact
    distribution with the ranks taken as independent."""
    if tokens <= 0:
        return 0.0
    if (1.0 - top_k / n_experts) ** tokens * local < 1e-9 or tokens > 4096:
        return distinct_experts(local, n_experts, top_k, tokens)
    n = int(round(tokens))
    if ranks > 1 and local * ranks == n_experts and (local + 1) ** ranks * n <= 20000:
        return _joint_max_hits(local, ranks, top_k, n)
    return expected_max(hit_distribution(local, n_experts, top_k, n), ranks)


def expected_max_normal(n: int) -> float:
    """E[max of n independent standard normals] (Gaussian order statistics; 0 for
    n = 1, 1/sqrt(pi) for n = 2), by numerical integration."""
    if n <= 1:
        return 0.0
    if n == 2:
        return 1.0 / math.sqrt(math.pi)
    step, total, x = 0.01, 0.0, -8.0
    while x < 8.0:
        pdf = math.exp(-x * x / 2) / math.sqrt(2 * math.pi)
        cdf = 0.5 * (1 + math.erf(x / math.sqrt(2)))
        total += x * n * pdf * cdf ** (n - 1) * step
        x += step
    return total


def rank_rows_imbalance(n_experts: int, local: int, top_k: int, tokens: float, ranks: int) -> float:
    """E[rows of the busiest rank] / mean rows, for ``tokens`` tokens routed
    uniformly to ``top_k`` of ``n_experts`` experts, ``local`` per rank: a
    token sends c ~ hypergeometric(E, El, k) rows to a rank, so a rank's rows
    have mean N k El/E and variance N var(c); the busiest of P is ~ the mean
    plus sigma x E[max of P normals]."""
    if ranks <= 1 or tokens <= 0:
        return 1.0
    mean_c = top_k * local / n_experts
    var_c = top_k * (local / n_experts) * (1 - local / n_experts) * (n_experts - top_k) / max(n_experts - 1, 1)
    mean = tokens * mean_c
    return 1.0 + math.sqrt(tokens * var_c) * expected_max_normal(ranks) / mean


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
    experts_held: int = 0  # MoE: local experts
    expert_ff: int = 0  # MoE: local d_ff of each expert
    router_tokens: float = 0.0  # MoE: tokens routed on this rank
    kv_rows: float | None = None  # (token x kv head) rows written to the KV cache (default tokens x core.kv_heads)
    copy_bytes: float = 0.0  # the strategy's own copies (bytes read + written)
    # Fused add + norm kernels of a static decode layer (0 where the all-reduce
    # kernel does the add and norm, parallel/reduce_norm.py).
    norm_kernels: int = 2


def duty_derate(sustained: float, duty: float) -> float:
    """Compute rate over the burst rate for a GPU busy ``duty`` (0..1) of a
    step. A power-limited GPU's clock follows its average power draw, and
    its dynamic power goes about as the cube of its clock (P ~ C V^2 f, the
    voltage scaling with the clock). Always busy, it holds ``sustained`` (the
    rate under back-to-back GEMMs over the burst rate), so the cap is
    ``sustained^3`` of the burst power; busy ``duty`` of the step, it holds
    the clock c with ``duty * c^3 = sustained^3``, at most the burst clock. A
    pipeline stage that waits for the other stages half of the step (say
    layerwise with one micro-batch) then runs its kernels at the burst rate
    (results/README.md, prediction fidelity: seed-layerwise-30b's 2-group
    prefill)."""
    duty = min(1.0, max(0.0, duty))
    return 1.0 if duty <= 0 else min(1.0, sustained / duty ** (1.0 / 3.0))


# Below this busy share a step's compute is re-predicted at the rate its duty
# cycle holds (predict).
DUTY_REPREDICT = 0.98


class Roofline:
    """max(FLOPs / rate, bytes / bandwidth) for the ops of one model on one cluster.

    Bandwidths: elementwise passes (norms, adds, activation, copies: as many
    bytes written as read) at the device-copy rate ``hbm_gbps``; matmuls and
    the prefill attention core, whose traffic is reads, at the streaming rate
    (:meth:`Cluster.stream_rate`, a 16-row GEMV's). A decode step's attention
    reads the KV cache at the copy rate: traced in CUDA graphs on 2x H200,
    cuDNN's decode attention read it at 4.3 TB/s with the copy at 4.2 and
    the GEMV stream at 3.7 (results/diag/traces-graphs.tgz)."""

    def __init__(self, spec: ModelSpec, cluster: Cluster, duty: float = 1.0):
        self.spec, self.cluster = spec, cluster
        self.e = dtype_bytes(spec.dtype)
        self.flav = Flavour(spec)
        # Compute rates held over a step whose GPU is busy ``duty`` of the
        # time (duty_derate; Cluster.sustained_ratio is 1 unless the profile
        # measured it).
        self.derate = duty_derate(cluster.sustained_ratio, duty)
        self.mm = cluster.matmul_rate(spec.dtype) * self.derate
        self.attn = cluster.attention_rate(spec.head_dim, spec.dtype) * self.derate
        self.flash = (cluster.flash_rate(spec.dtype) * self.derate
                      if spec.head_dim <= 256 and self.e == 2 else self.attn)
        # shardwise's kernel for wide heads, at calibrate's rate, where the code
        # takes it (model/flash.py: not one query; the plain causal prefill only
        # where its Config says so); None: PyTorch's kernels' rates.
        wide = cluster.wide_attention_rate(spec.head_dim, spec.dtype)
        self.wide = wide * self.derate if wide else None
        self.wide_plain = spec.head_dim in WIDE_CONFIGS and WIDE_CONFIGS[spec.head_dim].plain_causal
        self.hbm = cluster.hbm_rate
        self.stream = cluster.stream_rate

    def op(self, name: str, flops: float, nbytes: float, rate: float | None = None,
           bw: float | None = None) -> Op:
        rate = rate or self.mm
        return Op(name, flops, nbytes, max(flops / rate, nbytes / (bw or self.hbm)))

    def copy(self, name: str, nbytes: float) -> Op:
        """An elementwise pass (``nbytes`` read + written) at the copy rate."""
        return Op(name, 0.0, nbytes, nbytes / self.hbm)

    def gemm(self, name: str, m: float, k: int, n: int, weight_reads: float = 1.0,
             graph: bool = False) -> Op:
        """``[m x k] @ [k x n]``: read both operands, write the result; the rate
        of the measured shape nearest (k, n). ``graph``: a decode GEMM replayed
        from a CUDA graph, which takes at least the time calibrate's probes
        give its shape (launch included) where the profile has them."""
        rate = self.cluster.gemm_rate(self.spec.dtype, k, n, m) * self.derate
        op = self.op(name, 2 * m * k * n, (m * k + weight_reads * k * n + m * n) * self.e,
                     rate, self.stream)
        probed = (self.cluster.decode_gemm_s(k, n, k * n * self.e)
                  if graph and m <= DECODE_PROBE_MAX_ROWS else None)
        if probed is not None:
            op.seconds = max(op.seconds, probed)
            op.launch_s = self.cluster.gemm_kernel_s
        return op

    def probed(self, op: Op, kernels: int, each: "float | None") -> Op:
        """``op`` (``kernels`` launches) taking at least ``kernels`` x ``each``
        seconds, a probe's time with the launch in it (None: no probe, ``op``
        as it is)."""
        if each is not None and kernels:
            op.seconds = max(op.seconds, kernels * each)
            op.launch_s = kernels * self.cluster.kernel_s
        return op

    def core(self, c: Core) -> Op:
        """Prefill: 4 d FLOPs per scored pair and head at the kernel's rate. Decode
        (one query): the kernel still computes a whole tile of query rows
        (FA2 128, memory-efficient 64), and reads the keys it is given, at the
        copy rate (see the class docstring)."""
        d = self.spec.head_dim
        flops = 4 * c.seqs * c.heads * d * c.pairs  # Q.K^T and P.V
        q_o = 2 * c.seqs * c.queries * c.heads * d
        kv = 2 * c.seqs * c.keys * c.kv_heads * d
        rate = self.flash if c.kernel == "flash" else self.attn
        if self.wide and not c.decode and (c.kernel == "flash" or self.wide_plain):
            rate = self.wide
        work = flops
        if c.decode:
            tile = FLASH_Q_TILE if (c.kernel == "flash" and d <= 256) else EFFICIENT_Q_TILE
            work = 4 * c.seqs * c.heads * d * c.keys * max(c.queries, tile)
        t = max(work / rate, (q_o + kv) * self.e / (self.hbm if c.decode else self.stream))
        return Op("attention", flops, (q_o + kv) * self.e, t)

    def layer(self, w: LayerWork, graph: bool = False) -> list[Op]:
        """One decoder layer's ops. ``graph``: the static decode layer replayed
        from a CUDA graph, whose small kernels take at least the times of
        calibrate's decode kernel probes (Cluster.decode_gemm_s and the
        others), where the profile has them: a 512-wide layer's GEMMs, norms
        and cache write each take longer than the launch of a tiny kernel
        and their rooflines say."""
        s, D, e, cl = self.spec, self.spec.d_model, self.e, self.cluster
        kv_rows = w.tokens * w.core.kv_heads if w.kv_rows is None else w.kv_rows
        probe = graph and w.tokens <= DECODE_PROBE_MAX_ROWS
        # norm(x), add_norm(x, a) and the last residual add: 2 + 4 + 3 passes
        # over [tokens, D] fused (the Triton add + norm), 2 + 2 + 3 + 3 unfused.
        norm_bytes = (9 if self.flav.fused_norm else 10) * w.tokens * D * e
        kv_bytes = 2 * kv_rows * self.spec.head_dim * e  # K and V written
        ops = [
            self.probed(self.op("norms+residual", 16 * w.tokens * D, norm_bytes),
                        w.norm_kernels, cl.decode_norm_s(D) if probe else None),
            self.gemm("qkv", w.tokens, D, w.qkv_out, graph=graph),
            # K and V copied into the cache (read + write each).
            self.probed(self.copy("kv write", 2 * kv_bytes), 1,
                        cl.decode_cache_write_s(kv_bytes) if probe else None),
            self.core(w.core),
            self.gemm("w_o", w.tokens, w.wo_in, D, graph=graph),
        ]
        if w.copy_bytes:
            ops.append(self.copy("copies", w.copy_bytes))
        if s.is_moe:
            ops.append(self.gemm("router", w.router_tokens, D, s.n_experts))
            ops.append(self.experts(w))
        else:
            m = w.tokens if w.mlp_tokens is None else w.mlp_tokens
            n_in = 2 if s.activation == "swiglu" else 1
            ops.append(self.gemm("mlp", m, D, n_in * w.ff, graph=graph))
            if self.flav.fused_up:  # the activation in the GEMM's epilogue: no pass of its own
                ops.append(Op("mlp", 8 * m * w.ff))
            else:
                ops.append(self.op("mlp", 8 * m * w.ff, (n_in + 1) * m * w.ff * e))
            ops.append(self.gemm("mlp", m, w.ff, D, graph=graph))
        merged: dict[str, Op] = {}
        for o in ops:
            acc = merged.setdefault(o.name, Op(o.name))
            acc.flops, acc.bytes, acc.seconds, acc.launch_s = (
                acc.flops + o.flops, acc.bytes + o.bytes, acc.seconds + o.seconds,
                acc.launch_s + o.launch_s)
        return list(merged.values())

    def experts(self, w: LayerWork) -> Op:
        """The experts' GEMMs over their rows (weights read once per expert hit),
        and the passes around them the code makes: the rows gathered, the
        activation (unless fused into the GEMM), the weighting and the
        scatter back (read + write each)."""
        s, D, e = self.spec, self.spec.d_model, self.e
        mats, rows, F = s.mlp_matrices, w.expert_rows, w.expert_ff
        weights = w.experts_hit * mats * D * F * e
        acts = rows * (2 * D + (mats + 1) * F) * e  # in, out, hidden written and read
        per_expert = rows / max(w.experts_hit, 1.0)  # each expert's GEMM rows
        rate = self.cluster.gemm_rate(s.dtype, D, F, per_expert) * self.derate
        t = max(2 * rows * mats * D * F / rate,
                (weights + acts) / self.stream)
        n_in = 2 if s.activation == "swiglu" else 1
        passes = 3 * 2 * rows * D * e  # gather, weighting, index_add_ / scatter
        if not self.flav.fused_up:
            passes += (n_in + 1) * rows * F * e
        return Op("experts", 2 * rows * mats * D * F, weights + acts + passes, t + passes / self.hbm)

    def gpu(self, ops: list[Op], kernels: "float | Calls") -> float:
        """GPU time of ``ops`` issued as ``kernels`` launches: their rooflines
        plus each launch's own time (:meth:`launches`), less the launches an
        op's time already holds (:attr:`Op.launch_s`)."""
        return (sum(o.seconds for o in ops) + self.launches(kernels)
                - sum(o.launch_s for o in ops))

    def launches(self, kernels: "float | Calls") -> float:
        """GPU time of launching ``kernels`` (a count, or :class:`Calls`) beyond
        their rooflines: ``kernel_us`` each (launch latency and tail, in a
        stream and in a CUDA graph alike); a GEMM or attention of Calls takes
        at least the smallest such kernel's time instead."""
        cl = self.cluster
        if not isinstance(kernels, Calls):
            return kernels * cl.kernel_s
        return (kernels.kernels * cl.kernel_s + kernels.gemms * (cl.gemm_kernel_s - cl.kernel_s)
                + kernels.attns * (cl.attn_kernel_s - cl.kernel_s))


# -- weights and KV cache, exactly as the strategies allocate them -----------------

def norm_params(spec: ModelSpec) -> int:
    """One norm's parameters (LayerNorm: weight and bias; RMSNorm: weight)."""
    return spec.norm_params() // 2


def attn_weights(spec: ModelSpec, heads: int, kv_heads: int, dim: int) -> int:
    """Fused QKV ``[(H + 2 Hkv) d, D]`` (and its bias, where the model has
    one) plus W_o ``[D, H d]`` for a local slice."""
    qkv = (heads + 2 * kv_heads) * dim
    return qkv * (spec.d_model + spec.qkv_bias) + spec.d_model * heads * dim


def mlp_weights(spec: ModelSpec, ff: int, experts: int = 0) -> int:
    """Dense: the MLP's matrices for ``ff`` units; MoE: ``experts`` experts of
    ``ff`` units each plus the full router (every strategy replicates it)."""
    per = spec.mlp_matrices * spec.d_model * ff
    return experts * per + spec.n_experts * spec.d_model if spec.is_moe else per


def kv_bytes(spec: ModelSpec, seqs: int, kv_heads: int, positions: int) -> int:
    """K and V of one layer."""
    return 2 * seqs * kv_heads * positions * spec.head_dim * dtype_bytes(spec.dtype)


def _kv_replication_notes(spec: ModelSpec, parts: int, what: str, unit: str,
                          kv_rank: int) -> list[str]:
    """What holding KV heads on more parts than there are (held_kv_heads) costs."""
    copies = kv_replicas(parts, spec.kv_heads)
    if copies <= 1:
        return []
    return [f"{what}={parts} > n_kv_heads={spec.kv_heads}: each KV head (its K/V projection "
            f"rows and cache) is replicated on {copies} {unit}; of the KV cache's "
            f"{fmt_bytes(kv_rank)} per rank, {fmt_bytes(kv_rank * (copies - 1) / copies)} "
            f"is replicated"]


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


class _Ctx:
    def __init__(self, spec: ModelSpec, wl: Workload, plan: Plan, cluster: Cluster, topo,
                 graphs: bool | None = None, moe_balance: float | None = None,
                 duty: float = 1.0, layout=None):
        self.spec, self.wl, self.plan, self.cluster, self.topo = spec, wl, plan, cluster, topo
        self.layout = layout  # layerwise: the Partition a run used (None: the search's)
        # Whether decode steps replay a CUDA graph (None: where the strategy can).
        self.graphs = graphs
        self.graph = False  # the step being modelled (set per step)
        self.decoding = False  # the step being modelled is a decode step (set per step)
        self.roof = Roofline(spec, cluster, duty)
        self.flav = self.roof.flav
        self.e = dtype_bytes(spec.dtype)
        self.P = topo.world_size
        self.D, self.d = spec.d_model, spec.head_dim
        self.T, self.B = wl.seq_len, wl.batch
        self.S = wl.seq_len + 1  # context a decode step attends to (its first step)
        self.in_width = self.D if spec.vocab_size is None else 0
        self.inputs = wl.batch * (wl.seq_len + wl.decode_steps) * max(self.in_width * self.e, 8)
        # MoE: rows of the busiest rank over the mean (None: uniform routing's).
        self.moe_balance = moe_balance

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
        """Device time of one collective on ``axis`` (the slowest of its groups),
        without the host's call: :meth:`in_stream` of the profile's eager time."""
        groups = self.groups(axis)
        if len(groups[0]) <= 1 or nbytes <= 0:
            return 0.0, "-"
        t, link = max((self.cluster.collective_time(op, nbytes, g) for g in groups),
                      key=lambda x: x[0])
        return self.in_stream(t, op, link), link

    def in_stream(self, t: float, op: str, link: str) -> float:
        """A collective's time on the device. The profile's latency is an eager
        call's, measured back to back: host-bound, so it is the host's call, not
        device time. What remains on the device is the growth of the time over
        the smallest message's (whose apparent bandwidth is latency jitter, not
        wire time), after the latency of the collective kernel itself
        (:meth:`Cluster.collective_kernel_s`: measured inside a CUDA graph, with
        no host work, by kind where the profile has it)."""
        if link not in self.cluster.links:
            return t
        lc = self.cluster.link(link, op)
        smallest = lc.table[0][0] if lc.table else 0.0
        t0 = (lc.time(op, smallest, 2) if 0 < smallest <= 2**20 else lc.latency_us * 1e-6)
        return max(t - t0, 0.0) + self.cluster.collective_kernel_s(op)

    def parts(self, op: str, axis: str, nbytes: float) -> tuple[float, float, str]:
        """(host seconds, device seconds, link) of one collective call: eager, the
        host pays the call (:meth:`Cluster.collective_host_s`); in a CUDA graph
        nothing."""
        t, link = self.coll(op, axis, nbytes)
        if t <= 0:
            return 0.0, 0.0, link
        host = 0.0 if self.graph else self.cluster.collective_host_s(op, link)
        return host, t, link

    def add(self, step: StepCost, op: str, axis: str, nbytes: float, times: float = 1.0) -> float:
        """Record ``times`` collectives; return their total device time."""
        t, link = self.coll(op, axis, nbytes)
        if t > 0:
            step.add_comm(f"{'send' if op == 'p2p' else op}/{axis}", link, nbytes, t, times)
        return t * times

    def host(self, calls: Calls) -> float:
        """Host time of eager ``calls`` (none in a CUDA graph)."""
        return 0.0 if self.graph else calls.host_s(self.cluster, decoding=self.decoding)

    def step_launches(self, st: StepCost, ends: Calls, once: Calls | None = None) -> float:
        """GPU time of launching a step's kernels beyond its layers: ``ends``
        and, in a CUDA graph, ``once``, the kernels the static path makes once
        a step (:data:`STATIC_STEP`, :data:`RING_STATIC_STEP`); with them, the
        total is recorded (``StepCost.graph_step_kernels``)."""
        if once is not None:
            ends = ends + once
            st.graph_step_kernels = ends.kernels
        return self.roof.launches(ends)

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
        """Embedding (first stage), final norm and LM head (last stage); a tied
        LM head on the embedding's rank is the same tensor (ShardLoader.load_ends)."""
        V = self.spec.vocab_size
        n = norm_params(self.spec) if last else 0
        if V is not None:
            rows = V if rows is None else rows
            n += rows * self.D * ((first or last) if self.spec.tie_embeddings else first + last)
        return n

    def end_calls(self, first: bool, last: bool) -> Calls:
        """A Transformer stack's calls beyond its layers (Flavour.stack_ends)."""
        return self.flav.stack_ends(last, self.spec.vocab_size is not None, first)

    def layer_norms(self) -> int:
        return 2 * norm_params(self.spec)

    def moe_rows(self, tokens: float, share: float, ranks: int = 1) -> float:
        """(token, expert) rows the busiest rank holding ``share`` of the
        experts computes: the mean, times the routing's imbalance over the
        ``ranks`` that split them (the measured one when given, else uniform
        routing's expected maximum)."""
        rows = tokens * self.spec.top_k * share
        if ranks <= 1:
            return rows
        if self.moe_balance is not None:
            return rows * self.moe_balance
        local = round(self.spec.n_experts * share)
        return rows * rank_rows_imbalance(self.spec.n_experts, local, self.spec.top_k,
                                          tokens, ranks)

    def hits(self, local: int, routed: float, ranks: int) -> float:
        """Experts of ``local`` the busiest rank reads (uniform routing)."""
        return busiest_hits(local, self.spec.n_experts, self.spec.top_k, routed, ranks)

    def moe_work(self, tokens: float, held: int, ranks: int = 1,
                 routed: float | None = None) -> dict:
        """The reference MoE module's expert work on the busiest of ``ranks``
        ranks that each hold ``held`` experts, on ``tokens`` rows a call
        (``routed``: the rows choosing among them, if other): its dense path
        (every held expert on every token) up to DENSE_MOE_MAX_TOKENS, else
        the routed rows and the experts they hit."""
        if tokens <= _dense_moe_max_tokens():
            return {"expert_rows": tokens * held, "experts_hit": held}
        routed = tokens if routed is None else routed
        return {"expert_rows": self.moe_rows(tokens, held / self.spec.n_experts, ranks),
                "experts_hit": self.hits(held, routed, ranks)}


def _pipeline(stages: list[tuple[float, float, bool]], micro_batches: int, p2p_host: float,
              hop: float) -> tuple[float, float]:
    """(total, bubble) of ``micro_batches`` through pipeline stages, each given as
    (host seconds, device seconds, serial) per micro-batch.

    Every stage's host issues its micro-batches in order, paying ``p2p_host``
    for each receive (stages after the first) and send (stages before the
    last); a receive does not hold the host (NCCL orders the stream after it),
    so all hosts run at once. A stage's device starts micro-batch i when it has
    finished i-1 and i has arrived (the sender's finish + ``hop``, the wire),
    and cannot finish before its host has issued the last kernel. A stage that
    waits for its device inside (``serial``: a device-to-host read) issues the
    next micro-batch only after finishing this one. With device-bound stages
    this is GPipe's (M + S - 1) slots; with host-bound ones, the hosts' time."""
    S = len(stages)
    arrive = [0.0] * micro_batches
    total, busy = 0.0, 0.0
    for s, (h, g, serial) in enumerate(stages):
        host_t = gpu_t = 0.0
        nxt = []
        for i in range(micro_batches):
            if s > 0:
                host_t += p2p_host
            issued = host_t + h
            done = max(max(gpu_t, arrive[i] if s > 0 else 0.0) + g, issued)
            gpu_t = done
            host_t = max(issued, done) if serial else issued
            if s < S - 1:
                host_t += p2p_host
                nxt.append(done + hop)
        arrive = nxt
        total = max(total, gpu_t, host_t)
        busy = max(busy, micro_batches * max(h, g))
    return total, max(total - busy, 0.0)


def _decode_core(c: _Ctx, b: float, heads: int, kv_heads: int, held: int, capacity: int,
                 graph: bool) -> Core:
    """One new token per sequence. Eager (``pos`` an int) the reference reads the
    cache up to the position with FlashAttention-2 (``sdpa_kernel`` leaves cuDNN
    out); in a CUDA graph (``pos`` a device tensor) it reads the whole static
    cache (``capacity`` positions) with a mask."""
    if graph:
        return Core(b, heads, kv_heads, 1, capacity, capacity, True, "masked")
    return Core(b, heads, kv_heads, 1, held, held, True, "flash")


def _moe_layer(c: _Ctx, w: LayerWork, ops: list[Op], pre: Calls, post: Calls,
               pre_gpu: float = 0.0, post_gpu: float = 0.0) -> Work:
    """A layer whose MLP is the reference MoE loop (model/reference.py MoE):
    the rest of the layer (``pre``: its calls; ``pre_gpu``: device time beyond
    the ops, e.g. a blocking all-reduce), then one segment per local expert,
    each after the host has waited for torch.nonzero's count: the expert's
    GEMMs (when it receives tokens) and the next expert's compare. The busiest
    rank has ``experts_hit`` of its ``experts_held`` experts hit, in
    expectation. ``post``: the calls after the loop (joining the next layer)."""
    f = c.flav
    held = int(w.experts_held)
    if w.router_tokens <= _dense_moe_max_tokens():  # MoE._dense: no wait on the device
        calls = pre + f.moe_dense(held) + post
        return Work().add(c.host(calls), c.roof.gpu(ops, calls) + pre_gpu + post_gpu)
    t_exp = next(o.seconds for o in ops if o.name == "experts")
    rest = [o for o in ops if o.name != "experts"]
    hit = w.experts_hit
    hit_c, miss_c = f.moe_expert(True), f.moe_expert(False)
    work = Work().add(c.host(pre), c.roof.gpu(rest, pre) + pre_gpu)
    seg_hit = (c.host(hit_c), (t_exp / hit if hit else 0.0) + c.roof.launches(hit_c))
    seg_miss = (c.host(miss_c), c.roof.launches(miss_c))
    for i in range(held):
        share = min(1.0, max(0.0, hit - i))  # expected hits spread over the segments
        work.sync().add(share * seg_hit[0] + (1 - share) * seg_miss[0],
                        share * seg_hit[1] + (1 - share) * seg_miss[1])
    return work.add(c.host(post), post_gpu + c.roof.launches(post))


def _moe_calls(f: Flavour, held: int, hit: float, tokens: float) -> Calls:
    """The reference MoE module's calls on ``tokens`` rows: its dense path, or
    the routed loop with ``hit`` of ``held`` experts hit."""
    if tokens <= _dense_moe_max_tokens():
        return f.moe_router() + f.moe_dense(held)
    return f.moe_router() + f.moe_expert(True) * hit + f.moe_expert(False) * (held - hit)


# -- tp_pp -------------------------------------------------------------------------------

def _tp_pp(c: _Ctx) -> _Model:
    from ..parallel.tp_pp import TpPp

    spec, topo, f = c.spec, c.topo, c.flav
    tp, pp = TpPp.degrees(c.plan)
    mb = min(c.plan.micro_batches, c.B)
    stages = [b - a for a, b in balanced_ranges(spec.n_layers, pp)]
    # KV heads replicated over the ranks that share them when tp > n_kv_heads.
    H, Hkv = spec.n_heads // tp, len(held_kv_heads(0, tp, spec.kv_heads))
    El = spec.n_experts // tp if spec.is_moe else 0
    b = -(-c.B // mb)  # the largest micro-batch
    can_graph = pp == 1 and dense_moe_ok(spec, c.B)  # TpPp.supports_graphs
    graph_decode = can_graph if c.graphs is None else (c.graphs and can_graph)
    # Attention partial sums in float32 (TpPp.wide_reduce): W_o's output stays
    # fp32 through the all-reduce, ReduceAfter casts it back.
    wide = (tp > 1 and c.e != 4
            and c.plan.option("reduce", "fp32" if spec.is_moe else "model") == "fp32")
    # OverlappedStage wraps every stage. With tp > 1 it runs K chunks of the
    # micro-batch when there are >= 2 sequences of >= 2 tokens (prefill; not
    # under overlap=1 nor for MoE): K from overlap=K, or under auto as many
    # as leave each chunk's all-reduce at least OVERLAP_MIN_BYTES. Otherwise
    # it runs the stage in one piece, each all-reduce with the add and norm
    # after it (Comm.all_reduce_add_norm): no ReduceAfter or Transformer
    # module calls, and in a decode step on GPUs one kernel for the three.
    from ..parallel.comm import ONE_SHOT_MAX_BYTES
    from ..parallel.reduce_norm import MAX_ROWS
    from ..parallel.tp_pp import overlap_chunks

    overlap = c.plan.option("overlap", "auto")
    overlapped = overlap != "1" and not spec.is_moe
    n_ar = 1 if tp > 1 else 0

    def step(tokens_per_seq: int, core: Core, graph: bool = False) -> StepCost:
        c.graph, c.decoding = graph, tokens_per_seq == 1
        st = StepCost()
        tokens = b * tokens_per_seq
        chunks = (overlap_chunks(overlap, b, tokens_per_seq, spec.d_model * c.e)
                  if overlapped and tp > 1 else 1)
        halves = chunks > 1
        one_piece = tp > 1 and not halves
        # The all-reduce, add and norm in one kernel: a decode step's rows
        # within the fused kernel's limits, half precision (reduce_norm.fusable).
        fused_norms = (one_piece and c.e == 2 and tokens <= MAX_ROWS
                       and tokens * c.D * c.e * (2 if wide else 1) <= ONE_SHOT_MAX_BYTES)
        if spec.is_moe:
            w = LayerWork(tokens, (H + 2 * Hkv) * c.d, H * c.d, core,
                          **c.moe_work(tokens, El, tp), experts_held=El,
                          expert_ff=spec.d_ff, router_tokens=tokens)
        else:
            w = LayerWork(tokens, (H + 2 * Hkv) * c.d, H * c.d, core, ff=spec.d_ff // tp,
                          norm_kernels=0 if fused_norms else 2)
        ops = c.roof.layer(w, graph=graph and not spec.is_moe)
        y = tokens * c.D * c.e
        g_attn = c.parts("all_reduce", "tp", y * (2 if wide else 1))[1] * n_ar
        g_mlp = c.parts("all_reduce", "tp", y)[1] * n_ar
        # ReduceAfter around attention and MLP (+ the cast back of a wide sum),
        # and the Pipeline's batch view of the layer's cache.
        wrap = _calls(k=1 if wide else 0, mod=0 if one_piece else 2) + f.batch_view()
        if halves:
            # OverlappedStage, per chunk: the previous layer's residual added
            # in the norm (add_norm), attention (on the chunk's rows), the
            # async all-reduce, the (no-op) cast, add_norm, the MLP, its
            # all-reduce, the chunk's cache views; the Pipeline's batch view.
            chunk = (f.add_norm() + f.attention(tokens_per_seq, -(-b // chunks))
                     + _calls(m=1) + f.add_norm() + f.mlp() + f.batch_view()
                     + _calls(all_reduce=2))
            calls = chunk * chunks + f.batch_view()
        elif spec.is_moe:
            pre = (f.block(f.attention(tokens_per_seq, b, wide), f.moe_router()) + wrap
                   + _calls(all_reduce=n_ar))
            post = _calls(all_reduce=n_ar)
            work = _moe_layer(c, w, ops, pre, post, g_attn, g_mlp)
            calls = pre + post + _moe_calls(f, El, w.experts_hit, tokens) - f.moe_router()
        else:
            calls = (f.block(f.attention(tokens_per_seq, b, wide), f.mlp()) + wrap
                     + _calls(all_reduce=2 * n_ar))
        if not spec.is_moe:
            kernels = (f.static_decode() - _calls(k=2, n=2) * fused_norms) if graph else calls
            work = Work().add(c.host(calls), c.roof.gpu(ops, kernels) + g_attn + g_mlp)
            if graph:
                st.graph_layer_kernels = kernels.kernels

        # Traffic recorded for the micro-batches as they are (balanced sizes).
        y_avg = c.B * tokens_per_seq * c.D * c.e / mb
        if tp > 1:
            c.add(st, "all_reduce", "tp", y_avg * (2 if wide else 1), max(stages) * mb)
            c.add(st, "all_reduce", "tp", y_avg, max(stages) * mb)
        for o in ops:
            st.add_op(o, max(stages) * c.B / b)
        c.ends(st, c.B * tokens_per_seq)
        runs, hosts, step_calls = [], [], Calls()
        for s, n in enumerate(stages):
            first, last = s == 0, s == pp - 1
            # Per micro-batch: the stage module(s) (OverlappedStage runs the
            # Transformer unless it splits halves), its input (a slice on the
            # first stage, a buffer to receive into elsewhere, and a send), the
            # embedding, final norm and LM head, the halves' split and join.
            vocab = spec.vocab_size is not None
            if halves:
                # OverlappedStage on its own: the chunks' inputs (and
                # embeddings), the first layer's plain norms (a view fewer
                # than add_norm), the output buffer and the last residual adds
                # into its slices, the final norm and LM head.
                per_mb = (_calls(m=1 + chunks, mod=1) + _calls(k=1, mod=1) * chunks * (vocab and first)
                          + (f.norm() - f.add_norm()) * chunks + _calls(k=chunks, m=1 + chunks)
                          + (f.norm() + _calls(k=1, mod=1) * vocab) * last)
            else:
                # OverlappedStage's module call; in one piece it calls the
                # Transformer's parts, not the Transformer.
                per_mb = (_calls(m=1, mod=1) + c.end_calls(first, last)
                          - _calls(mod=1) * one_piece)
            per_mb += _calls(p2p=(not first) + (not last))
            t_end = c.ends(StepCost(), tokens) if (first or last) else 0.0
            if halves:
                stage = Work().add(c.host(calls) * n, _overlapped(c, w, n, y, chunks))
            else:
                stage = Work().extend(work, n)
            no_p2p = dataclasses.replace(per_mb, p2p=0)
            stage.add(c.host(no_p2p),
                      c.step_launches(st, no_p2p, STATIC_STEP if graph else None) + t_end)
            step_calls = _busiest(step_calls, per_mb * mb + _calls(k=1 if last and mb > 1 else 0))
            hosts.append(stage.host_s)
            runs.append(stage.stage(c.cluster.sync_s))
        p2p_host = 0.0 if graph else c.cluster.collective_host_s("p2p")
        hop = c.coll("p2p", "pp", y)[0] if pp > 1 else 0.0
        if pp > 1:
            c.add(st, "p2p", "pp", y_avg, mb)
        st.seconds, st.bubble_s = _pipeline(runs, mb, p2p_host, hop)
        st.layer_calls = calls * mb
        st.step_calls = step_calls
        st.host_s = 0.0 if graph else max(hosts) * mb
        st.syncs = work.syncs * max(stages) * mb if not halves else 0
        st.compute_s = sum(o.seconds for o in st.ops.values())
        st.comm_s = sum(x.seconds for x in st.comms.values())
        st.exposed_comm_s = max(0.0, st.seconds - st.compute_s) if (tp > 1 or pp > 1) else 0.0
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
    # output, the all-reduced partial sum, MLP hidden. A stage holds one
    # micro-batch at a time (pipeline.Pipeline): its share of the prompt as
    # it enters, its output as it leaves.
    hidden = (spec.top_k * spec.d_ff * spec.mlp_matrices * El / max(spec.n_experts, 1)
              if spec.is_moe else spec.mlp_matrices * spec.d_ff // tp)
    width = 4 * c.D + (2 * H + 2 * Hkv) * c.d + hidden
    act = c.inputs * b / c.B + b * T * width * c.e + b * T * c.D * c.e
    buffers = b * T * c.D * c.e if pp > 1 else 0  # receive buffer of a stage
    return _Model(prefill, decode, weights, kv, act, buffers,
                  _kv_replication_notes(spec, tp, "tp", "ranks", max(kv)))


def _overlapped(c: _Ctx, w: LayerWork, layers: int, y: float, k: int = 2) -> float:
    """Device time of ``layers`` layers of OverlappedStage (tp_pp prefill in
    ``k`` chunks): the compute stream runs attention(0..k-1), then
    MLP(0..k-1) of each layer; each chunk's all-reduce runs on the
    communication stream in issue order while the next chunks compute, and a
    chunk's next block waits for its sum. Each chunk is 1/k of the rows, with
    its own kernels."""
    roof, f = c.roof, c.flav
    part = dataclasses.replace(w, tokens=w.tokens / k,
                               core=dataclasses.replace(w.core, seqs=w.core.seqs / k))
    h_ops = roof.layer(part)
    attn_names = ("qkv", "kv write", "attention", "w_o")
    seqs, T = w.core.seqs / k, w.tokens / max(w.core.seqs, 1)
    # The layer's two add_norms move the same bytes: one is attention's.
    half_norms = next((o.seconds for o in h_ops if o.name == "norms+residual"), 0.0) / 2
    t_attn = roof.gpu([o for o in h_ops if o.name in attn_names],
                      f.add_norm() + f.attention(int(T), max(1, int(seqs)))) + half_norms
    t_mlp = roof.gpu([o for o in h_ops if o.name not in attn_names],
                     f.add_norm() + f.mlp()) - half_norms
    t_ar = c.coll("all_reduce", "tp", y / k)[0]
    comp = comm = 0.0
    m_done = [0.0] * k
    busy_comp, busy_comm = [], []

    def compute(start: float, dur: float) -> float:
        busy_comp.append((start, start + dur))
        return start + dur

    def reduce(after: float) -> float:
        start = max(comm, after)
        busy_comm.append((start, start + t_ar))
        return start + t_ar

    for _ in range(layers):
        a_done = []
        for j in range(k):
            comp = compute(max(comp, m_done[j]), t_attn)
            comm = reduce(comp)
            a_done.append(comm)
        for j in range(k):
            comp = compute(max(comp, a_done[j]), t_mlp)
            comm = reduce(comp)
            m_done[j] = comm
    return max(comp, *m_done) + (1 - c.cluster.overlap) * _overlap(busy_comp, busy_comm)


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total time two streams' busy intervals coincide (each list sorted, disjoint)."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


# -- helix --------------------------------------------------------------------------------

def _sum_calls(how: str, N: int, M: int, pad: bool) -> Calls:
    """SumOverMesh: one flat all-reduce, or reshape(-1), the pad (a copy, when M
    does not divide the elements), reduce-scatter over slice (Comm: movedim,
    buffer, movedim), all-reduce over group, all-gather over slice (the same),
    and the slice and view_as of the result."""
    if how == "flat":
        return _calls(all_reduce=1 if N * M > 1 else 0)
    c = _calls(k=1 if pad else 0, m=3)
    if M > 1:
        c += _calls(m=6, reduce_scatter=1, all_gather=1)
    if N > 1:
        c += _calls(all_reduce=1)
    return c


def _helix(c: _Ctx) -> _Model:
    from ..parallel.helix import Helix, positions_held

    spec, f = c.spec, c.flav
    N, M = Helix.degrees(c.plan)
    P = N * M
    mode = Helix.repartition(spec, N, M)
    how = c.plan.option("reduce", "hier")
    H, Hkv, d, D, e = spec.n_heads // N, Helix.group_kv_heads(spec, N), c.d, c.D, c.e
    B, T, S = c.B, c.T, c.S
    chunks = balanced_ranges(T, M)
    F = spec.d_ff // P

    can_graph = mode == "heads" and dense_moe_ok(spec, B)  # Helix.supports_graphs
    graph_decode = can_graph if c.graphs is None else (c.graphs and can_graph)

    def layer_work(tokens: float, core: Core, copies: float,
                   kv_rows: float | None = None) -> LayerWork:
        if spec.is_moe:  # every expert, 1/P of its d_ff
            return LayerWork(tokens, (H + 2 * Hkv) * d // M, H * d // M, core,
                             **c.moe_work(tokens, spec.n_experts),
                             experts_held=spec.n_experts, expert_ff=F, router_tokens=tokens,
                             kv_rows=kv_rows, copy_bytes=copies)
        return LayerWork(tokens, (H + 2 * Hkv) * d // M, H * d // M, core, ff=F,
                         kv_rows=kv_rows, copy_bytes=copies)

    # Partial sums over all P ranks: attention and MLP of every layer, and the
    # vocabulary-sharded embedding of a model with token ids.
    n_sums = 2 * spec.n_layers + (spec.vocab_size is not None)

    def reduce(st: StepCost, y: float) -> tuple[float, float]:
        """Sum a partial [rows x D] over all P ranks ``n_sums`` times: (device
        time of one sum, bytes of the zero-padding copy SumOverMesh makes when
        M does not divide the rows x D elements)."""
        if how == "flat":
            return c.add(st, "all_reduce", "world", y * e, n_sums) / n_sums, 0.0
        padded = -(-y // M) * M * e
        t = c.add(st, "reduce_scatter", "slice", padded, n_sums)
        t += c.add(st, "all_reduce", "group", padded / M, n_sums)
        t += c.add(st, "all_gather", "slice", padded, n_sums)
        return t / n_sums, (y * e + padded if padded != y * e else 0.0)

    def attention_calls(decode: bool) -> Calls:
        """Helix's attention module, from parallel/helix.py."""
        a2a = _calls(k=1, m=1, all_to_all=1) if M > 1 else Calls()  # Comm: contiguous, buffer
        gather = _calls(k=1, m=3, all_gather=1) if M > 1 else Calls()  # movedim, copy, buffer, movedim
        wo = _calls(k=1, g=1, mod=1)
        if mode == "heads":
            # qkv; q, k, v reshaped and concatenated, moved, exchanged; permuted
            # and reshaped (a copy when M > 1), split, transposed; the cache
            # write; the core; o transposed and reshaped; W_o.
            return (_calls(mod=1) + f.qkv() + _calls(k=1, m=4) + a2a
                    + _calls(k=1 if M > 1 else 0, m=(1 if M > 1 else 2) + 1 + 3)
                    + f.cache_write() + _calls(k=1, a=1, m=2) + wo)
        if not decode:
            # prefill: queries transposed and exchanged, the received view
            # permuted and reshaped (a copy); K, V concatenated and gathered,
            # split, transposed; this chunk's rows sliced and written; the core
            # on the keys up to the chunk's end (masked past the first chunk:
            # two aranges, two index views, a compare); the output permuted and
            # split by dims (views), moved, reshaped (a copy) and exchanged
            # back, transposed and its last two dims merged (views); W_o.
            masked = M > 1
            return (_calls(mod=1) + f.qkv() + _calls(m=1) + a2a + _calls(k=1, m=2)
                    + _calls(k=1) + gather + _calls(m=1 + 3 + 2) + f.cache_write(M == 1)
                    + _calls(m=2) + (_calls(k=4, a=1, m=2) if masked else _calls(k=1, a=1))
                    + _calls(m=3) + _calls(k=1)
                    + (_calls(m=1, all_to_all=1) if M > 1 else Calls())
                    + _calls(m=2) + wo)
        # decode: q, k, v concatenated and gathered, split, transposed; the new
        # token's cache write (its owner); attend_lse on the shard (q reshaped,
        # FA2, its lse); o and lse packed (cast, reshape, expand, cat) and
        # exchanged; the parts' and lses' views, merge_stack (one Triton
        # launch); cast back, reshape; W_o.
        return (_calls(mod=1) + f.qkv() + _calls(k=1) + gather + _calls(m=1 + 3)
                + f.cache_write(M == 1) + _calls(k=1, m=2)
                + _calls(k=2 + (Hkv > 1), a=1, m=4 - (Hkv > 1))
                + (_calls(k=1, m=1, all_to_all=1) if M > 1 else Calls())
                + _calls(m=2) + f.merge() + _calls(k=1, m=1) + wo)

    def step(decode: bool) -> StepCost:
        graph = decode and graph_decode
        c.graph, c.decoding = graph, decode
        st, L = StepCost(), spec.n_layers
        tokens = B * (1 if decode else T)
        qkv_local = tokens * (H + 2 * Hkv) * d // M * e  # bytes of this rank's QKV output
        kv_rows = None
        if mode == "heads":
            core = (_decode_core(c, B, H // M, Hkv // M, S, c.wl.max_len, graph) if decode
                    else Core(B, H // M, Hkv // M, T, T * (T + 1) / 2, T))
            t_x = c.add(st, "all_to_all", "slice", tokens * (H + 2 * Hkv) * d // M * e, L)
            # HeadSliceAttention: the send buffer (cat), and with M > 1 Comm's
            # contiguous copy of its movedim view and the permute + reshape of
            # what arrives (a view when M is 1); in a graph K and V are also
            # written by an index_copy_ each (KVCache.write), one more than
            # the static layer's packed write.
            n_copy = 3 if M > 1 else 1
            copies, graph_kernels = n_copy * 2 * qkv_local, n_copy + 1
        elif decode:
            held = max(positions_held(M, s, T, S) for s in range(M))
            core = Core(B, H, Hkv, 1, held, held, True, "flash")  # attend_lse
            t_x = c.add(st, "all_gather", "slice", B * (H + 2 * Hkv) * d * e, L)
            t_x += c.add(st, "all_to_all", "slice", M * B * H * (d // M + 1) * 4, L)
            kv_rows = B * Hkv / M  # one rank of M stores the new token
            copies, graph_kernels = 0.0, 0
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
            graph_kernels = 0
        t_red, pad_copy = reduce(st, tokens * D)
        w = layer_work(tokens, core, copies + 2 * pad_copy, kv_rows)
        ops = c.roof.layer(w, graph=graph and not spec.is_moe)
        sums = _sum_calls(how, N, M, bool(pad_copy))
        attn = attention_calls(decode) + sums
        mlp_inner = (_moe_calls(f, spec.n_experts, w.experts_hit, tokens) if spec.is_moe
                     else f.mlp())
        mlp = _calls(mod=1) + mlp_inner + sums  # SumAfter
        calls = f.block(attn, mlp)
        t_coll = t_x / L + 2 * t_red
        if spec.is_moe:
            pre = f.block(attn, _calls(mod=1) + f.moe_router())
            post = sums
            work = _moe_layer(c, w, ops, pre, post, t_coll)
        else:
            kernels = (f.static_decode() + _calls(k=graph_kernels + 2 * bool(pad_copy))
                       if graph else calls)
            if graph:
                st.graph_layer_kernels = kernels.kernels
            work = Work().add(c.host(calls), c.roof.gpu(ops, kernels) + t_coll)
        for o in ops:
            st.add_op(o, L)
        t_ends = c.ends(st, tokens, -(-spec.vocab_size // P) if spec.vocab_size else None)
        step_calls = c.end_calls(False, True)
        if spec.vocab_size is not None:
            # VocabShardEmbedding: the ids' shift, range mask, clamp, lookup, cast,
            # masking, and its sum over the mesh.
            step_calls += _calls(k=8, m=1, mod=1) + sums
        whole = Work().extend(work, L).add(
            c.host(step_calls),
            c.step_launches(st, step_calls, STATIC_STEP if graph else None) + t_ends)
        st.seconds = whole.seconds(c.cluster.sync_s)
        st.host_s, st.syncs = whole.host_s, whole.syncs
        st.layer_calls, st.step_calls = calls, step_calls
        st.compute_s = sum(o.seconds for o in st.ops.values())
        st.comm_s = sum(x.seconds for x in st.comms.values())
        st.exposed_comm_s = st.comm_s  # helix's collectives are blocking
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
    return _Model(prefill, decode, [w] * P, kv, act, B * T * D * e // M,
                  _kv_replication_notes(spec, N, "N", "head groups", max(kv)))


def whole_layer(c: _Ctx, tokens: float, core: Core, routed: float, **extra) -> LayerWork:
    """One rank running a whole decoder layer on ``tokens`` token rows (ring,
    layerwise): every head, and the dense MLP or every expert with ``routed``
    tokens choosing among them."""
    spec = c.spec
    H, Hkv, d = spec.n_heads, spec.kv_heads, c.d
    if spec.is_moe:
        return LayerWork(tokens, (H + 2 * Hkv) * d, H * d, core,
                         **c.moe_work(tokens, spec.n_experts, routed=routed),
                         experts_held=spec.n_experts, expert_ff=spec.d_ff,
                         router_tokens=tokens, **extra)
    return LayerWork(tokens, (H + 2 * Hkv) * d, H * d, core, ff=spec.d_ff, **extra)


def _layer_work(c: _Ctx, w: LayerWork, ops: list[Op], attn: Calls,
                gpu_extra: float = 0.0) -> tuple[Work, Calls]:
    """(Work, calls) of one reference-shaped block with attention ``attn``
    (eager): the dense MLP (host and device overlap), or the MoE loop (a wait
    per expert). ``gpu_extra``: device time beyond the ops (collectives)."""
    f = c.flav
    if c.spec.is_moe:
        pre = f.block(attn, f.moe_router())
        calls = (pre + _moe_calls(f, int(w.experts_held), w.experts_hit, w.router_tokens)
                 - f.moe_router())
        return _moe_layer(c, w, ops, pre, Calls(), gpu_extra), calls
    calls = f.block(attn, f.mlp())
    return Work().add(c.host(calls), c.roof.gpu(ops, calls) + gpu_extra), calls


# -- ring ---------------------------------------------------------------------------------

def _ring(c: _Ctx) -> _Model:
    from ..parallel.ring import ZigZag, static_decode_ok

    spec, P, f = c.spec, c.P, c.flav
    mb = min(c.plan.micro_batches, c.B)
    b = -(-c.B // mb)
    H, Hkv, d, D, e, T = spec.n_heads, spec.kv_heads, c.d, c.D, c.e, c.T
    zz = ZigZag(P, T, c.wl.decode_steps)
    n = max(zz.real(r) for r in range(P))  # the busiest rank's prompt tokens
    busiest = max(range(P), key=zz.pairs)
    blocks = zz.blocks(busiest)
    L = spec.n_layers

    # Prefill: local tokens only; the core is P ring steps, each hop hidden
    # behind the attention on the block in hand. attend_lse runs cuDNN's flash
    # kernel (half precision, head_dim <= 128: SDPA's rate), FlashAttention-2
    # (head_dim <= 256) or the memory-efficient kernel, all with the lse.
    c.decoding = False
    st = StepCost()
    rows = b * n  # token rows of a micro-batch on the busiest rank
    cudnn = c.e == 2 and d <= 128
    core = Core(b, H, Hkv, n, zz.pairs(busiest), P * zz.block_rows, False,
                "sdpa" if cudnn else "flash")
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
    w_pre = whole_layer(c, rows, core, rows, copy_bytes=copies)
    rest_ops = c.roof.layer(w_pre)
    core_op = next(o for o in rest_ops if o.name == "attention")
    # RingAttention.prefill, from parallel/ring.py: two QKVs (one per zig-zag
    # chunk) on slices of x; three concatenations and transposes; the cache
    # write; the travelling block (allocated, K and V copied in, the rest
    # zeroed), the float32 accumulator and lse, the spare block; per ring step
    # but the last the exchange; per block computed: q's and the block's
    # slices, attend_lse (the kernel and its lse), merge_into (logaddexp, two shares,
    # the scaled accumulate, the lse copy); o cast, transposed and reshaped; W_o.
    n_blocks = len(blocks)
    cast = _calls(m=1) if f.fp32 else _calls(k=1)  # o.to(x.dtype): a no-op in fp32
    attn = (_calls(mod=1, m=2) + f.qkv() * 2 + _calls(k=3, m=3) + f.cache_write()
            + _calls(k=2 + 1 + 2, m=1 + 4 + 1 + 1) + _calls(p2p=P - 1)
            + _calls(k=15, a=1, m=9 + cudnn) * n_blocks + _calls(k=1, m=1) + cast
            + _calls(k=1, g=1, mod=1)
            + f.batch_view())  # the Transformer's batch view of the layer's cache
    # The core's time split over the ring steps by the pairs each block scores.
    pairs_at = {s_: ((q1 - q0) * (q1 - q0 + 1) / 2 if causal else (q1 - q0) * (k1 - k0))
                for s_, q0, q1, k0, k1, causal in blocks}
    total_pairs = sum(pairs_at.values()) or 1.0
    hop_bytes = 2 * b * Hkv * zz.block_rows * d * e
    hop = max((c.cluster.p2p_time(hop_bytes, r, (r + 1) % P)[0] for r in range(P)), default=0.0)
    hop_link = "ib" if any(c.cluster.node_of(r) != c.cluster.node_of((r + 1) % P)
                           for r in range(P)) else "nvlink"
    hop = c.in_stream(hop, "p2p", hop_link) if hop else 0.0
    # Each step's block computes while the next hop travels: the longer of the
    # two, and what the hop's kernels take from the block while both run.
    eff = c.cluster.overlap
    steps = [(hop if s_ < P - 1 else 0.0, core_op.seconds * pairs_at.get(s_, 0) / total_pairs)
             for s_ in range(P)]
    ring_s = sum(max(h_, b_) + (1 - eff) * min(h_, b_) for h_, b_ in steps)
    work, calls = _layer_work(c, w_pre, [o for o in rest_ops if o.name != "attention"], attn,
                              ring_s)
    for o in rest_ops:
        st.add_op(o, L * c.B / b)
    if P > 1:
        st.add_comm("send/seq", hop_link, hop_bytes * c.B / (b * mb), hop, (P - 1) * L * mb)
    # Every rank picks its zig-zag rows out of the global prompt once (index_select).
    pick = c.roof.copy("copies", 2 * c.B * n * max(c.in_width * e, 8))
    st.add_op(pick)
    # Per micro-batch: the batch slice, the Transformer and its ends; the pick.
    per_mb = _calls(m=1) + c.end_calls(True, True)
    step_calls = per_mb * mb + _calls(k=1 + (mb > 1))
    t_ends = c.ends(StepCost(), b * n)
    one = Work().extend(work, L).add(c.host(per_mb), t_ends + c.roof.launches(per_mb))
    whole = Work().extend(one, mb).add(c.host(_calls(k=1 + (mb > 1))), pick.seconds)
    c.ends(st, b * n)
    st.seconds = whole.seconds(c.cluster.sync_s)
    st.host_s, st.syncs = whole.host_s, whole.syncs
    st.layer_calls, st.step_calls = calls * mb, step_calls
    st.compute_s = sum(o.seconds for o in st.ops.values())
    st.comm_s = sum(x.seconds for x in st.comms.values())
    st.exposed_comm_s = max(0.0, st.seconds - st.compute_s)
    prefill = st

    # Decode (eager: the shard's length depends on the position): every rank
    # runs the whole layer on every new token, attends to its cache shard with
    # attend_lse, and one all-gather of (o, lse) merges the shards (merge_stack).
    # In a CUDA graph (Ring.supports_graphs, decode_static) every rank reads its
    # whole shard and spare slot with the positions it does not hold masked.
    can_graph = static_decode_ok(zz, spec, c.B)
    graph = can_graph if c.graphs is None else (c.graphs and can_graph)
    c.decoding, c.graph = True, graph
    st = StepCost()
    held = max(zz.kv_len(r, min(T + 1, c.wl.max_len)) if c.wl.decode_steps else zz.real(r)
               for r in range(P))
    slots = max(zz.kv_len(r, c.wl.max_len) + 1 for r in range(P))
    width = d + max(1, 4 // e)
    part = P * b * H * width * e  # the gathered (o, lse) pairs
    copies = 2 * b * H * width * e + 6 * part + 2 * b * H * d * 4
    w = whole_layer(c, b, _decode_core(c, b, H, Hkv, held, slots, graph), c.B,
                    copy_bytes=copies, kv_rows=b * Hkv / P)
    static = graph and not spec.is_moe
    ops = c.roof.layer(w, graph=static)
    t_ag = c.coll("all_gather", "seq", part)[0]
    c.add(st, "all_gather", "seq", P * c.B / mb * H * width * e, L * mb)
    # RingAttention.decode: qkv, transposes; the new token's cache write (on
    # the rank that stores it); attend_lse; (o, lse) packed (index view, view
    # as o's dtype, cat) and gathered (Comm: movedim, buffer, movedim); the
    # parts viewed and the lse columns read in place as float32; merge_stack
    # (one Triton launch); o transposed and reshaped; W_o; the batch view.
    attn = (_calls(mod=1) + f.qkv() + _calls(m=3) + f.cache_write() + _calls(k=1, m=1)
            + _calls(k=1, a=1, m=2) + _calls(m=3, all_gather=1 if P > 1 else 0)
            + _calls(m=5) + f.merge() + _calls(m=2)
            + _calls(k=1, g=1, mod=1)
            + f.batch_view())
    work, calls = _layer_work(c, w, ops, attn, t_ag)
    if static:
        # The graph holds decode_static's kernels, not the eager path's.
        kernels = f.static_decode() + RING_STATIC_EXTRA
        work = Work().add(0.0, c.roof.gpu(ops, kernels) + t_ag)
        st.graph_layer_kernels = kernels.kernels
    for o in ops:
        st.add_op(o, L * c.B / b)
    per_mb = _calls(m=1) + c.end_calls(True, True)
    t_ends = c.ends(st, b)
    one = Work().extend(work, L).add(
        c.host(per_mb), t_ends + c.step_launches(st, per_mb, RING_STATIC_STEP if static else None))
    whole = Work().extend(one, mb).add(c.host(_calls(k=mb > 1)), 0.0)
    st.seconds = whole.seconds(c.cluster.sync_s)
    st.host_s, st.syncs = whole.host_s, whole.syncs
    st.layer_calls, st.step_calls = calls * mb, per_mb * mb + _calls(k=mb > 1)
    st.compute_s = sum(o.seconds for o in st.ops.values())
    st.comm_s = st.exposed_comm_s = L * mb * t_ag
    c.graph = False
    decode = st

    w_all = (L * (attn_weights(spec, H, Hkv, d) + mlp_weights(spec, spec.d_ff, spec.n_experts)
                  + c.layer_norms()) + c.ends_weights(True, True)) * e
    # One spare slot a rank (RingAttention.decode_static's writes it does not keep).
    kv = [L * kv_bytes(spec, c.B, Hkv, zz.kv_len(r, c.wl.max_len) + 1) for r in range(P)]
    hidden = spec.top_k * spec.d_ff * spec.mlp_matrices if spec.is_moe else spec.mlp_matrices * spec.d_ff
    width = 4 * D + (H + 2 * Hkv) * d + hidden
    act = (c.inputs + b * n * width * e + b * H * n * (d + 1) * 4  # float32 accumulator
           + c.B * n * D * e)  # outputs of every micro-batch
    return _Model(prefill, decode, [w_all] * P, kv, act, 2 * hop_bytes)


# -- ep -----------------------------------------------------------------------------------

def _ep(c: _Ctx) -> _Model:
    from ..parallel.ep import MIN_CHUNK_TOKENS, ExpertParallel

    spec, P, f = c.spec, c.P, c.flav
    E, k, L = spec.n_experts, spec.top_k, spec.n_layers
    El = E // P
    H, Hkv, d, D, e, T, S = spec.n_heads, spec.kv_heads, c.d, c.D, c.e, c.T, c.S
    ranges = balanced_ranges(c.B, P)
    b = ranges[0][1] - ranges[0][0]  # rank 0 holds the most sequences
    fixed = ExpertParallel.chunks_option(c.plan)
    perm = P > 1 and El > 1  # received rows regrouped by expert (run_experts)

    def chunks_for(tokens: int) -> int:  # ExpertParallel.chunk_count
        if fixed is not None:
            return max(1, min(fixed, tokens))
        return 2 if tokens >= 2 * MIN_CHUNK_TOKENS else 1

    def moe_calls(K: int, hits: float) -> tuple[Calls, Calls]:
        """ExpertParallelMoE's calls (parallel/ep.py) before and after the host
        reads the routing table, for K chunks with ``hits`` (expert, chunk)
        pairs that receive rows."""
        casts = _calls(m=2) if f.fp32 else _calls(k=2)
        # The module; reshape; the fp32 router (promote_types, two casts,
        # linear), top-k's no-op cast, top-k, softmax; per chunk the slice and
        # flattening of its choices, argsort, the count (zeros, ones, scatter);
        # the stack, its index view and the table's all-gather (Comm: movedim,
        # buffer, movedim); the read to the host.
        before = (_calls(k=3, g=1, m=3, mod=1) + casts + _calls(k=4, m=2) * K
                  + _calls(k=1, m=4, all_gather=1 if P > 1 else 0) + _calls(sync=1))
        # On the host table: this rank's row, views, three sums and their
        # tolist; the output buffer. Per chunk: the dispatch (slice, index
        # arithmetic, gather; Comm's buffer and the exchange); the experts
        # (regrouped by expert: the table slice reshaped, arange, repeat,
        # repeat_interleave, argsort, the buffer, the gather; the grouped GEMM's
        # buffer; per expert with rows: slices, up_projection, the matmul, the
        # copy into place; the scatter back), the return exchange; the combine
        # (buffer, scatter into (token, slot) order, the weights' slice, index
        # view, cast, view, product, sum, the copy into the output); out.view.
        cast_w = _calls(m=1) if f.fp32 else _calls(k=1)
        run = (_calls(k=6, m=4) + _calls(k=1) if perm else _calls(m=1))
        after = (_calls(k=3, m=9) + _calls(m=1)
                 + (_calls(k=2, m=2, all_to_all=1) + run + _calls(m=1, all_to_all=1)
                    + _calls(k=4, m=5) + cast_w) * K
                 + (f.up() + _calls(k=2, g=1, m=5)) * hits + _calls(m=1))
        if P == 1:
            after = dataclasses.replace(after, all_to_all=0)
        return before, after

    # Decode steps of every rank's tokens together within DENSE_MOE_MAX_TOKENS
    # take the static form (ExpertParallelMoE._static), captured in a CUDA graph.
    static_decode = b * P <= _dense_moe_max_tokens()
    graph_decode = static_decode if c.graphs is None else (c.graphs and static_decode)

    def finish(st: StepCost, layer: Work, ops: list[Op], calls: Calls, tokens: float) -> StepCost:
        """The step from one layer's work: L layers, the ends (embedding and
        LM head on ``tokens`` rows) and the batch slice, and the totals."""
        for o in ops:
            st.add_op(o, L)
        t_ends = c.ends(st, tokens)
        step_calls = _calls(m=1) + c.end_calls(True, True)
        whole = Work().extend(layer, L).add(
            c.host(step_calls),
            t_ends + c.step_launches(st, step_calls, STATIC_STEP if c.graph else None))
        st.seconds = whole.seconds(c.cluster.sync_s)
        st.host_s, st.syncs = whole.host_s, whole.syncs
        st.layer_calls, st.step_calls = calls, step_calls
        st.compute_s = sum(o.seconds for o in st.ops.values())
        st.comm_s = sum(x.seconds for x in st.comms.values())
        st.exposed_comm_s = max(0.0, st.seconds - st.compute_s)
        return st

    def static_step() -> StepCost:
        """A decode step in the static form: every rank's share gathered
        (padded to the largest), this rank's experts on all of it (the
        reference MoE's dense path), a reduce-scatter back."""
        c.decoding, c.graph = True, graph_decode
        st = StepCost()
        rows = b * P  # gathered token rows
        core = _decode_core(c, b, H, Hkv, S, c.wl.max_len, graph_decode)
        w = LayerWork(b, (H + 2 * Hkv) * d, H * d, core, expert_rows=rows * El,
                      experts_hit=El, experts_held=El, expert_ff=spec.d_ff, router_tokens=rows)
        ops = c.roof.layer(w)
        t_coll = (c.add(st, "all_gather", "ep", rows * D * e, L)
                  + c.add(st, "reduce_scatter", "ep", rows * D * e, L)) / L
        # ExpertParallelMoE: the gather (Comm: movedim, buffer, movedim); the
        # router and route (moe_router, with the reshape and the view); the
        # dense experts; the reduce-scatter (Comm: movedim, buffer, movedim)
        # and the rank's rows.
        moe = (_calls(m=3, all_gather=1 if P > 1 else 0) + f.moe_router()
               + f.moe_dense(El) + _calls(m=3 + 1, reduce_scatter=1 if P > 1 else 0))
        calls = f.block(f.attention(1, b), moe)
        layer = Work().add(c.host(calls), c.roof.gpu(ops, calls) + t_coll)
        st = finish(st, layer, ops, calls, b)
        c.graph = False
        return st

    def step(new: int, decoding: bool) -> StepCost:
        # A prefill keeps the routed exchange (Ep.forward), one token or more.
        if decoding and static_decode:
            return static_step()
        c.decoding = decoding
        st = StepCost()
        local, routed = b * new, c.B * new
        K = chunks_for(local)
        core = (_decode_core(c, b, H, Hkv, S, c.wl.max_len, False) if decoding
                else Core(b, H, Hkv, T, T * (T + 1) / 2, T))
        rows = c.moe_rows(routed, El / E, P)  # (token, expert) rows of the busiest rank
        hits_chunk = c.hits(El, routed / K, P)  # experts with rows, per chunk
        copies = 5 * 2 * rows * D * e  # gather out, regroup, scatter back, unsort, weighting
        w = LayerWork(local, (H + 2 * Hkv) * d, H * d, core, expert_rows=rows,
                      experts_hit=c.hits(El, routed, P), experts_held=El,
                      expert_ff=spec.d_ff, router_tokens=local, copy_bytes=copies)
        ops = c.roof.layer(w)
        t_exp = next(o.seconds for o in ops if o.name == "experts")
        rest = [o for o in ops if o.name != "experts"]
        t_tab = c.add(st, "all_gather", "ep", P * K * E * 8, L) / L  # routing table (int64)
        disp, comb = local * k * D * e, rows * D * e
        t_d = c.coll("all_to_all", "ep", disp / K)[0]
        t_c = c.coll("all_to_all", "ep", comb / K)[0]
        c.add(st, "all_to_all", "ep", disp / K, L * K)
        c.add(st, "all_to_all", "ep", comb / K, L * K)
        before, after = moe_calls(K, hits_chunk * K)
        attn_part = f.block(f.attention(new, b), Calls())
        calls = attn_part + before + after
        # Two streams: the exchanges in issue order d0, d1, c0, d2, c1, ...;
        # experts on chunk i after its dispatch and the experts on chunk i-1.
        expert = f.up() + _calls(k=2, g=1)  # an expert's calls beyond the routing
        t_exp_k = t_exp / K + c.roof.launches(expert) * hits_chunk
        comm_free = t_d
        comp_free = 0.0
        d_end = [t_d]
        busy_comm, busy_comp = [(0.0, t_d)], []
        for i in range(K):
            if i + 1 < K:
                busy_comm.append((comm_free, comm_free + t_d))
                comm_free += t_d
                d_end.append(comm_free)
            start = max(comp_free, d_end[i])
            comp_free = start + t_exp_k
            busy_comp.append((start, comp_free))
            start = max(comm_free, comp_free)
            comm_free = start + t_c
            busy_comm.append((start, comm_free))
        moe_s = (comm_free + (1 - c.cluster.overlap) * _overlap(busy_comp, sorted(busy_comm))
                 + c.roof.launches(after - expert * (hits_chunk * K)))
        # Attention and routing up to the table, then the host waits for the
        # table (one read a layer); then the chunks' exchanges and experts.
        layer = Work().add(c.host(attn_part + before),
                           c.roof.gpu(rest, attn_part + before) + t_tab)
        layer.sync().add(c.host(after), moe_s)
        return finish(st, layer, ops, calls, local)

    prefill, decode = step(T, False), step(1, True)
    per_layer = attn_weights(spec, H, Hkv, d) + mlp_weights(spec, spec.d_ff, El) + c.layer_norms()
    w = (L * per_layer + c.ends_weights(True, True)) * e
    kv = [L * kv_bytes(spec, b1 - b0, Hkv, c.wl.max_len) for b0, b1 in ranges]
    rows = c.B * T * k / P
    act = (c.inputs + b * T * (4 * D + (2 * H + 2 * Hkv) * d) * e
           + rows * (2 * D + spec.mlp_matrices * spec.d_ff) * e  # received rows, hidden, results
           + b * T * k * D * e)  # the sorted copy sent out
    return _Model(prefill, decode, [w] * P, kv, act, int(rows * D * e))


# -- layerwise -------------------------------------------------------------------------------

def _layerwise(c: _Ctx) -> _Model:
    from ..parallel.layerwise import plan_partition

    spec, f = c.spec, c.flav
    part = c.layout or plan_partition(spec, c.wl, c.plan, c.P)
    G, R = len(part.groups), part.replicas
    H, Hkv, d, D, e, T, S = spec.n_heads, spec.kv_heads, c.d, c.D, c.e, c.T, c.S
    replica_ranges = balanced_ranges(c.B, R)
    rb = replica_ranges[0][1] - replica_ranges[0][0]
    mb = min(c.plan.micro_batches, rb)
    b = -(-rb // mb)

    # One group: replicas only, nothing crosses ranks inside a step, so decode
    # steps replay a CUDA graph (Layerwise.supports_graphs).
    can_graph = G == 1 and dense_moe_ok(spec, rb)
    graph_decode = can_graph if c.graphs is None else (c.graphs and can_graph)

    def step(new: int, core: Core, graph: bool = False) -> StepCost:
        c.decoding, c.graph = new == 1, graph
        st = StepCost()
        w = whole_layer(c, b * new, core, b * new)
        static = graph and not spec.is_moe
        ops = c.roof.layer(w, graph=static)
        # The reference block and the Pipeline's batch view of its cache.
        attn = f.attention(new, b) + f.batch_view()
        if static:  # the static layer's launches, no host
            calls = f.block(attn, f.mlp())
            work = Work().add(0.0, c.roof.gpu(ops, f.static_decode()))
            st.graph_layer_kernels = f.static_decode().kernels
        else:
            work, calls = _layer_work(c, w, ops, attn)
        runs, hosts, step_calls = [], [], Calls()
        for i, g in enumerate(part.groups):
            first, last = i == 0, i == G - 1
            per_mb = (_calls(m=1) + c.end_calls(first, last)
                      + _calls(p2p=(not first) + (not last)))
            no_p2p = dataclasses.replace(per_mb, p2p=0)
            t_end = c.ends(StepCost(), b * new) if (first or last) else 0.0
            stage = Work().extend(work, len(g.layers)).add(
                c.host(no_p2p), t_end + c.step_launches(st, no_p2p, STATIC_STEP if graph else None))
            step_calls = _busiest(step_calls, per_mb * mb + _calls(k=1 if last and mb > 1 else 0, m=1))
            hosts.append(stage.host_s)
            runs.append(stage.stage(c.cluster.sync_s))
        biggest = max(len(g.layers) for g in part.groups)
        for o in ops:
            st.add_op(o, biggest * rb / b)
        c.ends(st, rb * new)
        hop = 0.0
        if G > 1:
            y = b * new * D * e
            hops = []
            for r in range(R):
                for i in range(G - 1):
                    t, lk = c.cluster.p2p_time(y, r * G + i, r * G + i + 1)
                    hops.append(c.in_stream(t, "p2p", lk))
            hop = max(hops)
            link = "ib" if any(c.cluster.node_of(r * G + i) != c.cluster.node_of(r * G + i + 1)
                               for r in range(R) for i in range(G - 1)) else "nvlink"
            st.add_comm("send/pp", link, rb * new * D * e / mb, hop, mb)
        st.seconds, st.bubble_s = _pipeline(runs, mb, c.cluster.collective_host_s("p2p"), hop)
        st.layer_calls, st.step_calls = calls * mb, step_calls
        st.host_s = max(hosts) * mb
        st.syncs = work.syncs * biggest * mb
        st.compute_s = sum(o.seconds for o in st.ops.values())
        st.comm_s = st.exposed_comm_s = (mb + G - 1) * hop if G > 1 else 0.0
        c.graph = False
        return st

    prefill = step(T, Core(b, H, Hkv, T, T * (T + 1) / 2, T))
    decode = step(1, _decode_core(c, b, H, Hkv, S, c.wl.max_len, graph_decode), graph_decode)
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
    # One micro-batch per stage (pipeline.Pipeline), as in _tp_pp.
    act = c.inputs * b / c.B + b * T * (4 * D + (2 * H + 2 * Hkv) * d + hidden) * e + b * T * D * e
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
            world_size: int | None = None, graphs: bool | None = None,
            moe_balance: float | None = None, layout=None) -> Prediction:
    """Predict ``plan`` on ``cluster``. The plan is validated first (a
    ShardwiseError names what is wrong); a plan that is valid but does not fit
    in memory is returned with ``fits`` False and the reason.

    ``graphs``: whether decode steps replay a CUDA graph. None (default): where
    the strategy supports it, as ``shardwise bench`` runs them on GPUs; False:
    every step eager (``--no-graphs``, or CPU).

    ``moe_balance``: for MoE models, the routed rows of the busiest rank over
    the mean, as a run measured it (``rank_load_max_over_mean`` in an ep
    record's report: the router evaluated on the run's data); None: the
    expected maximum under uniform, independent routing.

    ``layout``: for layerwise, the partition a run used
    (:func:`~shardwise.perf.partition.partition_at` of its reported groups);
    None: the one the search chooses."""
    plan = resolve_capacity(Plan.parse(plan) if isinstance(plan, str) else plan, cluster)
    if world_size is None and plan.strategy == "layerwise":
        world_size = cluster.n_gpus
    _, topo = validate_plan(spec, workload, plan, world_size)
    if topo.world_size > cluster.n_gpus:
        raise ShardwiseError(f"plan {plan} needs {topo.world_size} GPUs but cluster "
                             f"{cluster.name} has {cluster.n_gpus}")
    if plan.strategy not in STRATEGY_MODELS:
        raise ShardwiseError(f"the cost model has no formulas for strategy {plan.strategy!r}")
    model = STRATEGY_MODELS[plan.strategy]
    m = model(_Ctx(spec, workload, plan, cluster, topo, graphs, moe_balance, layout=layout))
    # A step whose GPU waits part of the time (pipeline bubbles, host-bound
    # steps) runs its kernels at the clocks that duty cycle holds: predicted
    # again at that rate (duty_derate), once per phase.
    for phase in ("prefill", "decode"):
        st = getattr(m, phase)
        duty = st.compute_s / st.seconds if st.seconds > 0 else 1.0
        if duty < DUTY_REPREDICT and cluster.sustained_ratio < 1.0:
            again = model(_Ctx(spec, workload, plan, cluster, topo, graphs, moe_balance, duty,
                               layout))
            setattr(m, phase, getattr(again, phase))
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
