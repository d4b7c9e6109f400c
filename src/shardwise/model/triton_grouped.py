"""The Triton kernels of :func:`shardwise.model.kernels.grouped_linear`: a
prompt's expert products, every expert's rows in one launch (imported only
where Triton is installed). ``grouped_tma_kernel`` (Hopper and later: TMA
descriptors, one program per SM) and ``grouped_kernel`` (pointer loads, one
program per tile; the GPUs and Tritons without descriptors) number their
tiles alike (:func:`expert_tiles`, :func:`tile_of`)."""
import triton
import triton.language as tl

from .triton_pdl import await_inputs
from .triton_rows import _swiglu_of


@triton.jit
def expert_tiles(ENDS, E: tl.constexpr, EP: tl.constexpr, BLOCK_M: tl.constexpr, out_blocks):
    """The tiles of a grouped product, from the experts' row ends on the
    device: per expert (``[EP]`` blocks, zero past ``E``) its first row, its
    end, its row blocks of ``BLOCK_M`` and one past its last tile (experts
    in order, each ``row blocks x out_blocks`` tiles); and the tiles' total."""
    ex = tl.arange(0, EP)
    held = ex < E
    ends = tl.load(ENDS + ex, mask=held, other=0)
    starts = tl.load(ENDS + ex - 1, mask=held & (ex > 0), other=0)
    blocks = tl.where(held, tl.cdiv(ends - starts, BLOCK_M), 0)
    lasts = tl.cumsum(blocks * out_blocks, 0)
    return starts, ends, blocks, lasts, tl.max(lasts, 0)


@triton.jit
def tile_of(t, starts, ends, blocks, lasts, out_blocks, EP: tl.constexpr,
            BLOCK_M: tl.constexpr):
    """Tile ``t``'s expert e, first row, row end (e's) and output block, of
    :func:`expert_tiles`' tiles: e's numbered by output block, then by row
    block, so the row blocks of one expert that read the same weight tile
    are consecutive tiles, run side by side, and share it through L2."""
    ex = tl.arange(0, EP)
    e = tl.sum((lasts <= t).to(tl.int32), 0)  # the experts before t's, empty ones too
    mine = ex == e
    m_blocks = tl.sum(tl.where(mine, blocks, 0), 0)
    local = t - tl.sum(tl.where(mine, lasts, 0), 0) + m_blocks * out_blocks
    row = tl.sum(tl.where(mine, starts, 0), 0) + (local % m_blocks) * BLOCK_M
    return e, row, tl.sum(tl.where(mine, ends, 0), 0), local // m_blocks


