"""The Triton kernel of :func:`shardwise.model.kernels.expert_rows` (imported
only where Triton is installed)."""
import triton
import triton.language as tl


@triton.jit
def expert_rows_kernel(X, W, E, Y, O, held, first, sx, swe, swo, sy, I: tl.constexpr,
                       PER: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
                       DOT: tl.constexpr = False):
    """Program (routed row r, output block): ``y[r] = W[E[r] - first] @ x[r // PER]``
    for ``W [held, O, I]`` (rows contiguous in I), accumulated in float32 and
    rounded once, as a GEMM rounds it. A row whose expert this rank does not
    hold reads no weight and writes zeros: only the routed experts' weights
    cross the memory bus (the decode step's floor). ``I`` is a compile-time
    constant: one compilation per matrix width of the model (two), a loop of
    known length."""
    r = tl.program_id(0).to(tl.int64)
    outs = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    keep_o = outs < O
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
        acc = tl.zeros([BLOCK_O], dtype=tl.float32)
        for block in range(0, tl.cdiv(I, BLOCK_I)):
            ins = block * BLOCK_I + tl.arange(0, BLOCK_I)
            keep_i = ins < I
            x = tl.load(X + (r // PER) * sx + ins, mask=keep_i, other=0.0).to(tl.float32)
            w = tl.load(W + e * swe + outs[:, None] * swo + ins[None, :],
                        mask=keep_o[:, None] & keep_i[None, :] & mine, other=0.0)
            acc += tl.sum(w.to(tl.float32) * x[None, :], axis=1)
    tl.store(Y + r * sy + outs, acc.to(Y.dtype.element_ty), mask=keep_o)
