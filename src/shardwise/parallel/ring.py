"""ring: ring attention with sequence parallelism.

Ring attention (Liu, Zaharia & Abbeel 2023, "Ring Attention with Blockwise
Transformers for Near-Infinite Context"): the prompt is split over the P ranks
of the ``seq`` axis, every rank holds all the weights, and norms, QKV, the
output projection and the MLP run on the rank's own tokens with no
communication. Only attention mixes tokens: each rank's K/V block travels
round the ring (P-1 point-to-point hops per layer, the next hop posted before
the attention on the block in hand, so the transfer hides behind it) and the
partial results merge exactly by log-sum-exp (:mod:`.lse`).

Causal balance comes from the zig-zag layout (Zhu's ring-flash-attention;
the load-balanced context parallelism of Llama 3, Dubey et al. 2024; Brandon
et al. 2023, "Striped Attention", show why a contiguous split is not
balanced under the causal mask): the prompt, cut into
2P chunks whose sizes differ by at most one, gives rank r chunks r and
2P-1-r, so every rank owns one early and one late chunk and computes the same
number of (query, key) pairs (to within a chunk's rounding). At ring step s a
rank holds the block of rank ``src = r - s``: with ``src < r`` all its queries
see the early chunk of that block in full, with ``src > r`` only its late
chunk sees the block, in full; only step 0 (its own block) needs the causal
mask. A prompt that 2P does not divide is not padded in the hidden states:
ranks simply hold a token more or less (none at all when the prompt is
shorter than P). Only the K/V block that travels has a fixed size; its rows
past a rank's tokens are zero, and no block reads them.

Decode: the KV cache stays sharded by sequence (each rank keeps the K/V of its
prompt tokens; each new token's K/V goes to the rank holding the fewest).
Every rank computes the new token's q/k/v, attends it to its shard, and one
all-gather of the small ``(o, lse)`` pairs lets every rank merge the same
result, so the replicated rest of the layer stays identical on all ranks.

:func:`ring_stage` builds a stage's layers on the ``seq`` ranks of a larger
mesh (:mod:`.compose`): inside a pipeline stage (``pp:2/ring:2``), and with
tensor parallelism (``ring:2/tp:2``: the sequence over ``seq``, the heads
and d_ff over ``tp``, each ring of ranks with the same tp coordinate passing
its heads' K/V blocks); ``ring:P`` is that stage over the whole world.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import nn

from ..model.once import made_once
from ..model.reference import Attention, KVCache, per_step
from ..spec import ModelSpec
from .base import alike_steps, dense_moe_ok
from .checks import balanced_ranges
from .compose import Composed, Stage, StageContext
from .plans import RingPlan
from .lse import attend_lse, attend_lse_prefix, merge_into, merge_stack


@dataclass(frozen=True)
class ZigZag:
    """Where every position lives (pure arithmetic, identical on all ranks).

    The ``prompt`` is cut into ``2 * ranks`` contiguous chunks whose sizes
    differ by at most one (empty ones at the end when the prompt is shorter
    than ``2 * ranks``); rank r holds chunks r and 2P-1-r, in that order, as
    its local rows. ``decode_steps`` new tokens follow the prompt."""

    ranks: int
    prompt: int
    decode_steps: int

    @cached_property
    def bounds(self) -> list[tuple[int, int]]:
        return balanced_ranges(self.prompt, 2 * self.ranks)

    def chunks(self, r: int) -> tuple[int, int]:
        return r, 2 * self.ranks - 1 - r

    def sizes(self, r: int) -> tuple[int, int]:
        return tuple(self.bounds[j][1] - self.bounds[j][0] for j in self.chunks(r))

    def real(self, r: int) -> int:
        """Rank r's prompt tokens."""
        return sum(self.sizes(r))

    @property
    def block_rows(self) -> int:
        """Rows of the K/V block that travels: the same on every rank (a ring hop
        needs fixed-size buffers); a rank with fewer tokens leaves the rest unread."""
        return max(self.real(r) for r in range(self.ranks))

    def positions(self, r: int) -> list[int]:
        """Absolute positions of rank r's prompt tokens, in local order."""
        return [p for j in self.chunks(r) for p in range(*self.bounds[j])]

    def blocks(self, r: int) -> list[tuple[int, int, int, int, int, bool]]:
        """Rank r's prefill attention, one entry per ring step that has work:
        ``(step, q0, q1, k0, k1, causal)`` = local query rows ``q0:q1`` against
        rows ``k0:k1`` of the block held at that step."""
        out = []
        for s in range(self.ranks):
            src = (r - s) % self.ranks
            if s == 0:  # own block: the only one that straddles the diagonal
                rows = (0, self.real(r), 0, self.real(r), True)
            elif src < r:  # every query is later than src's early chunk, earlier than its late one
                rows = (0, self.real(r), 0, self.sizes(src)[0], False)
            else:  # only r's late chunk is later than both of src's chunks
                rows = (self.sizes(r)[0], self.real(r), 0, self.real(src), False)
            if rows[1] > rows[0] and rows[3] > rows[2]:
                out.append((s, *rows))
        return out

    def pairs(self, r: int) -> int:
        """(query, key) pairs rank r scores in prefill (= those the causal mask allows)."""
        total = 0
        for _, q0, q1, k0, k1, causal in self.blocks(r):
            n = q1 - q0
            total += n * (n + 1) // 2 if causal else n * (k1 - k0)
        return total

    @cached_property
    def decode_owners(self) -> tuple[int, ...]:
        """Rank that stores the K/V of position ``prompt + t``: the one holding the
        fewest tokens so far (lowest rank on ties)."""
        held, owners = [self.real(r) for r in range(self.ranks)], []
        for _ in range(self.decode_steps):
            r = min(range(self.ranks), key=lambda i: (held[i], i))
            held[r] += 1
            owners.append(r)
        return tuple(owners)

    def kv_len(self, r: int, pos: int) -> int:
        """Tokens rank r has cached before position ``pos`` (pos >= prompt)."""
        return self.real(r) + self.decode_owners[: pos - self.prompt].count(r)

    def where(self, pos: int) -> tuple[int, int]:
        """(rank, cache slot) holding position ``pos``."""
        if pos >= self.prompt:
            r = self.decode_owners[pos - self.prompt]
            return r, self.kv_len(r, pos)
        j = bisect_right([start for start, _ in self.bounds], pos) - 1
        start = self.bounds[j][0]
        if j < self.ranks:
            return j, pos - start
        r = 2 * self.ranks - 1 - j
        return r, self.sizes(r)[0] + pos - start


