"""The Triton kernel of :func:`shardwise.model.merge.merge_stack` on CUDA
(imported only where Triton is installed): the blocks' maximum lse, the sum
of their exponentials and the weighted sum of their outputs in float32; and
the same for a tile of rows (:func:`merge_rows`), which the split-key decode
kernel runs in place of a launch of this one."""
import triton
import triton.language as tl

from .triton_pdl import await_inputs


@triton.jit
def merge_kernel(O, L, OUT, LOUT, N, D, so_n, so_r, sl_n, sl_r, BLOCK_N: tl.constexpr,
                 BLOCK_D: tl.constexpr, PDL: tl.constexpr = False):
    """One program per query row r: o [N, rows, D] and lse [N, rows] by their
    strides merged into OUT [rows, D] and LOUT [rows] (``_merge_math``'s
    expressions in float32). The blocks are read ``BLOCK_N`` at a time, each
    a tile of loads in flight at once: a loop over them one by one waited on
    each load (6.3 us for a batch-1 decode step's 33 splits of 32 heads on an
    H100), where the merge reads a few hundred kilobytes."""
    await_inputs(PDL)
    r = tl.program_id(0).to(tl.int64)
    nb = tl.arange(0, BLOCK_N)
    m = tl.max(tl.full([BLOCK_N], float("-inf"), tl.float32), axis=0)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + nb
        lse = tl.load(L + n * sl_n + r * sl_r, mask=n < N, other=float("-inf"))
        m = tl.maximum(m, tl.max(lse, axis=0))
    # logsumexp's shift: 0 where every block is empty (m = -inf).
    mf = tl.where(m == float("-inf"), 0.0, m)
    s = tl.sum(tl.zeros([BLOCK_N], dtype=tl.float32), axis=0)
    for n0 in range(0, N, BLOCK_N):
        n = n0 + nb
        lse = tl.load(L + n * sl_n + r * sl_r, mask=n < N, other=float("-inf"))
        s += tl.sum(tl.exp(lse - mf), axis=0)
    total = tl.log(s) + mf  # -inf where every block is empty
    tf = tl.where(total == float("-inf"), 0.0, total)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        for n0 in range(0, N, BLOCK_N):
            n = n0 + nb
            keep = n < N
            share = tl.exp(tl.load(L + n * sl_n + r * sl_r, mask=keep, other=float("-inf")) - tf)
            x = tl.load(O + n[:, None] * so_n + r * so_r + cols[None, :],
                        mask=keep[:, None] & (cols < D)[None, :], other=0.0)
            # A block of share 0 adds nothing, whatever its o (NaN from a fused
            # kernel whose query saw no key).
            acc += tl.sum(tl.where(share[:, None] > 0, x.to(tl.float32) * share[:, None], 0.0),
                          axis=0)
        tl.store(OUT + r * D + cols, acc.to(OUT.dtype.element_ty), mask=cols < D)
    tl.store(LOUT + r, total)


@triton.jit
def merge_rows(O, L, OUT, LOUT, rows, keep, cols, rows_all, splits, D: tl.constexpr):
    """:func:`merge_kernel` for a tile of rows: the ``splits`` partials of rows
    ``rows`` (``O [splits, rows_all, D]``, ``L [splits, rows_all]``,
    contiguous) merged with the same expressions, the blocks taken one at a
    time (the same values to float32 rounding); read past L1 (``.cg``: the split-key decode kernel merges what
    its other programs wrote, :mod:`.triton_decode`)."""
    m = tl.load(L + rows, mask=keep, other=float("-inf"), cache_modifier=".cg")
    for i in range(1, splits):
        m = tl.maximum(m, tl.load(L + i * rows_all + rows, mask=keep, other=float("-inf"),
                                  cache_modifier=".cg"))
    mf = tl.where(m == float("-inf"), 0.0, m)
    s = tl.exp(tl.load(L + rows, mask=keep, other=float("-inf"), cache_modifier=".cg") - mf)
    for i in range(1, splits):
        s += tl.exp(tl.load(L + i * rows_all + rows, mask=keep, other=float("-inf"),
                            cache_modifier=".cg") - mf)
    total = tl.log(s) + mf
    tf = tl.where(total == float("-inf"), 0.0, total)
    acc = tl.zeros([rows.shape[0], D], dtype=tl.float32)
    for i in range(splits):
        share = tl.exp(tl.load(L + i * rows_all + rows, mask=keep, other=float("-inf"),
                               cache_modifier=".cg") - tf)
        x = tl.load(O + (i * rows_all + rows)[:, None] * D + cols[None, :], mask=keep[:, None],
                    other=0.0, cache_modifier=".cg")
        acc += tl.where(share[:, None] > 0, x * share[:, None], 0.0)
    tl.store(OUT + rows[:, None] * D + cols[None, :], acc.to(OUT.dtype.element_ty),
             mask=keep[:, None])
    tl.store(LOUT + rows, total, mask=keep)
