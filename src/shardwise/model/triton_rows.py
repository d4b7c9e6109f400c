"""The Triton kernels of :func:`shardwise.model.kernels.linear` for a few rows
(a decode step of 2 to 16 sequences) and of
:func:`shardwise.model.kernels.linear_swiglu` (imported only where Triton is
installed)."""
import triton
import triton.language as tl

from .triton_pdl import await_inputs, prefetch_l2


@triton.jit
def _swiglu_of(g, u, dtype: tl.constexpr):
    """``silu(g) * u`` of two accumulators, each rounded to ``dtype`` first (as
    the up-projection's output is), with ``swiglu_kernel``'s arithmetic: the
    SiLU in float32 rounded to ``dtype``, the product in float32, rounded."""
    g = g.to(dtype).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dtype)
    return (act.to(tl.float32) * u.to(dtype).to(tl.float32)).to(dtype)


@triton.jit
def rows_kernel(X, W, Y, P, M, O, F, sx, sw, sy, sxb, swb, syb, I: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, SPLIT: tl.constexpr,
                GATED: tl.constexpr, W_LEFT: tl.constexpr = False, PDL: tl.constexpr = False,
                PREFETCH: tl.constexpr = 0):
    """Program (output block, split s): ``y [M, BLOCK_O] = x [M, I] @ W[outs].T``
    for ``M <= BLOCK_M`` rows, on the tensor cores (the rows padded to a
    16-row tile with zeros), the exact products summed in float32 and rounded
    once, as a GEMM rounds them. The weights stream through once, spread over
    ``cdiv(O, BLOCK_O) x SPLIT`` programs; each step's loads feed a dot, so
    Triton keeps ``num_stages`` of them in flight.

    ``SPLIT`` > 1: program s sums its share of the ``I`` steps into ``P
    [SPLIT, M, (1 + GATED) O]`` (float32), which ``rows_finish_kernel`` adds
    in order and rounds; else the program rounds and writes ``y`` itself.
    ``GATED``: ``W [2 O, I]`` is ``O / F`` SwiGLU matrices ``[gate; up]`` of
    ``F`` outputs each, stacked (the experts' of a MoE layer; one where ``F``
    is ``O``), and ``y = silu(x W_gate.T) * (x W_up.T)`` (``_swiglu_of``):
    the program reads output o's gate row ``(o // F) 2F + o % F`` and its up
    row ``F`` further, so the activation is its epilogue. ``F`` is unread
    ungated. A third grid dimension b: a batch of such products, ``x``,
    ``W`` and ``y`` each offset by b times its batch stride (``sxb``,
    ``swb``, ``syb``; the experts' down-projections of a MoE decode step,
    ungated, unsplit).

    ``PREFETCH`` (with ``PDL``): before the wait for the kernel before it,
    the program asks for its first ``PREFETCH`` steps of weight rows to be
    brought into L2 (:func:`.triton_pdl.prefetch_l2`; the weights are no
    kernel's output), so that they stream during that kernel's tail."""
    outs = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    X += b * sxb
    W += b * swb
    Y += b * syb
    keep_o = outs < O
    rows = tl.arange(0, BLOCK_M)
    keep_m = rows < M
    steps = tl.cdiv(I, BLOCK_I)
    per = tl.cdiv(steps, SPLIT)
    if GATED:
        picked = (outs // F) * (2 * F) + outs % F  # the gate's rows; the up's F further
    else:
        picked = outs
    w_rows = W + picked.to(tl.int64)[:, None] * sw
    if PDL and PREFETCH > 0:  # one address per 128-byte line of each row's first steps
        LINE: tl.constexpr = 1024 // W.dtype.element_ty.primitive_bitwidth
        lines = s * per * BLOCK_I + tl.arange(0, PREFETCH * BLOCK_I // LINE) * LINE
        ahead = keep_o[:, None] & (lines[None, :] < tl.minimum(I, (s * per + per) * BLOCK_I))
        prefetch_l2(w_rows + lines[None, :], ahead, W)
        if GATED:
            prefetch_l2(w_rows + F * sw + lines[None, :], ahead, W)
    await_inputs(PDL)
    if W_LEFT:
        acc = tl.zeros([BLOCK_O, BLOCK_M], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_O, BLOCK_M], dtype=tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_O], dtype=tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_O], dtype=tl.float32)
    for step in range(s * per, tl.minimum(s * per + per, steps)):
        ins = step * BLOCK_I + tl.arange(0, BLOCK_I)
        keep_i = ins < I
        x = tl.load(X + rows[:, None] * sx + ins[None, :],
                    mask=keep_m[:, None] & keep_i[None, :], other=0.0)
        w = tl.load(w_rows + ins[None, :], mask=keep_o[:, None] & keep_i[None, :], other=0.0)
        if W_LEFT:
            acc += tl.dot(w, tl.trans(x))
        else:
            acc += tl.dot(x, tl.trans(w))
        if GATED:
            u = tl.load(w_rows + F * sw + ins[None, :], mask=keep_o[:, None] & keep_i[None, :],
                        other=0.0)
            if W_LEFT:
                acc_u += tl.dot(u, tl.trans(x))
            else:
                acc_u += tl.dot(x, tl.trans(u))
    if W_LEFT:  # back to [rows, outs]
        acc = tl.trans(acc)
        acc_u = tl.trans(acc_u)
    keep = keep_m[:, None] & keep_o[None, :]
    if SPLIT == 1:
        if GATED:
            y = _swiglu_of(acc, acc_u, Y.dtype.element_ty)
        else:
            y = acc.to(Y.dtype.element_ty)
        tl.store(Y + rows[:, None] * sy + outs[None, :], y, mask=keep)
    else:
        width = (1 + GATED) * O
        part = P + (s * M + rows[:, None]) * width + outs[None, :]
        tl.store(part, acc, mask=keep)
        if GATED:
            tl.store(part + O, acc_u, mask=keep)


@triton.jit
def rows_finish_kernel(P, Y, M, O, sy, SPLIT: tl.constexpr, GATED: tl.constexpr,
                       BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """Program (row, output block): ``rows_kernel``'s ``SPLIT`` partial sums
    ``P [SPLIT, M, (1 + GATED) O]`` added in order in float32 and rounded
    once (and, ``GATED``, the SwiGLU of the two halves) into ``y [M, O]``."""
    await_inputs(PDL)
    row = tl.program_id(0)
    outs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = outs < O
    width = (1 + GATED) * O
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        part = P + (s * M + row) * width + outs
        acc += tl.load(part, mask=keep, other=0.0)
        if GATED:
            acc_u += tl.load(part + O, mask=keep, other=0.0)
    if GATED:
        y = _swiglu_of(acc, acc_u, Y.dtype.element_ty)
    else:
        y = acc.to(Y.dtype.element_ty)
    tl.store(Y + row * sy + outs, y, mask=keep)