def static_decode_ok(layout: ZigZag, spec: ModelSpec, batch: int) -> bool:
    """Whether ring's decode steps have the static form a CUDA graph captures:
    decode steps to take, and an MoE model's dense path. A rank that holds
    no prompt token attends an empty shard until its first decoded token:
    its lse is -inf there, an empty block to the merge."""
    return layout.decode_steps > 0 and dense_moe_ok(spec, batch)


class RingAttention(nn.Module):
    """The reference :class:`Attention` with a sequence-sharded core; same
    signature. ``x`` is this rank's prompt tokens ``[B, n, D]`` in local
    (zig-zag) order when ``pos == 0``, or the new token ``[B, 1, D]`` (decode)."""

    def __init__(self, attn: Attention, layout: ZigZag, comm, topo):
        super().__init__()
        self.attn, self.layout, self.comm = attn, layout, comm
        self.P, self.r = topo.size("seq"), topo.coord("seq")
        self.next, self.prev = (topo.rank_of(seq=(self.r + i) % self.P) for i in (1, -1))
        self.steps = {s: rows for s, *rows in layout.blocks(self.r)}
        self._tables = None  # decode_static's (slot, held) per decode step, on the device

    def forward(self, x: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
        if isinstance(pos, torch.Tensor):
            o = self.decode_static(x, cache, pos)
        else:
            o = self.prefill(x, cache) if pos == 0 else self.decode(x, cache, pos)
        return self.attn.wo(o)

    def prefill(self, x: torch.Tensor, cache: KVCache) -> torch.Tensor:
        B, n, _ = x.shape
        H, Hkv, d = self.attn.n_heads, self.attn.n_kv_heads, self.attn.head_dim
        early = self.layout.sizes(self.r)[0]
        # Rotary needs each token's absolute position: one qkv per zig-zag chunk.
        starts = [self.layout.bounds[j][0] for j in self.layout.chunks(self.r)]
        parts = [self.attn.qkv(x[:, :early], starts[0]), self.attn.qkv(x[:, early:], starts[1])]
        q, k, v = (torch.cat(t, dim=1).transpose(1, 2) for t in zip(*parts))  # [B, H or Hkv, n, d]
        cache.write(0, k, v)
        held = k.new_empty(2, B, Hkv, self.layout.block_rows, d)  # what travels round the ring
        held[0, :, :, :n], held[1, :, :, :n] = k, v
        held[:, :, :, n:].zero_()  # never read (blocks stop at each rank's tokens); zeroed all the same

        o = torch.zeros(B, H, n, d, dtype=torch.float32, device=x.device)
        lse = torch.full((B, H, n), float("-inf"), device=x.device)
        bufs = [held, torch.empty_like(held)]  # the block in hand, the one arriving

        def hop(s: int) -> None:
            held, spare = bufs
            pending = []
            if s < self.P - 1:  # post the next hop before computing on the block in hand
                pending = self.comm.exchange([(held, self.next)], [(spare, self.prev)], "seq")
            if s in self.steps:
                q0, q1, k0, k1, causal = self.steps[s]
                o_b, lse_b = attend_lse(q[:, :, q0:q1], held[0, :, :, k0:k1],
                                        held[1, :, :, k0:k1], causal=causal)
                merge_into(o[:, :, q0:q1], lse[:, :, q0:q1], o_b, lse_b)
            for req in pending:
                req.wait()
            bufs.reverse()  # the block just sent is free to receive into

        # Hops with one block shape do the same work: rank r takes its
        # diagonal, then r hops of both its chunks against the sender's
        # first, then the rest with its second chunk against the sender's two.
        alike_steps([(self.steps.get(s), s < self.P - 1) for s in range(self.P)], hop)
        return o.to(x.dtype).transpose(1, 2).reshape(B, n, H * d)

    def decode(self, x: torch.Tensor, cache: KVCache, pos: int) -> torch.Tensor:
        B, T, _ = x.shape
        if T != 1 or pos < self.layout.prompt:
            raise ValueError(f"ring decodes one token past the prompt (got {T} at position {pos})")
        H, d = self.attn.n_heads, self.attn.head_dim
        q, k, v = (t.transpose(1, 2) for t in self.attn.qkv(x, pos))  # [B, H or Hkv, 1, d]
        n = self.layout.kv_len(self.r, pos)
        if self.layout.where(pos)[0] == self.r:
            keys, values = cache.write(n, k, v)  # [B, Hkv, n+1, d]
        else:
            keys, values = cache.k[:, :, :n], cache.v[:, :, :n]
        if keys.shape[2]:
            o, lse = attend_lse(q, keys, values)  # every cached position precedes pos
        else:  # an empty shard (prompt shorter than P, no new token here yet) adds nothing
            o, lse = q.new_zeros(B, H, 1, d), torch.full((B, H, 1), float("-inf"), device=x.device)
        return self._merge(o, lse)

    def decode_static(self, x: torch.Tensor, cache: KVCache, pos: torch.Tensor) -> torch.Tensor:
        """:meth:`decode` at a device-tensor position, with shapes that do not
        depend on it (a CUDA graph captures it once). The slot the new
        token's K/V go to on this rank, and how many positions the rank then
        holds, are looked up on the device in tables of the layout: the owner
        writes its next slot, every other rank its spare slot past its
        capacity, and attention covers the whole shard with the positions
        not held masked (:func:`attend_lse_prefix`; none held yet on a rank
        without prompt tokens: an empty block)."""
        q, k, v = self.attn.project(x)  # [B, 1, H or Hkv, d]
        at, n = per_step(pos, ("ring-slot", self.r), lambda: self._slot(pos))
        # The whole shard, spare slot included (with a rotary embedding: q
        # rotated and k, v stored in one kernel).
        if self.attn.rope is not None:
            keys, values = cache.write_rotated(self.attn.rope, pos, q, k, v, slot=at,
                                               length=self.layout.prompt + self.layout.decode_steps)
        else:
            keys, values = cache.write(at, k.transpose(1, 2), v.transpose(1, 2))
        return self._merge(*attend_lse_prefix(q.transpose(1, 2), keys, values, n,
                                              may_be_empty=self.layout.real(self.r) == 0))

    def _slot(self, pos: torch.Tensor):
        """(slot written, a 0-d device tensor; positions held after the write,
        one element) for position ``pos``."""
        if self._tables is None or self._tables.device != pos.device:
            zz, r = self.layout, self.r
            spare = zz.kv_len(r, zz.prompt + zz.decode_steps)
            rows = []
            for t, owner in enumerate(zz.decode_owners):
                held = zz.kv_len(r, zz.prompt + t)
                rows.append((held, held + 1) if owner == r else (spare, held))
            with made_once():
                self._tables = torch.tensor(rows, dtype=torch.long, device=pos.device)  # [steps, 2]
        row = self._tables.index_select(0, (pos - self.layout.prompt).reshape(1))[0]
        return row[0], row[1:]

    def _merge(self, o: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """This rank's ``(o [B, H, 1, d], lse [B, H, 1])`` over its shard, merged
        with every other rank's into the step's attention output ``[B, 1, H*d]``."""
        B, H, _, d = o.shape
        # One collective: o in its own dtype (the kernels round it to that already),
        # the float32 lse riding along bit for bit as 4 / itemsize extra columns.
        width = d + 4 // o.element_size()
        part = torch.cat([o, lse[..., None].view(o.dtype)], dim=-1)  # [B, H, 1, width]
        parts = self.comm.all_gather(part, "seq", dim=0).view(self.P, B, H, 1, width)
        cols = parts[..., d:]
        # The lse is read in place where its columns start 4-byte aligned, in
        # every row of the (contiguous) gathered buffer: d x itemsize a
        # multiple of 4 (the row width then is too).
        if (d * o.element_size()) % 4:
            cols = cols.contiguous()
        lse_all = cols.view(torch.float32)[..., 0]  # [P, B, H, 1]
        o, _ = merge_stack(parts[..., :d], lse_all)  # [B, H, 1, d]
        return o.transpose(1, 2).reshape(B, 1, H * d)


def ring_stage(ctx: StageContext) -> Stage:
    """The stage's layers on this rank's sequence shard (and, with a tp
    axis, its heads): :func:`~.tp_pp.tp_stage` with the attention core
    passed round the ring. One spare cache slot past the rank's positions:
    where a static-shape decode step writes the new token's K/V on the
    ranks that do not keep it."""
    from .tp_pp import tp_stage

    zz, topo = ctx.zigzag, ctx.topo
    stage = tp_stage(ctx, attention=lambda attn: RingAttention(attn, zz, ctx.comm, topo),
                     cache_len=zz.kv_len(topo.coord("seq"), ctx.workload.max_len) + 1)
    # Decode steps at a device-tensor position (RingAttention.decode_static)
    # where an MoE model takes its dense path; see static_decode_ok.
    stage.graphs = static_decode_ok(zz, ctx.spec, max(ctx.largest))
    return stage


class Ring(RingPlan, Composed):
    """ring on one rank (its rules: :class:`~.plans.RingPlan`)."""

    build_stage = staticmethod(ring_stage)
    sequence_layout = ZigZag

    @property
    def layout(self) -> ZigZag:
        return self.zigzag

    def report(self) -> dict:
        zz, P = self.layout, self.layout.ranks
        pairs = [zz.pairs(r) for r in range(P)]
        return {
            "chunk_tokens": [b - a for a, b in zz.bounds],
            "ring_block_rows": zz.block_rows,
            "attn_pairs_per_rank": pairs,
            "attn_pairs_max_over_mean": max(pairs) * P / max(sum(pairs), 1),
            "ring_blocks_computed_per_rank": [len(zz.blocks(r)) for r in range(P)],
            "kv_tokens_prompt_per_rank": [zz.real(r) for r in range(P)],
            "kv_tokens_per_rank": [zz.kv_len(r, self.workload.max_len) for r in range(P)],
        }


STRATEGY = Ring
