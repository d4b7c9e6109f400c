"""The Triton kernel of :func:`shardwise.model.merge.merge_stack` on CUDA
(imported only where Triton is installed): the blocks' maximum lse, the sum
of their exponentials and the weighted sum of their outputs in float32; and
the same for a tile of rows (:func:`merge_rows`), which the split-key decode
kernel runs in place of a launch of this one."""
import triton
import triton.language as tl


@triton.jit
def merge_kernel(O, L, OUT, LOUT, N, D, so_n, so_r, sl_n, sl_r, BLOCK: tl.constexpr):
    """One program per query row r: o [N, rows, D] and lse [N, rows] by their
    strides merged into OUT [rows, D] and LOUT [rows] (``_merge_math``'s
    expressions, in its order)."""
    r = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    keep = cols < D
    m = tl.load(L + r * sl_r)
    for i in range(1, N):
        m = tl.maximum(m, tl.load(L + i * sl_n + r * sl_r))
    # logsumexp's shift: 0 where every block is empty (m = -inf).
    mf = tl.where(m == float("-inf"), 0.0, m)
    s = tl.exp(tl.load(L + r * sl_r) - mf)
    for i in range(1, N):
        s += tl.exp(tl.load(L + i * sl_n + r * sl_r) - mf)
    total = tl.log(s) + mf  # -inf where every block is empty
    tf = tl.where(total == float("-inf"), 0.0, total)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(N):
        share = tl.exp(tl.load(L + i * sl_n + r * sl_r) - tf)
        x = tl.load(O + i * so_n + r * so_r + cols, mask=keep, other=0.0)
        # A block of share 0 adds nothing, whatever its o (NaN from a fused
        # kernel whose query saw no key).
        acc += tl.where(share > 0, x.to(tl.float32) * share, 0.0)
    tl.store(OUT + r * D + cols, acc.to(OUT.dtype.element_ty), mask=keep)
    tl.store(LOUT + r, total)


@triton.jit
def merge_rows(O, L, OUT, LOUT, rows, keep, cols, rows_all, splits, D: tl.constexpr):
    """:func:`merge_kernel` for a tile of rows: the ``splits`` partials of rows
    ``rows`` (``O [splits, rows_all, D]``, ``L [splits, rows_all]``,
    contiguous) merged with the same expressions in the same order, so the
    same bits; read past L1 (``.cg``: the split-key decode kernel merges what
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
