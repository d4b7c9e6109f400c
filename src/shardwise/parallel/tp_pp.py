"""tp_pp: Megatron-style tensor x pipeline parallelism (the baseline).

Tensor parallelism (Shoeybi et al. 2019, "Megatron-LM"): inside a layer the
heads and d_ff are split ``tp`` ways. QKV and the MLP's input projection are
column-parallel (each rank computes its heads / its d_ff slice with no
communication); the attention output projection and the MLP's down
projection are row-parallel, so each rank holds a partial sum of the layer's
output and one all-reduce over ``tp`` after attention and one after the MLP
restore it. MoE layers spread whole experts over the ``tp`` ranks (the seed's
"2 experts per GPU") and add the shares with the same all-reduce.
Grouped-query models split their key/value heads the same way; with more
ranks than KV heads (``tp % n_kv_heads == 0``) each rank holds the one KV
head its query heads use, replicated over the ``tp / n_kv_heads`` ranks that
share it (its K/V projection rows and its cache), as vLLM does
(:func:`~shardwise.parallel.checks.held_kv_heads`).

Options: ``overlap=K|auto`` runs a prefill as K chunks of the batch whose
all-reduces overlap the next chunk's matmuls (:class:`OverlappedStage`;
``auto``, the default: 2 chunks where each one's all-reduce is at least
``OVERLAP_MIN_BYTES``; ``overlap=1`` is off);
``reduce=fp32|model`` is the dtype of the attention's partial sums
(:class:`WideOutputLinear`; fp32 by default for MoE models, whose routing a
rounding of its input can flip).

Pipeline parallelism: the layers are cut into ``pp`` contiguous stages run by
the shared micro-batched :class:`~shardwise.parallel.pipeline.Pipeline`
(one stage takes micro-batches too: the stage runs them one after another).
Mesh axes ``("pp", "tp")``: tp varies fastest, so a tp group is consecutive
ranks (one node's NVLink). ``tp_pp:TxP`` is the composition ``pp:P/tp:T``
(:mod:`.compose`); :func:`tp_stage` is a stage's layers on the tp ranks,
which ring, ep and whole-layer stages (layerwise, ``dp``/``pp`` alone) build
on too.
"""
from __future__ import annotations

import torch
from torch import nn

from ..model.kernels import add_norm, norm
from ..model.reference import KVCache, Transformer, build_layers, make_block, one_step
from .base import dense_moe_ok
from .checks import OVERLAP_AUTO_CHUNKS, balanced_ranges, held_kv_heads, kv_replicas
from .compose import Composed, Stage, StageContext
from .plans import TpPpPlan


# Below this size a chunk's all-reduce is latency, not bandwidth: splitting
# would multiply the calls (host time) to hide almost nothing.
OVERLAP_MIN_BYTES = 1 << 20


