"""helix: two-level attention partitioning, N head groups x M head-dim slices.

Mesh ``("group", "slice")``, P = N*M ranks; slice varies fastest, so the M
ranks of a head group are consecutive (one node's fast links). Rank (g, s)
holds the Q/K/V projection rows of the heads of group g restricted to dims
``s*d/M .. (s+1)*d/M`` of each head, its share of W_o, and 1/P of d_ff: 1/P
of every weight (norms and the MoE router, a few vectors, are replicated).
With more head groups than KV heads (``N % n_kv_heads == 0``), a group holds
the one KV head its query heads use, replicated over the ``N / n_kv_heads``
groups that share it, as tensor parallelism does
(:func:`~shardwise.parallel.checks.held_kv_heads`): those K/V rows and their
cache are the only attention state held more than once. The group's single
KV head cannot be split over M > 1 ranks by heads, so it takes the
``sequence`` re-partition below.

Invariant: Q.K^T needs every dim of a head, so before the attention core the
M ranks of a group re-partition with one all-to-all over ``slice``:

* ``heads`` (kv heads per group divisible by M): dim slices of all the
  group's heads -> all dims of 1/M of them. W_o is split by those heads'
  columns, so each rank's output is already a partial sum of the layer's
  output: no second all-to-all. The KV cache is split by heads.
* ``sequence`` (otherwise, e.g. more ranks than heads): queries go to
  query-position chunks, K/V are all-gathered inside the group; after the
  core the inverse all-to-all brings the output back to dim slices, which
  meet W_o's matching dim-slice columns. The KV cache is split by position
  and a decode step merges the ranks' partial attention exactly by
  log-sum-exp (:mod:`shardwise.parallel.lse`).

Partial outputs (attention and MLP) are summed over all P ranks either
hierarchically (``reduce=hier``: reduce-scatter over slice, all-reduce over
group, all-gather over slice) or with one flat all-reduce (``reduce=flat``).

:func:`helix_stage` builds a stage's layers on the ``group`` x ``slice``
ranks of a larger mesh (``pp:2/helix:2x2``, :mod:`.compose`); the plan
``helix:NxM`` is that stage over the whole world, every layer in it.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as Fn
from torch import nn

from ..model.load import head_rows, set_param
from ..model.rope import Rope
from ..model.rotary import rotate
from ..model.reference import (MLP, Attention, Block, KVCache, Linear, MoE, Transformer,
                               build_layers, causal_attention, make_norm)
from ..spec import ModelSpec, ShardwiseError, dtype_bytes
from .base import dense_moe_ok
from .checks import balanced_ranges, held_kv_heads, kv_replicas, repartition
from .compose import Composed, Stage, StageContext
from .plans import HelixPlan
from .lse import attend_lse, merge_stack

class SumOverMesh:
    """Sum a partial result over all P ranks, in place where it can."""

    def __init__(self, comm, how: str):
        self.comm, self.how = comm, how
        self.slices = comm.topo.size("slice")

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        if self.how == "flat":  # one group of the stage's N*M ranks ("world" when it is all)
            return self.comm.all_reduce(y, ("group", "slice"))
        flat = y.reshape(-1)
        pad = -flat.numel() % self.slices  # reduce-scatter needs equal parts
        if pad:
            flat = Fn.pad(flat, (0, pad))
        part = self.comm.reduce_scatter(flat, "slice")  # this rank's 1/M, summed in the group
        self.comm.all_reduce(part, "group")  # ... and over the groups, on 1/M of the bytes
        return self.comm.all_gather(part, "slice")[: y.numel()].view_as(y)


class SumAfter(nn.Module):
    """Run a module that yields a partial sum (the P-way d_ff split), then sum."""

    def __init__(self, inner: nn.Module, sum_all: SumOverMesh):
        super().__init__()
        self.inner, self.sum_all = inner, sum_all

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sum_all(self.inner(x))


class HelixAttention(nn.Module):
    """Shared part: ``local`` is a reference Attention of this rank's dim slices
    (head_dim d/M, no rotary: rotation needs the full head dim) whose ``wo``
    holds this rank's W_o columns."""

    def __init__(self, local: Attention, spec: ModelSpec, topo, comm,
                 sum_all: SumOverMesh):
        super().__init__()
        self.local, self.comm, self.sum_all = local, comm, sum_all
        self.slices, self.slice = topo.size("slice"), topo.coord("slice")
        self.head_dim, self.rotary = spec.head_dim, Rope.of(spec)
        self.heads, self.kv_heads = local.n_heads, local.n_kv_heads  # of the group

    def store(self, cache: KVCache, pos, q, k, v, slot=None):
        """Rotate ``q [B, T, h, d]`` in place and store this step's ``k, v [B,
        T, hkv, d]`` (rotated) at ``slot..slot+T`` of ``cache`` (default
        ``pos``): one kernel on GPUs with a rotary embedding. Returns the
        cache's ``k, v [B, hkv, S, d]`` as ``KVCache.write`` does."""
        if self.rotary is not None:
            return cache.write_rotated(self.rotary, pos, q, k, v, slot)
        return cache.write(pos if slot is None else slot, k.transpose(1, 2), v.transpose(1, 2))

    def rotate(self, pos, q=None, k=None) -> None:
        """The rotary embedding (if any) of ``q`` and ``k`` at ``pos``, in place."""
        if self.rotary is not None:
            rotate(self.rotary, pos, q, k)