@triton.jit
def grouped_kernel(X, W, Y, ENDS, O, sx, swe, sw, sy, K: tl.constexpr, E: tl.constexpr,
                   EP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GATED: tl.constexpr, PDL: tl.constexpr = False):
    """Program p: one ``[BLOCK_M, BLOCK_N]`` tile of ``y [R, O] = x [R, K] @
    W[e].T`` for the rows of expert e. ``x``'s rows are sorted by expert, and
    expert e's rows end at ``ENDS[e]`` (on the device: no host
    synchronisation, so the routing never reaches the host). The programs
    are numbered expert by expert; within an expert by output block, then
    by row block, so the few row blocks of one expert that read the same
    weight tile run side by side and share it through L2. Programs past
    the last expert's tiles (the grid is sized for the most tiles any
    routing can have: ``cdiv(R, BLOCK_M) + E`` row blocks) exit at once.
    The exact products are summed in float32 and rounded once, as a GEMM
    rounds them. ``GATED``: ``W [E, 2O, K]`` holds each expert's ``[gate;
    up]`` and ``y [R, O] = silu(x W_gate.T) * (x W_up.T)`` (``_swiglu_of``,
    each accumulator rounded first as the GEMM's output would be): the
    activation is the epilogue."""
    await_inputs(PDL)
    pid = tl.program_id(0)
    out_blocks = tl.cdiv(O, BLOCK_N)
    starts, ends, blocks, lasts, total = expert_tiles(ENDS, E, EP, BLOCK_M, out_blocks)
    if pid < total:
        e, first, end, n = tile_of(pid, starts, ends, blocks, lasts, out_blocks, EP, BLOCK_M)
        rows = first + tl.arange(0, BLOCK_M)
        keep_m = rows < end
        outs = n * BLOCK_N + tl.arange(0, BLOCK_N)
        keep_o = outs < O
        ks = tl.arange(0, BLOCK_K)
        x_ptr = X + rows.to(tl.int64)[:, None] * sx + ks[None, :]
        w_ptr = W + e.to(tl.int64) * swe + outs.to(tl.int64)[None, :] * sw + ks[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k in range(0, K, BLOCK_K):
            keep_k = ks < K - k
            x = tl.load(x_ptr + k, mask=keep_m[:, None] & keep_k[None, :], other=0.0)
            w = tl.load(w_ptr + k, mask=keep_k[:, None] & keep_o[None, :], other=0.0)
            acc = tl.dot(x, w, acc)
            if GATED:
                u = tl.load(w_ptr + O * sw + k, mask=keep_k[:, None] & keep_o[None, :],
                            other=0.0)
                acc_u = tl.dot(x, u, acc_u)
        if GATED:
            y = _swiglu_of(acc, acc_u, Y.dtype.element_ty)
        else:
            y = acc.to(Y.dtype.element_ty)
        tl.store(Y + rows.to(tl.int64)[:, None] * sy + outs[None, :], y,
                 mask=keep_m[:, None] & keep_o[None, :])


@triton.jit
def _tile(x_desc, w_desc, Y, e, row, end, n, O, sy, K: tl.constexpr, BLOCK_M: tl.constexpr,
          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GATED: tl.constexpr,
          GATE_CAT: tl.constexpr):
    """Rows ``row .. row + BLOCK_M`` (those before ``end`` kept) of output
    block ``n`` of expert ``e``, from the descriptors of
    :func:`grouped_tma_kernel`, written to ``Y``."""
    acc = tl.zeros([BLOCK_M, (1 + GATE_CAT) * BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_row = e * (1 + GATED) * O + n * BLOCK_N
    for k in range(0, K, BLOCK_K):
        x = x_desc.load([row, k])
        if GATE_CAT:  # gate rows, then up rows: one dot of twice the width
            w = w_desc.load([2 * e, n * BLOCK_N, k]).reshape(2 * BLOCK_N, BLOCK_K)
            acc = tl.dot(x, w.T, acc)
        else:
            acc = tl.dot(x, w_desc.load([w_row, k]).T, acc)
            if GATED:
                acc_u = tl.dot(x, w_desc.load([w_row + O, k]).T, acc_u)
    if GATE_CAT:
        g, u = acc.reshape(BLOCK_M, 2, BLOCK_N).permute(0, 2, 1).split()
        y = _swiglu_of(g, u, Y.dtype.element_ty)
    elif GATED:
        y = _swiglu_of(acc, acc_u, Y.dtype.element_ty)
    else:
        y = acc.to(Y.dtype.element_ty)
    rows = row + tl.arange(0, BLOCK_M)
    outs = n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(Y + rows.to(tl.int64)[:, None] * sy + outs[None, :], y,
             mask=(rows < end)[:, None] & (outs < O)[None, :])


@triton.jit
def grouped_tma_kernel(x_desc, x_half, w_desc, Y, ENDS, O, sy, K: tl.constexpr,
                       E: tl.constexpr, EP: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GATED: tl.constexpr,
                       GATE_CAT: tl.constexpr = False,
                       TAIL: tl.constexpr = False, FLATTEN: tl.constexpr = False,
                       WARP_SPEC: tl.constexpr = False, PDL: tl.constexpr = False):
    """``grouped_kernel``'s product (``y [R, O]``, each expert's rows, sorted
    and ending at ``ENDS`` on the device, by its own matrix; ``GATED``, the
    SwiGLU of the gate's and the up's products as the epilogue, each
    accumulator rounded first) with the operands read by the copy engine
    (TMA, Hopper and later) through host-made descriptors: ``x_desc`` of
    ``x [R, K]`` in ``[BLOCK_M, BLOCK_K]`` boxes, ``w_desc`` of the weights
    as ``[E O', K]`` in ``[BLOCK_N, BLOCK_K]`` boxes (``O'`` the rows of
    one expert: ``2 O`` gated, gate rows then up rows), or with
    ``GATE_CAT`` as ``[2 E, O, K]`` in ``[2, BLOCK_N, BLOCK_K]`` boxes, a
    gate tile and its up tile in one box and one dot of twice the width.
    A box past an expert's last row reads the next expert's rows (or
    zeros past ``R`` and ``K``): the store keeps only the expert's rows
    and the outputs before ``O``, by a mask, so neighbouring experts'
    tiles never write each other's rows.

    Persistent: P programs (the grid: the SM count) each take every P-th
    tile of :func:`tile_of`'s order, so the programs
    running together hold consecutive tiles and share weight tiles through
    L2; the tile count, read from ``ENDS`` on the device, bounds the loop
    (no host synchronisation). ``TAIL``: an expert's last row block with
    at most ``BLOCK_M / 2`` rows runs as a half-height tile (``x_half``'s
    boxes), where a full one would compute up to half a tile of rows that
    are thrown away (at ~512 rows an expert, the few per expert of a
    2048-token Mixtral prompt, a padded block is ~1/8 of the work).
    ``FLATTEN`` and ``WARP_SPEC``: ``tl.range``'s options for the tile
    loop (the next tile's loads issued during this one's last steps;
    producer and consumer warps)."""
    await_inputs(PDL)
    out_blocks = tl.cdiv(O, BLOCK_N)
    starts, ends, blocks, lasts, total = expert_tiles(ENDS, E, EP, BLOCK_M, out_blocks)
    for t in tl.range(tl.program_id(0), total, tl.num_programs(0), flatten=FLATTEN,
                      warp_specialize=WARP_SPEC):
        e, row, end, n = tile_of(t, starts, ends, blocks, lasts, out_blocks, EP,
                               BLOCK_M)
        if TAIL:
            if end - row <= BLOCK_M // 2:
                _tile(x_half, w_desc, Y, e, row, end, n, O, sy, K, BLOCK_M // 2, BLOCK_N,
                      BLOCK_K, GATED, GATE_CAT)
            else:
                _tile(x_desc, w_desc, Y, e, row, end, n, O, sy, K, BLOCK_M, BLOCK_N, BLOCK_K,
                      GATED, GATE_CAT)
        else:
            _tile(x_desc, w_desc, Y, e, row, end, n, O, sy, K, BLOCK_M, BLOCK_N, BLOCK_K,
                  GATED, GATE_CAT)
