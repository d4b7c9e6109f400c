"""The Triton kernel of :mod:`shardwise.parallel.reduce_norm` (imported only
where Triton is installed): the one-shot all-reduce over symmetric memory,
the residual add and :func:`shardwise.model.triton_norm.normalise`, the same
normalisation the fused add + norm kernel applies."""
import triton
import triton.language as tl

from ..model.triton_norm import normalise


@triton.jit
def reduce_add_norm_kernel(P, BUFS, FLAGS, EPOCH, X, H, Y, W, B, D, eps,
                           RANK: tl.constexpr, WORLD: tl.constexpr,
                           ROWS: tl.constexpr, HAS_NORM: tl.constexpr,
                           HAS_BIAS: tl.constexpr, RMS: tl.constexpr,
                           BLOCK: tl.constexpr):
    """One program per row: the handshake of :mod:`.reduce_norm`'s docstring,
    the partials summed in rank order, ``h = x + sum`` stored, and (if
    ``HAS_NORM``) ``norm(h)`` stored."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    keep = cols < D
    # This call's epoch for the row: every thread reads the old
    # value before any writes the new one.
    e = tl.load(EPOCH + row) + 1
    tl.debug_barrier()
    tl.store(EPOCH + row, e)
    slot = ((e % 2) * ROWS + row).to(tl.int64) * D
    p = tl.load(P + row.to(tl.int64) * D + cols, mask=keep, other=0.0)
    mine = tl.load(BUFS + RANK).to(tl.pointer_type(P.dtype.element_ty))
    tl.store(mine + slot + cols, p, mask=keep)
    tl.debug_barrier()  # the whole row is stored before the flags go up
    for j in tl.static_range(WORLD):
        if j != RANK:
            flag = tl.load(FLAGS + j).to(tl.pointer_type(tl.int32)) + RANK * ROWS + row
            tl.atomic_xchg(flag, e, sem="release", scope="sys")
    own = tl.load(FLAGS + RANK).to(tl.pointer_type(tl.int32))
    for j in tl.static_range(WORLD):
        if j != RANK:
            seen = tl.atomic_add(own + j * ROWS + row, 0, sem="acquire", scope="sys")
            while seen - e < 0:  # a peer is at most one call ahead
                seen = tl.atomic_add(own + j * ROWS + row, 0, sem="acquire", scope="sys")
    tl.debug_barrier()
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(WORLD):  # rank order: the same sum on every rank
        if j == RANK:
            acc += p.to(tl.float32)
        else:
            peer = tl.load(BUFS + j).to(tl.pointer_type(P.dtype.element_ty))
            acc += tl.load(peer + slot + cols, mask=keep, other=0.0,
                           volatile=True).to(tl.float32)
    base = row.to(tl.int64) * D
    x = tl.load(X + base + cols, mask=keep, other=0.0)
    a = acc.to(x.dtype)  # the all-reduce's result, rounded
    h = (x.to(tl.float32) + a.to(tl.float32)).to(x.dtype)
    tl.store(H + base + cols, h, mask=keep)
    if HAS_NORM:
        y = normalise(h, W, B, cols, keep, D, eps, HAS_BIAS, RMS)
        tl.store(Y + base + cols, y.to(x.dtype), mask=keep)
