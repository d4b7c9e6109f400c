"""ep: expert parallelism for Mixture-of-Experts models.

GShard (Lepikhin et al. 2020) and the Switch Transformer (Fedus et al. 2021)
spread the E experts of every MoE layer over P ranks (E/P each) and move
tokens to their experts and back with two all-to-alls: *dispatch* before the
experts, *combine* after. Where those papers cap each expert's tokens with a
capacity factor and drop the overflow, this strategy drops nothing, as in
DeepSpeed-MoE (Rajbhandari et al. 2022) and MegaBlocks (Gale et al. 2023):
the ranks first exchange how many tokens each sends to each expert, so the
all-to-alls carry exactly the routed tokens (variable splits), and each local
expert runs one matrix product over its contiguous block of rows (a grouped
GEMM) instead of a padded, fixed-capacity batch.

Everything but the experts is data-parallel: each rank holds the attention
weights, the norms, the router (E x D, tiny) and, when the model has a
vocabulary, the embedding and LM head (replicated), and it runs its own
contiguous share of the batch; its KV cache holds only those sequences.
A rank left without sequences (batch < P) still serves its experts.

Invariant: a token's MoE output is ``sum_j w_j * expert_{e_j}(x)`` over its
top-k experts ``e_j``; the rank that owns ``e_j`` applies it to exactly the
``x`` the reference sees, and the token's own rank applies the router weight
and sums. Only the order of additions differs from the reference.

Overlap: a layer's tokens are cut into ``chunks`` (``ep:P,chunks=K``); the
dispatch of chunk i+1 and the combine of chunk i are in flight while the
experts run on chunk i. Mesh axis ``("ep",)``.

Decode steps of at most ``DENSE_MOE_MAX_TOKENS`` tokens over all ranks take
a static form instead: every rank gathers every rank's tokens (padded to
the largest share), runs each of its experts on all of them weighted by the
routing (zero where a token did not pick it: the reference MoE's dense
path), and a reduce-scatter returns each rank its own rows, summed over the
ranks. No host synchronisation, sizes fixed by the batch, so a decode step
is captured in a CUDA graph. A token's terms are its picked experts' weighted
outputs, as before; the ranks' partial sums are added in rank order.

:func:`ep_stage` builds a stage's layers on the ``ep`` ranks of a larger
mesh (:mod:`.compose`): in a pipeline stage (``pp:2/ep:4``), with
data-parallel replicas (``dp:2/ep:4``), and with tensor-parallel attention
(``ep:4/tp:2``: the ep ranks split the batch and the experts, the tp ranks
of one ep rank share its sequences, split the heads and each of its experts'
d_ff, and add their partial outputs with one all-reduce over tp after the
attention and after the MoE, as Megatron-LM does with expert tensor
parallelism). ``ep:P`` is that stage over the whole world.
"""
from __future__ import annotations

import torch
from torch import nn

from ..model.kernels import combine_picks, sort_picks
from ..model.reference import DENSE_MOE_MAX_TOKENS, MoE, grouped_expert_mlp, route_tokens
from .checks import balanced_ranges, chunks_option
from .compose import Composed, Stage, StageContext
from .plans import EpPlan

# A chunk smaller than this is all latency: splitting it to overlap the
# exchange costs more kernel launches and collectives than it hides.
MIN_CHUNK_TOKENS = 32