def overlap_chunks(option: str, batch: int, tokens: int, row_bytes: int) -> int:
    """How many chunks :class:`OverlappedStage` splits a step of ``batch``
    sequences of ``tokens`` into under ``overlap=option`` (1: the plain
    path). Decode steps (one token) always take the plain path."""
    if tokens < 2 or batch < 2:
        return 1
    if option != "auto":
        return max(1, min(int(option), batch))
    for k in OVERLAP_AUTO_CHUNKS:
        if batch >= k and (batch // k) * tokens * row_bytes >= OVERLAP_MIN_BYTES:
            return k
    return 1


class OverlappedStage(nn.Module):
    """A tensor-parallel stage: its layers' row-parallel partial sums (the
    attention's output projection, the MLP's down-projection) summed over
    the tp ranks (Megatron's ``g`` operator), on K chunks of the batch at
    once, so that the all-reduce of one chunk runs while the next chunk
    computes (prefill). Whole experts per rank need no wide sum: each
    token's expert outputs are rounded and added exactly as on one device.

    Megatron's reductions sit on the critical path: each layer waits for its
    two all-reduces. With K independent chunks, chunk j's reduction is issued
    asynchronously and chunk j+1's matmuls run meanwhile; every chunk still
    sees exactly the reference arithmetic. Only the last chunk's last
    reduction is left exposed, 1/K of a layer's. Each residual add runs in one
    kernel with the norm after it, also across layers, and the last adds
    write the stage's output in place. Decode steps (one token), single
    sequences, MoE models and, under ``auto``, small batches run the stage
    in one piece, each all-reduce together with the add and norm after it
    (one kernel per reduction in a decode step on GPUs).
    """

    def __init__(self, stage: Transformer, comm, axis: str, option: str = "auto"):
        super().__init__()
        self.stage, self.comm, self.axis, self.option = stage, comm, axis, option

    def forward(self, inputs: torch.Tensor, caches, pos):
        B, T = inputs.shape[:2]
        st = self.stage
        D = st.spec.d_model
        if self.comm.topo.size(self.axis) == 1:
            return st(inputs, caches, pos)
        row_bytes = D * st.layers[0].attn_norm.weight.element_size()  # activations' dtype
        k = 1 if self.option == "1" or st.spec.is_moe else overlap_chunks(self.option, B, T,
                                                                         row_bytes)
        if k < 2:
            return self._reduce_with_norm(inputs, caches, pos)
        parts = balanced_ranges(B, k)
        xs = [st.embed(inputs[a:b]) if st.embed is not None else inputs[a:b] for a, b in parts]
        views = [[c.batch_view(a, b) for c in caches] for a, b in parts]
        pending = [None] * k  # per chunk: the previous layer's MLP output, once summed
        for i, blk in enumerate(st.layers):
            attn_out = []
            for j in range(k):
                # the previous layer's residual add, in one kernel with this norm
                xs[j], n = add_norm(blk.attn_norm, xs[j], pending[j]() if pending[j] else None)
                a = blk.attn(n, views[j][i], pos)
                attn_out.append(self.comm.all_reduce_start(a, self.axis))
            for j in range(k):  # chunk j's reduction ran while the next chunk computed
                a = attn_out[j]()  # float32 under reduce=fp32
                xs[j], n = add_norm(blk.mlp_norm, xs[j], a.to(xs[j].dtype))
                pending[j] = self.comm.all_reduce_start(blk.mlp(n), self.axis)
        x = torch.empty((B, T, D), dtype=xs[0].dtype, device=xs[0].device)
        for (a, b), h, m in zip(parts, xs, pending):
            torch.add(h, m(), out=x[a:b])
        if st.norm is not None:
            x = norm(st.norm, x)
        return st.lm_head(x) if st.lm_head is not None else x

    def _reduce_with_norm(self, inputs: torch.Tensor, caches, pos):
        """The stage in one piece, each all-reduce done together with the
        residual add and the norm after it
        (:meth:`~shardwise.parallel.comm.Comm.all_reduce_add_norm`: one
        kernel in a decode step on GPUs)."""
        st, comm, axis = self.stage, self.comm, self.axis
        x = st.embed(inputs) if st.embed is not None else inputs
        pending = None  # the previous layer's MLP partial sum, not yet reduced
        with one_step(pos):
            for blk, cache in zip(st.layers, caches):
                if pending is None:
                    x, n = add_norm(blk.attn_norm, x, None)
                else:
                    x, n = comm.all_reduce_add_norm(pending, x, blk.attn_norm, axis)
                x, n = comm.all_reduce_add_norm(blk.attn(n, cache, pos), x, blk.mlp_norm,
                                                axis)
                pending = blk.mlp(n)
        x, y = comm.all_reduce_add_norm(pending, x, st.norm, axis)
        x = x if y is None else y
        return st.lm_head(x) if st.lm_head is not None else x


class WideOutputLinear(nn.Module):
    """A bias-free linear layer whose output stays in float32: the partial
    sum of a row-parallel layer before the all-reduce.

    One device computes ``x @ W.T`` with float32 accumulation and rounds
    once. Rounding each rank's partial to bf16 and adding the roundings
    differs from that by up to an ulp per element, which is enough to flip
    a near-tied MoE routing decision downstream. Reducing float32 partials
    and rounding the sum once agrees with the single device except where
    the two float32 sums fall on either side of a bf16 rounding boundary.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight = linear.weight  # [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, w = x.shape, self.weight
        x2 = x.reshape(-1, shape[-1])  # [N, in]
        if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
            y = torch.mm(x2, w.t(), out_dtype=torch.float32)  # fp32 accumulate, no rounding
        else:
            y = x2.float() @ w.float().t()
        return y.view(*shape[:-1], w.shape[0])


def tp_stage(ctx: StageContext, attention=None, mlp=None, experts: range | None = None,
             cache_len: int | None = None) -> Stage:
    """The stage's layers ``ctx.layers`` on this rank's tensor-parallel slice:
    its heads (and the KV heads they use), its d_ff slice, and for MoE its
    experts (``experts`` None: spread over tp; given: those, each with its
    d_ff split over tp). ``attention`` and ``mlp`` wrap the local modules
    before the all-reduce over tp (ring's attention core, ep's exchange).
    With no tp dimension in the plan these are whole layers. The embedding and LM head are
    replicated over the tp ranks of their stage."""
    spec, topo, comm, loader = ctx.spec, ctx.topo, ctx.comm, ctx.loader
    tp, t = topo.size("tp"), topo.coord("tp")
    # A plan with a tp dimension (tp_pp's included, tp:1 too) runs the
    # reductions and OverlappedStage's schedule; without one, bare layers.
    split = ctx.comp.has("tp")
    dtype = loader.dtype
    # Attention partial sums reduced in float32 (see WideOutputLinear):
    # the default for MoE, whose routing is discontinuous in its input.
    wide = tp > 1 and dtype != torch.float32 and ctx.option(
        "tp", "reduce", "fp32" if spec.is_moe else "model") == "fp32"
    heads = range(t * spec.n_heads // tp, (t + 1) * spec.n_heads // tp)
    kv_heads = held_kv_heads(t, tp, spec.kv_heads)  # replicated when tp > n_kv_heads
    ff = range(t * spec.d_ff // tp, (t + 1) * spec.d_ff // tp)
    if spec.is_moe and experts is None:
        experts, ff = range(t * spec.n_experts // tp, (t + 1) * spec.n_experts // tp), None
    whole = tp == 1  # every row: the loader reads each tensor whole
    def block(layer: int) -> nn.Module:
        with torch.device("meta"):
            blk = make_block(spec, n_heads=len(heads), n_kv_heads=len(kv_heads),
                             d_ff=None if ff is None else len(ff), experts=experts)
        loader.load_block(blk, layer, q_heads=None if whole else heads,
                          kv_heads=None if whole else kv_heads,
                          ff=None if whole or ff is None else torch.arange(ff.start, ff.stop),
                          experts=experts if spec.is_moe else None)
        if wide:
            blk.attn.wo = WideOutputLinear(blk.attn.wo)
        if attention is not None:
            blk.attn = attention(blk.attn)
        if mlp is not None:
            blk.mlp = mlp(blk.mlp)
        return blk

    with torch.device("meta"):
        stage = Transformer(spec, ctx.layers, first=ctx.first, last=ctx.last, blocks=False)
    stage.layers = build_layers(ctx.layers, block)
    loader.load_ends(stage)
    caches = [KVCache.allocate(ctx.rows, len(kv_heads), cache_len or ctx.workload.max_len,
                               spec.head_dim, dtype, loader.device) for _ in ctx.layers]
    # overlap=1 turns the chunked schedule off, K forces K chunks, auto
    # (the default) picks them where a chunk's all-reduce is large enough
    # to hide; unchunked steps fuse each reduction with its add and norm.
    run = OverlappedStage(stage, comm, "tp", ctx.option("tp", "overlap", "auto")) if split \
        else stage
    # A decode step is capturable in a CUDA graph when, for MoE, its tokens
    # take the reference's dense path (the routed loop sizes its work on the
    # host with torch.nonzero).
    return Stage(run, caches, dense_moe_ok(spec, max(ctx.largest)),
                 info={"kv_heads_per_rank": len(kv_heads),
                       "kv_head_replicas": kv_replicas(tp, spec.kv_heads)})


class TpPp(TpPpPlan, Composed):
    """tp_pp on one rank (its rules: :class:`~.plans.TpPpPlan`)."""

    build_stage = staticmethod(tp_stage)

    def report(self) -> dict:
        return {"stage_layers": [self.stage_layers.start, self.stage_layers.stop],
                "kv_heads_per_rank": self.stage_info["kv_heads_per_rank"],
                "kv_head_replicas": self.stage_info["kv_head_replicas"]}


STRATEGY = TpPp
