"""The Triton side of :mod:`shardwise.model.kernels`: a row's normalisation as
a ``@triton.jit`` function that kernels call, and the fused residual-add +
norm kernel. Imported only where Triton is installed (``kernels._kernel``);
``shardwise.parallel.triton_reduce_norm`` calls :func:`normalise` too, so
the all-reduce + add + norm kernel normalises exactly as this one does.
"""
import triton
import triton.language as tl

from .triton_pdl import await_inputs


@triton.jit
def normalise(h, W, B, cols, keep, D, eps, HAS_BIAS: tl.constexpr, RMS: tl.constexpr):
    """LayerNorm (``RMS`` False) or RMSNorm of one row ``h`` of ``BLOCK``
    columns (``keep`` marks the ``D`` real ones) in float32, as PyTorch
    computes them: statistics in float32, then the weight ``W`` and, if
    ``HAS_BIAS``, the bias ``B``. Returns the float32 row."""
    v = h.to(tl.float32)
    if RMS:
        rstd = 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / D + eps)
        y = v * rstd
    else:
        mean = tl.sum(v, axis=0) / D
        c = tl.where(keep, v - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(c * c, axis=0) / D + eps)
        y = c * rstd
    y = y * tl.load(W + cols, mask=keep, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=keep, other=0.0).to(tl.float32)
    return y


@triton.jit
def add_norm_kernel(X, A, H, Y, W, B, D, eps,
                    HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr,
                    RMS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """One program per row: ``h = x + a`` rounded to the activation dtype and
    stored (``HAS_RES``; else ``h`` is ``x``), then ``norm(h)`` stored."""
    await_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    keep = cols < D
    x = tl.load(X + row * D + cols, mask=keep, other=0.0)
    if HAS_RES:
        h = (x.to(tl.float32) + tl.load(A + row * D + cols, mask=keep,
                                        other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(H + row * D + cols, h, mask=keep)
        x = h
    y = normalise(x, W, B, cols, keep, D, eps, HAS_BIAS, RMS)
    tl.store(Y + row * D + cols, y.to(x.dtype), mask=keep)