class HeadSliceAttention(HelixAttention):
    """Re-partition dim slices -> head slices; cache and W_o split by heads."""

    def forward(self, x: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
        B, T, _ = x.shape
        M, d = self.slices, self.head_dim
        q, k, v = self.local.qkv(x, pos)  # [B, T, H_g, d/M], k, v [B, T, Hkv_g, d/M]
        # Head chunk j of each projection goes to slice rank j; q, k and v
        # travel in one all-to-all.
        send = torch.cat([t.reshape(B, T, M, -1, d // M) for t in (q, k, v)], dim=3)
        recv = self.comm.all_to_all(send.movedim(2, 0), "slice")  # [M (dims), B, T, h, d/M]
        full = recv.permute(1, 2, 3, 0, 4).reshape(B, T, -1, d)  # [B, T, h, d]
        q, k, v = full.split([self.heads // M, self.kv_heads // M, self.kv_heads // M], dim=2)
        k, v = self.store(cache, pos, q, k, v)  # [B, h, pos+T, d]
        o = causal_attention(q.transpose(1, 2), k, v, pos)  # [B, H_g/M, T, d]
        return self.sum_all(self.local.wo(o.transpose(1, 2).reshape(B, T, -1)))


def positions_held(slices: int, slice_: int, prompt_len: int, pos: int) -> int:
    """How many of positions ``0 .. pos-1`` (pos >= prompt_len) slice rank
    ``slice_`` caches in the sequence split: its prompt chunk plus the decoded
    positions p with ``p % slices == slice_``."""
    t0, t1 = balanced_ranges(prompt_len, slices)[slice_]

    def decoded_before(p: int) -> int:  # #{q < p : q % slices == slice_}
        return (p - slice_ + slices - 1) // slices

    return t1 - t0 + decoded_before(pos) - decoded_before(prompt_len)


class SequenceChunkAttention(HelixAttention):
    """Re-partition dim slices -> query-position chunks; cache split by position.

    Slice rank s caches prompt positions ``chunks[s]`` (balanced, contiguous)
    and the decoded positions p with ``p % M == s``, packed in arrival order,
    so shards stay within one token of each other."""

    prompt_len = 0

    def forward(self, x: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
        if pos == 0:
            return self.prefill(x, cache)
        if x.shape[1] == 1:
            return self.decode(x, cache, pos)
        raise ShardwiseError("helix's sequence re-partition runs a prompt at position 0 "
                             "or one token per decode step; split the input accordingly")

    def prefill(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        B, T, _ = x.shape
        M, d, H, Hkv = self.slices, self.head_dim, self.heads, self.kv_heads
        chunks = balanced_ranges(T, M)
        sizes = [b - a for a, b in chunks]
        t0, t1 = chunks[self.slice]
        n = t1 - t0
        self.prompt_len = T
        q, k, v = self.local.qkv(x, 0)  # [B, T, H_g, d/M], k, v [B, T, Hkv_g, d/M]
        # Position chunk j of the queries goes to slice rank j (uneven splits).
        recv = self.comm.all_to_all(q.transpose(0, 1), "slice", sizes, [n] * M)  # [M*n, B, H, d/M]
        q = recv.view(M, n, B, H, d // M).permute(2, 1, 3, 0, 4).reshape(B, n, H, d)
        kv = self.comm.all_gather(torch.cat([k, v], dim=2), "slice", dim=3)  # [B, T, 2Hkv, d]
        k, v = kv.split(Hkv, dim=2)
        self.rotate(t0, q=q)
        self.rotate(0, k=k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, h, T, d]
        cache.write(0, k[:, :, t0:t1], v[:, :, t0:t1])
        o = causal_attention(q, k[:, :, :t1], v[:, :, :t1], t0)  # [B, H, n, d]
        # Inverse all-to-all: dim slice j of this chunk goes to rank j, which
        # holds W_o's columns for dims j.
        send = o.permute(2, 0, 1, 3).reshape(n, B, H, M, d // M).movedim(3, 0)  # [M, n, B, H, d/M]
        o = self.comm.all_to_all(send.reshape(M * n, B, H, d // M), "slice", [n] * M, sizes)
        return self.sum_all(self.local.wo(o.transpose(0, 1).reshape(B, T, H * d // M)))

    def decode(self, x: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
        B = x.shape[0]
        M, d, H, Hkv = self.slices, self.head_dim, self.heads, self.kv_heads
        q, k, v = self.local.qkv(x, pos)  # [B, 1, H_g, d/M], k, v [B, 1, Hkv_g, d/M]
        # One token: every rank of the group takes all of q (and the new k, v,
        # which only its owner stores).
        qkv = self.comm.all_gather(torch.cat([q, k, v], dim=2), "slice", dim=3)  # [B, 1, H+2Hkv, d]
        q, k, v = qkv.split([H, Hkv, Hkv], dim=2)
        n = positions_held(self.slices, self.slice, self.prompt_len, pos)
        if pos % M == self.slice:
            k_loc, v_loc = self.store(cache, pos, q, k, v, slot=n)  # [B, Hkv, n+1, d]
        else:
            self.rotate(pos, q=q)
            k_loc, v_loc = cache.k[:, :, :n], cache.v[:, :, :n]
        q = q.transpose(1, 2)  # [B, H, 1, d]
        # The H/Hkv query heads sharing a kv head act as that head's rows of
        # queries (attend_lse groups them), so the cache is read once.
        o, lse = attend_lse(q, k_loc, v_loc)  # [B, H, 1, d], [B, H, 1]
        # Rank j merges dims j of every rank's partial; float32 keeps lse exact
        # in the one packed message (the payload is one token: bytes are moot).
        part = torch.cat([o.float().reshape(B, H, M, d // M),
                          lse.reshape(B, H, 1, 1).expand(B, H, M, 1)], dim=3)
        recv = self.comm.all_to_all(part.movedim(2, 0), "slice")  # [M (rank), B, H, d/M + 1]
        o, _ = merge_stack(recv[..., : d // M], recv[..., d // M])  # [B, H, d/M]
        return self.sum_all(self.local.wo(o.to(x.dtype).reshape(B, 1, H * d // M)))


class VocabShardEmbedding(nn.Module):
    """Rows ``start .. start+c`` of the embedding (zero-padded past the vocab);
    ids outside them contribute 0 and the sum over ranks restores every row
    (Megatron's vocab-parallel embedding)."""

    def __init__(self, weight: torch.Tensor, start: int, sum_all: SumOverMesh):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start, self.sum_all = start, sum_all

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        inside = (local >= 0) & (local < self.weight.shape[0])
        x = Fn.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)  # [B, T, D]
        return self.sum_all(x * inside[..., None].to(x.dtype))


def helix_stage(ctx: StageContext) -> Stage:
    """The stage's layers on its N x M ranks (axes ``group`` and ``slice``):
    rank (g, s) holds 1/(N*M) of each layer's weights, and the first and
    last stages the vocabulary rows r*c .. (r+1)*c of the embedding and LM
    head (zero-padded past the vocabulary, so the logits gather in one
    equal-size collective)."""
    spec, topo, comm, loader, wl = ctx.spec, ctx.topo, ctx.comm, ctx.loader, ctx.workload
    N, M = topo.size("group"), topo.size("slice")
    g, s = topo.coord("group"), topo.coord("slice")
    P, r = N * M, g * M + s
    H, d, F = spec.n_heads // N, spec.head_dim, spec.d_ff // P
    kv_heads = held_kv_heads(g, N, spec.kv_heads)  # replicated when N > n_kv_heads
    Hkv = len(kv_heads)
    mode = repartition(spec, N, M)
    sum_all = SumOverMesh(comm, ctx.option("helix", "reduce", "hier"))
    dims = torch.arange(s * d // M, (s + 1) * d // M)
    q_rows = head_rows(torch.arange(g * H, (g + 1) * H), d, dims)
    kv_rows = head_rows(torch.arange(kv_heads.start, kv_heads.stop), d, dims)
    if mode == "heads":  # W_o columns of this rank's heads, all dims
        wo_cols = head_rows(torch.arange(g * H + s * H // M, g * H + (s + 1) * H // M), d)
        attn_cls = HeadSliceAttention
    else:  # W_o columns of the group's heads, this rank's dims
        wo_cols, attn_cls = q_rows, SequenceChunkAttention
    ff = torch.arange(r * F, (r + 1) * F)
    def block(layer: int) -> Block:
        with torch.device("meta"):
            mlp = (MoE(spec.d_model, F, spec.n_experts, spec.top_k, spec.activation)
                   if spec.is_moe else MLP(spec.d_model, F, spec.activation))
            attn = Attention(spec.d_model, H, Hkv, d // M, qkv_bias=spec.qkv_bias)
            blk = Block(attn_cls(attn, spec, topo, comm, sum_all), SumAfter(mlp, sum_all),
                        make_norm(spec), make_norm(spec))
        attn, mlp, p = blk.attn.local, blk.mlp.inner, f"layers.{layer}"
        loader.load_qkv(attn, layer, q_rows, kv_rows)
        set_param(attn.wo, "weight", loader.wo(layer, wo_cols))
        loader.norm(blk.attn_norm, f"{p}.attn_norm")
        loader.norm(blk.mlp_norm, f"{p}.mlp_norm")
        if spec.is_moe:  # every expert, this rank's 1/P of its d_ff
            set_param(mlp.router, "weight", loader.get(f"{p}.moe.router"))
            set_param(mlp, "w_in", loader.moe_in(layer, None, ff))
            set_param(mlp, "w_down", loader.moe_down(layer, None, ff))
        else:
            set_param(mlp.w_in, "weight", loader.mlp_in(layer, ff))
            set_param(mlp.w_down, "weight", loader.mlp_down(layer, ff))
        return blk

    with torch.device("meta"):
        model = Transformer(spec, ctx.layers, first=ctx.first, last=ctx.last, blocks=False)
    model.layers = build_layers(ctx.layers, block)
    if spec.vocab_size is not None:
        c = -(-spec.vocab_size // P)
        rows = torch.arange(r * c, min((r + 1) * c, spec.vocab_size))
        pad = (0, 0, 0, c - len(rows))
        if ctx.first:
            model.embed = VocabShardEmbedding(Fn.pad(loader.get("embed.weight", [rows]), pad),
                                              r * c, sum_all)
        if ctx.last:
            model.lm_head = Linear(spec.d_model, c, bias=False, device="meta")
            if spec.tie_embeddings and ctx.first:  # the same rows: one tensor
                model.lm_head.weight = model.embed.weight
            else:
                set_param(model.lm_head, "weight", Fn.pad(loader.lm_head(rows), pad))
    if ctx.last:
        loader.norm(model.norm, "norm")
    if mode == "heads":
        kv_held, cache_len = Hkv // M, wl.max_len
    else:
        kv_held, cache_len = Hkv, positions_held(M, s, wl.seq_len, wl.max_len)
    caches = [KVCache.allocate(ctx.rows, kv_held, cache_len, d, loader.dtype, loader.device)
              for _ in ctx.layers]
    # A decode step can be captured in a CUDA graph (``pos`` a 0-d device
    # tensor) on the heads path, whose shapes do not depend on the position;
    # the sequence path picks the rank that stores the token on the host.
    graphs = mode == "heads" and dense_moe_ok(spec, max(ctx.largest))
    gather = (functools.partial(gather_vocab, comm, spec.vocab_size)
              if spec.vocab_size is not None else None)
    return Stage(model, caches, graphs, gather=gather, whole=True,
                 info={"repartition": mode, "reduce": sum_all.how})


def gather_vocab(comm, vocab_size: int, local: torch.Tensor) -> torch.Tensor:
    """The logits of every vocabulary shard of the stage, on each of its
    ranks (rank order is group-major: slice, then group)."""
    logits = comm.all_gather(comm.all_gather(local, "slice", -1), "group", -1)
    return logits[..., :vocab_size]


class Helix(HelixPlan, Composed):
    """helix on one rank (its rules: :class:`~.plans.HelixPlan`)."""

    build_stage = staticmethod(helix_stage)

    def __init__(self, spec, workload, plan, topo, comm, loader):
        super().__init__(spec, workload, plan, topo, comm, loader)
        self.model, self.mode = self.stage, self.stage_info["repartition"]
        self.sum_all = SumOverMesh(comm, self.stage_info["reduce"])

    def layer_bytes(self, tokens: int, decode: bool) -> dict[str, int]:
        """Bytes this rank's Comm counts per layer (same keys as the engine's
        ``comm_prefill_rank0``) for a step of ``tokens`` tokens per sequence."""
        spec, topo, e = self.spec, self.topo, dtype_bytes(self.spec.dtype)
        N, M = topo.size("group"), topo.size("slice")
        B, D, d = self.workload.batch, spec.d_model, spec.head_dim
        H, Hkv = spec.n_heads // N, self.group_kv_heads(spec, N)
        out: dict[str, int] = {}

        def add(op: str, axis: str, nbytes: int) -> None:
            if (topo.world_size if axis == "world" else topo.size(axis)) > 1:
                out[f"{op}/{axis}"] = out.get(f"{op}/{axis}", 0) + nbytes

        if self.mode == "heads":
            add("all_to_all", "slice", B * tokens * (H + 2 * Hkv) * d // M * e)
        elif decode:
            add("all_gather", "slice", B * (H + 2 * Hkv) * d * e)
            add("all_to_all", "slice", M * B * H * (d // M + 1) * 4)
        else:
            t0, t1 = balanced_ranges(tokens, M)[topo.coord("slice")]
            add("all_to_all", "slice", B * tokens * H * d // M * e + B * (t1 - t0) * H * d * e)
            add("all_gather", "slice", B * tokens * 2 * Hkv * d * e)
        y = B * tokens * D
        for _ in ("attention", "mlp"):
            if self.sum_all.how == "flat":
                add("all_reduce", "world", y * e)
            else:
                padded = -(-y // M) * M * e
                add("reduce_scatter", "slice", padded)
                add("all_reduce", "group", padded // M)
                add("all_gather", "slice", padded)
        return out

    def report(self) -> dict:
        return {
            "repartition": self.mode,
            "kv_cache_split": "heads" if self.mode == "heads" else "sequence",
            "reduce": self.sum_all.how,
            "head_groups": self.topo.size("group"),
            "dim_slices": self.topo.size("slice"),
            "kv_head_replicas": kv_replicas(self.topo.size("group"), self.spec.kv_heads),
            "comm_bytes_per_layer": {
                "prefill": self.layer_bytes(self.workload.seq_len, decode=False),
                "decode": self.layer_bytes(1, decode=True),
            },
        }


STRATEGY = Helix
