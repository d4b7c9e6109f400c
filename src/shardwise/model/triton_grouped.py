"""The Triton kernel of :func:`shardwise.model.kernels.grouped_linear`: a
prompt's expert products, every expert's rows in one launch (imported only
where Triton is installed)."""
import triton
import triton.language as tl

from .triton_pdl import await_inputs
from .triton_rows import _swiglu_of


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
    ex = tl.arange(0, EP)
    held = ex < E
    ends = tl.load(ENDS + ex, mask=held, other=0)
    starts = tl.load(ENDS + ex - 1, mask=held & (ex > 0), other=0)
    blocks = tl.where(held, tl.cdiv(ends - starts, BLOCK_M), 0)  # row blocks per expert
    tiles = blocks * out_blocks
    if pid < tl.sum(tiles, 0):
        e = tl.sum((tl.cumsum(tiles, 0) <= pid).to(tl.int32), 0)  # this program's expert
        mine = ex == e
        local = pid - tl.sum(tl.where(ex < e, tiles, 0), 0)
        m_blocks = tl.sum(tl.where(mine, blocks, 0), 0)
        n = local // m_blocks
        first = tl.sum(tl.where(mine, starts, 0), 0)
        end = tl.sum(tl.where(mine, ends, 0), 0)
        rows = first + (local % m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
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