class SkipEmptyBatch(nn.Module):
    """Attention of a rank that holds no sequences: nothing to attend to, and
    some fused attention kernels refuse an empty batch."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor, cache, pos: int) -> torch.Tensor:
        return x if x.shape[0] == 0 else self.inner(x, cache, pos)


class ExpertParallelMoE(nn.Module):
    """Drop-in for the reference :class:`MoE` (same call, ``x [b, T, D]`` of
    this rank's sequences) whose experts live on the ranks of axis ``ep``.

    ``moe`` holds the router over all experts and this rank's experts
    ``first .. first + El``; rank q of the axis owns experts ``q*El .. (q+1)*El``,
    so sorting a token's assignments by expert also sorts them by destination.
    """

    def __init__(self, moe: MoE, comm):
        super().__init__()
        self.moe, self.comm = moe, comm
        self.E = moe.router.weight.shape[0]  # the router scores every expert
        self.k, self.activation = moe.top_k, moe.activation
        self.P, self.rank = comm.topo.size("ep"), comm.topo.coord("ep")
        self.El = self.E // self.P  # experts per rank
        self.first = self.rank * self.El
        # Set by the strategy before each step, identical on every rank, so
        # every rank issues the same sequence of collectives: the chunks, and
        # the rows of the largest share when the step takes the static form.
        self.chunks = 1
        self.static_rows: int | None = None
        # Host [P, K, E] routing tables of the calls since the stage last
        # cleared it (a prefill's micro-batches), kept while ``record`` is on.
        self.routed: list[torch.Tensor] = []
        self.record = False
        self.last_counts: torch.Tensor | None = None  # host [P, K, E] of the last call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        if self.static_rows is not None:
            return self._static(x).view(shape)
        k, E, El, P, K = self.k, self.E, self.El, self.P, self.chunks
        weights, experts = route_tokens(self.moe.router, x, k)  # [N, k]
        chunks = balanced_ranges(x.shape[0], K)

        # Per chunk, its (token, pick) slots sorted by expert
        # (:func:`~shardwise.model.kernels.sort_picks`: a counting sort on
        # GPUs): [E] where each expert's rows end, [n*k] each sorted row's
        # token and each slot's row; and how many go to each expert.
        picks = [sort_picks(experts[s:e], E) for s, e in chunks]
        counts = [ends.diff(prepend=ends.new_zeros(1)).long() for ends, _, _ in picks]  # [E]
        # Every rank learns the whole routing table (P*K*E integers): its own
        # receive sizes and the load of every expert for the report. The one
        # host synchronisation of the layer: the splits size the buffers.
        table = self.comm.all_gather(torch.stack(counts)[None], "ep", dim=0)  # [P, K, E]
        host = self.last_counts = table.cpu()
        if self.record:
            self.routed.append(host)
        to_rank = host[self.rank].view(K, P, El).sum(-1).tolist()  # [K][P] rows sent
        mine = host[:, :, self.first : self.first + El]  # [P, K, El] rows for my experts
        from_rank = mine.sum(-1).t().tolist()  # [K][P] rows received
        expert_rows = mine.sum(0).tolist()  # [K][El]

        def dispatch(c: int):
            s, e = chunks[c]
            send = x[s:e].index_select(0, picks[c][1])  # [n*k, D] by expert, hence by rank
            return self.comm.all_to_all_start(send, "ep", to_rank[c], from_rank[c])

        def run_experts(c: int, recv: torch.Tensor):
            # recv [R, D] arrives grouped by source rank, then by expert;
            # the grouped GEMM wants it grouped by expert.
            if P > 1 and El > 1:
                sizes = table[:, c, self.first : self.first + El].reshape(-1)  # [P*El]
                expert_of_row = torch.repeat_interleave(
                    torch.arange(El, device=x.device).repeat(P), sizes,
                    output_size=recv.shape[0])
                perm = torch.argsort(expert_of_row, stable=True)
                y = torch.empty_like(recv)
                y[perm] = grouped_expert_mlp(recv[perm], expert_rows[c], self.moe.w_in,
                                             self.moe.w_down, self.activation)
            else:  # one source or one expert: already grouped by expert
                y = grouped_expert_mlp(recv, expert_rows[c], self.moe.w_in,
                                       self.moe.w_down, self.activation)
            return self.comm.all_to_all_start(y, "ep", from_rank[c], to_rank[c])

        out = torch.empty_like(x)
        inbound, returning = dispatch(0), []
        for c in range(K):
            following = dispatch(c + 1) if c + 1 < K else None  # in flight during chunk c
            returning.append(run_experts(c, inbound()))
            inbound = following
        for c, wait in enumerate(returning):
            s, e = chunks[c]
            back = wait()  # [n*k, D] in expert order
            combine_picks(back, weights[s:e], picks[c][2], out=out[s:e])
        return out.view(shape)

    def _static(self, x: torch.Tensor) -> torch.Tensor:
        """The static form (module doc): ``x [N, D]``, N <= ``static_rows``."""
        n, rows = x.shape[0], self.static_rows
        padded = x if n == rows else torch.cat([x, x.new_zeros(rows - n, x.shape[1])])
        every = self.comm.all_gather(padded, "ep")  # [P * rows, D], rank-major
        weights, experts = route_tokens(self.moe.router, every, self.k)
        partial = self.moe.static(every, weights, experts)  # this rank's experts' share
        return self.comm.reduce_scatter(partial, "ep")[:n]  # [n, D]


def chunk_count(plan_chunks: int | None, tokens: int) -> int:
    """Chunks for a call whose busiest rank holds ``tokens`` tokens: the
    plan's, else 2 when each chunk keeps MIN_CHUNK_TOKENS; never more
    chunks than tokens."""
    if plan_chunks is not None:
        return max(1, min(plan_chunks, tokens))
    return 2 if tokens >= 2 * MIN_CHUNK_TOKENS else 1


def static_rows(most: int, ranks: int, tokens_per_seq: int) -> int | None:
    """Rows of the largest share when a call of ``tokens_per_seq`` tokens a
    sequence takes the static form (decode steps only: a prefill keeps the
    routed exchange and its routing table, which the report reads), else
    None; ``most`` sequences on the busiest of ``ranks`` ranks."""
    small = tokens_per_seq == 1 and most * ranks <= DENSE_MOE_MAX_TOKENS
    return most if small else None


def ep_stage(ctx: StageContext) -> Stage:
    """The stage's layers with this rank's experts (E/P of each layer's) and
    every other weight of its tp slice (all of them with no tp axis): the
    attention runs this rank's sequences, the experts every rank's tokens
    routed to them."""
    from .tp_pp import tp_stage

    topo, spec = ctx.topo, ctx.spec
    P, rank = topo.size("ep"), topo.coord("ep")
    El = spec.n_experts // P
    plan_chunks = chunks_option(ctx.comp.part("ep").options, ctx.comp.text)
    moes: list[ExpertParallelMoE] = []

    def expert_parallel(moe):
        moes.append(ExpertParallelMoE(moe, ctx.comm))
        return moes[-1]

    # A micro-batch may hold no sequence here (a smaller share than another
    # rank's) while its experts still serve the others.
    empty = any(b0 == b1 for b0, b1 in ctx.micro)
    stage = tp_stage(ctx, attention=SkipEmptyBatch if empty else None, mlp=expert_parallel,
                     experts=range(rank * El, (rank + 1) * El))
    prefill_chunks = [0]

    def before(i: int, tokens: int, pos) -> None:
        # Identical on every rank: the chunks, and the rows of the largest
        # share when the call takes the static form.
        prefill = isinstance(pos, int) and pos == 0  # routed: the report reads its table
        chunks = chunk_count(plan_chunks, ctx.largest[i] * tokens)
        static = None if prefill else static_rows(ctx.largest[i], P, tokens)
        for moe in moes:
            moe.chunks, moe.static_rows, moe.record = chunks, static, prefill
            if prefill and i == 0:
                moe.routed = []
        if prefill and i == 0:
            prefill_chunks[0] = chunks

    stage.before, stage.whole = before, True
    # Decode steps take the static form (every rank's tokens together
    # within DENSE_MOE_MAX_TOKENS), which a CUDA graph captures.
    stage.graphs = all(static_rows(n, P, 1) is not None for n in ctx.largest)
    stage.report = lambda: routing_report(moes, prefill_chunks[0], spec.d_model, ctx.loader.dtype)
    return stage


def routing_report(moes: list[ExpertParallelMoE], chunks: int, d_model: int, dtype) -> dict:
    """Load balance and link traffic of the last prefill, from the routing
    table every rank holds (identical on every rank of the ep axis): one
    entry per layer of the stage."""
    if not moes or not moes[0].routed:
        return {}
    P, El = moes[0].P, moes[0].El
    tables = torch.stack([sum(t.sum(1) for t in moe.routed) for moe in moes])  # [L, P src, E]
    per_expert = tables.sum(1)  # [L, E]
    per_rank = per_expert.view(-1, P, El).sum(2)  # [L, P] rows each rank computed
    # Rows src sends to dst for every layer; the diagonal never leaves the rank.
    flows = tables.view(-1, P, P, El).sum((0, 3))  # [P src, P dst]
    off_rank = flows - torch.diag(torch.diag(flows))
    row_bytes = d_model * torch.empty((), dtype=dtype).element_size()
    # Dispatch sends a rank's rows out; combine sends the rows it computed back.
    link_bytes = (off_rank.sum(1) + off_rank.sum(0)) * row_bytes

    def max_over_mean(load: torch.Tensor) -> float:
        # Each layer waits for its busiest expert (rank): the time spent
        # over that of a perfect balance, summed over layers.
        busiest, mean = load.max(1).values.sum(), load.float().mean(1).sum()
        return float(busiest / mean) if mean else 0.0

    return {
        "chunks_prefill": chunks,
        "experts_per_rank": El,
        "tokens_per_expert": per_expert.tolist(),  # [layer][expert] routed (token, slot)s
        "tokens_per_rank": per_rank.tolist(),  # [layer][rank]
        "expert_load_max_over_mean": max_over_mean(per_expert),
        "rank_load_max_over_mean": max_over_mean(per_rank),
        "a2a_bytes_prefill_per_rank": link_bytes.tolist(),  # off-rank, dispatch + combine
    }


class ExpertParallel(EpPlan, Composed):
    """ep on one rank (its rules: :class:`~.plans.EpPlan`)."""

    build_stage = staticmethod(ep_stage)

    def report(self) -> dict:
        return self.stage_report()


STRATEGY = ExpertParallel
