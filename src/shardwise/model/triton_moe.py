"""The Triton kernels of :func:`shardwise.model.kernels.expert_rows`,
:func:`shardwise.model.kernels.combine_picks` and
:func:`shardwise.model.kernels.route_rows` (imported only where Triton is
installed)."""
import triton
import triton.language as tl

from .triton_pdl import await_inputs, prefetch_l2


@triton.jit
def expert_rows_kernel(X, W, E, Y, O, held, first, sx, swe, swo, sy, I: tl.constexpr,
                       PER: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
                       DOT: tl.constexpr = False, STEP_SUM: tl.constexpr = False,
                       DENSE: tl.constexpr = False, SWIGLU: tl.constexpr = False,
                       PDL: tl.constexpr = False, PREFETCH: tl.constexpr = 0):
    """Program (routed row r, output block): ``y[r] = W[E[r] - first] @ x[r // PER]``
    for ``W [held, O, I]`` (rows contiguous in I), accumulated in float32 and
    rounded once, as a GEMM rounds it. A row whose expert this rank does not
    hold reads no weight and writes zeros: only the routed experts' weights
    cross the memory bus (the decode step's floor). ``I`` is a compile-time
    constant: one compilation per matrix width of the model (two), a loop of
    known length. ``DENSE``: one matrix for every row (``E`` unread), the
    GEMV of :func:`shardwise.model.kernels.linear`. ``SWIGLU``: ``x`` is
    ``silu(gate) * up`` of a row ``[gate | up]`` of ``2 I`` (the SwiGLU
    up-projection's output), computed as it is loaded with the arithmetic of
    ``swiglu_kernel`` (the same values): the down-projection without the
    activation's own launch (the FMA loop only, not ``DOT``'s). ``PREFETCH``
    (``DENSE``, with ``PDL``): before the wait for the kernel before it, the
    program asks L2 for its rows' first ``PREFETCH`` steps of the matrix
    (:func:`.triton_pdl.prefetch_l2`; a routed expert is known only after
    the wait)."""
    r = tl.program_id(0).to(tl.int64)
    outs = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    keep_o = outs < O
    if DENSE and PDL and PREFETCH > 0:  # one address per 128-byte line
        LINE: tl.constexpr = 1024 // W.dtype.element_ty.primitive_bitwidth
        lines = tl.arange(0, PREFETCH * BLOCK_I // LINE) * LINE
        prefetch_l2(W + outs[:, None] * swo + lines[None, :],
                    keep_o[:, None] & (lines[None, :] < I), W)
    await_inputs(PDL)
    if DENSE:
        e = r * 0
        mine = r >= 0
    else:
        e = tl.load(E + r).to(tl.int64) - first
        mine = (e >= 0) & (e < held)
        e = tl.where(mine, e, 0)
    if DOT:
        # The product on the tensor cores, x as row 0 of a 16-row tile (the
        # rest zeros): Triton pipelines the weight loads that feed a dot over
        # ``num_stages`` buffers, keeping more of the stream in flight.
        pad = tl.arange(0, 16)
        acc2 = tl.zeros([16, BLOCK_O], dtype=tl.float32)
        for block in range(0, tl.cdiv(I, BLOCK_I)):
            ins = block * BLOCK_I + tl.arange(0, BLOCK_I)
            keep_i = ins < I
            x = tl.load(X + (r // PER) * sx + pad[:, None] * 0 + ins[None, :],
                        mask=(pad[:, None] == 0) & keep_i[None, :], other=0.0)
            w = tl.load(W + e * swe + outs[:, None] * swo + ins[None, :],
                        mask=keep_o[:, None] & keep_i[None, :] & mine, other=0.0)
            acc2 += tl.dot(x.to(w.dtype), tl.trans(w))
        acc = tl.sum(acc2, axis=0)
    else:
        # Each thread keeps its own float32 partial sums across the steps
        # (a multiply-add a step), reduced across the block once at the end:
        # the loop is loads and FMAs only, so more of the stream is in flight.
        # STEP_SUM: each step's products summed across the block at once (a
        # reduction over the threads every step).
        acc = tl.zeros([BLOCK_O], dtype=tl.float32)
        acc2 = tl.zeros([BLOCK_O, BLOCK_I], dtype=tl.float32)
        for block in range(0, tl.cdiv(I, BLOCK_I)):
            ins = block * BLOCK_I + tl.arange(0, BLOCK_I)
            keep_i = ins < I
            if SWIGLU:
                gate = tl.load(X + (r // PER) * sx + ins, mask=keep_i, other=0.0)
                up = tl.load(X + (r // PER) * sx + I + ins, mask=keep_i, other=0.0)
                g = gate.to(tl.float32)
                act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
                x = (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype).to(tl.float32)
            else:
                x = tl.load(X + (r // PER) * sx + ins, mask=keep_i, other=0.0).to(tl.float32)
            w = tl.load(W + e * swe + outs[:, None] * swo + ins[None, :],
                        mask=keep_o[:, None] & keep_i[None, :] & mine, other=0.0)
            if STEP_SUM:
                acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
            else:
                acc2 += w.to(tl.float32) * x[None, :]
        if not STEP_SUM:
            acc = tl.sum(acc2, axis=1)
    tl.store(Y + r * sy + outs, acc.to(Y.dtype.element_ty), mask=keep_o)


@triton.jit
def combine_kernel(Y, W, POS, OUT, D, sy, so, K: tl.constexpr, HAS_POS: tl.constexpr,
                   BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """Program (token t, column block): ``out[t] = sum_j round(y[p] * w[t, j])``
    over the token's ``K`` picks, ``p = POS[t*K + j]`` (``t*K + j`` without
    ``POS``; a negative ``p``: a pick this rank does not hold, adding zero).
    Each weighted term is rounded to the activation dtype and the terms are
    summed in float32 and rounded once: the arithmetic of PyTorch's weighting
    (a bf16 product) and sum over the picks, in one pass that reads each
    expert output row once and writes each token's row once."""
    await_inputs(PDL)
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = cols < D
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(K):
        if HAS_POS:
            p = tl.load(POS + t * K + j).to(tl.int64)
        else:
            p = t * K + j
        w = tl.load(W + t * K + j).to(OUT.dtype.element_ty).to(tl.float32)
        y = tl.load(Y + tl.maximum(p, 0) * sy + cols, mask=keep & (p >= 0), other=0.0)
        acc += (y.to(tl.float32) * w).to(OUT.dtype.element_ty).to(tl.float32)
    tl.store(OUT + t * so + cols, acc.to(OUT.dtype.element_ty), mask=keep)


@triton.jit
def route_logits_kernel(X, R, P, D, E, sx, sr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
                        PDL: tl.constexpr = False):
    """Program (token t, split s): the partial logits of the router of a
    decode step over one chunk of ``BLOCK_D`` columns, ``P[t, s, e] = R[e,
    chunk] . X[t, chunk]`` for the ``E`` experts (rows of ``R [E, D]``), the
    exact products summed in float32 in one pass over the chunk, into ``P
    [N, splits, E]`` (``splits = cdiv(D, BLOCK_D)``, the last chunk ragged:
    masked). The grid spreads the weights' read over ``N x splits``
    programs: one program per token walking all of ``D`` took 8.7 us in a
    CUDA graph (17.2 in a profiled step) for Mixtral's 8 x 4096 router (one
    token, an H100), latency-bound on 64 KB."""
    await_inputs(PDL)
    t = tl.program_id(0).to(tl.int64)
    s = tl.program_id(1).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    keep_e = e < E
    d = s * BLOCK_D + tl.arange(0, BLOCK_D)
    keep_d = d < D
    x = tl.load(X + t * sx + d, mask=keep_d, other=0.0).to(tl.float32)
    r = tl.load(R + e[:, None] * sr + d[None, :], mask=keep_e[:, None] & keep_d[None, :],
                other=0.0)
    part = tl.sum(r.to(tl.float32) * x[None, :], axis=1)
    tl.store(P + (t * tl.num_programs(1) + s) * E + e, part, mask=keep_e)


@triton.jit
def route_kernel(P, WT, EX, S, E, K: tl.constexpr, BLOCK_S: tl.constexpr,
                 BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    """Program (token t): the softmax top-``K`` router of a decode step from
    :func:`route_logits_kernel`'s partials ``P [N, S, E]`` (float32).
    ``logits[e]`` is the sum of ``P[t, :, e]`` over the ``S`` splits, in a
    fixed order (``BLOCK_S`` splits at a time, added lane by lane, then
    summed across the lanes): the exact products of ``R[e] . X[t]`` summed
    in float32 (as the router's GEMM with a float32 output sums them, in
    another order). The ``K`` largest are picked one at a time, the lowest
    index first among equals; their softmax in float32 (``reference.route``:
    the softmax over the chosen logits). Writes ``WT [N, K]`` (float32) and
    ``EX [N, K]`` (int64), largest first as ``torch.topk`` orders them.
    PyTorch runs this and the partials' kernel as five kernels (the GEMM and
    its split-K reduction, top-k's sort and gather, the softmax)."""
    await_inputs(PDL)
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    keep_e = e < E
    acc = tl.zeros([BLOCK_S, BLOCK_E], dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        acc += tl.load(P + (t * S + s[:, None]) * E + e[None, :],
                       mask=(s[:, None] < S) & keep_e[None, :], other=0.0)
    logits = tl.where(keep_e, tl.sum(acc, axis=0), float("-inf"))
    j = tl.arange(0, BLOCK_K)
    top = tl.full([BLOCK_K], float("-inf"), tl.float32)
    idx = tl.zeros([BLOCK_K], dtype=tl.int64)
    for i in tl.static_range(K):
        m = tl.max(logits, axis=0)
        pick = tl.min(tl.where((logits == m) & keep_e, e, BLOCK_E), axis=0)
        top = tl.where(j == i, m, top)
        idx = tl.where(j == i, pick.to(tl.int64), idx)
        logits = tl.where(e == pick, float("-inf"), logits)
    p = tl.exp(top - tl.max(top, axis=0))  # picks past K are -inf: exp gives 0
    tl.store(WT + t * K + j, p / tl.sum(p, axis=0), mask=j < K)
    tl.store(EX + t * K + j, idx, mask=j < K)


@triton.jit
def expert_counts_kernel(EX, C, N, BLOCK: tl.constexpr, EP: tl.constexpr,
                         PDL: tl.constexpr = False):
    """Program c: ``C[c, e]``, how many of the (token, pick) slots ``c * BLOCK
    .. (c + 1) * BLOCK - 1`` of ``EX [N]`` (each slot's expert, below ``EP``)
    picked expert e: the first half of :func:`expert_sort_kernel`'s counting
    sort, one row of counts per block of slots."""
    await_inputs(PDL)
    c = tl.program_id(0).to(tl.int64)
    slots = c * BLOCK + tl.arange(0, BLOCK)
    e = tl.load(EX + slots, mask=slots < N, other=-1)
    experts = tl.arange(0, EP)
    hits = (e[:, None] == experts[None, :]).to(tl.int32)  # [BLOCK, EP]
    tl.store(C + c * EP + experts, tl.sum(hits, axis=0))


@triton.jit
def expert_sort_kernel(EX, C, POS, SRC, ENDS, N, E, CHUNKS, K: tl.constexpr,
                       BLOCK: tl.constexpr, EP: tl.constexpr, CB: tl.constexpr,
                       PDL: tl.constexpr = False):
    """Program c: where each of its ``BLOCK`` (token, pick) slots goes when
    the slots are sorted by expert, stably (a counting sort: the experts'
    counts are known, :func:`expert_counts_kernel`'s ``C [CHUNKS, EP]``).
    Slot i of expert e goes to ``dest`` = the rows of experts below e, plus
    e's slots in earlier blocks, plus e's slots before i in this block
    (the cumulative sum of a ``[BLOCK, EP]`` one-hot block): ``POS[i] =
    dest`` (the row :func:`combine_kernel` reads back), ``SRC[dest] = i //
    K`` (the token whose row goes there) and, from program 0, ``ENDS[e]``
    (int32: where expert e's rows end). The same order as a stable sort of
    the slots by expert (``torch.argsort(..., stable=True)``), with no sort
    and no host synchronisation."""
    await_inputs(PDL)
    c = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, EP)
    total = tl.zeros([EP], dtype=tl.int32)
    before = tl.zeros([EP], dtype=tl.int32)
    for c0 in range(0, CHUNKS, CB):
        blocks = c0 + tl.arange(0, CB)
        n = tl.load(C + blocks[:, None] * EP + experts[None, :], mask=blocks[:, None] < CHUNKS,
                    other=0)  # [CB, EP]
        total += tl.sum(n, axis=0)
        before += tl.sum(tl.where(blocks[:, None] < c, n, 0), axis=0)
    ends = tl.cumsum(total, axis=0)  # [EP]
    tl.store(ENDS + experts, ends, mask=(experts < E) & (c == 0))
    first = (ends - total + before).to(tl.int64)  # where this block's rows of each expert start
    slots = c * BLOCK + tl.arange(0, BLOCK)
    keep = slots < N
    e = tl.load(EX + slots, mask=keep, other=-1)
    hits = (e[:, None] == experts[None, :]).to(tl.int32)  # [BLOCK, EP]
    earlier = tl.cumsum(hits, axis=0) - hits  # this block's earlier slots of each expert
    dest = tl.sum((earlier.to(tl.int64) + first[None, :]) * hits, axis=1)  # [BLOCK]
    tl.store(POS + slots, dest, mask=keep)
    tl.store(SRC + dest, slots // K, mask=keep)
