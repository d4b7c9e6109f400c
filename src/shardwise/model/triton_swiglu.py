"""The Triton kernel of :func:`shardwise.model.kernels.swiglu` (imported only
where Triton is installed)."""
import triton
import triton.language as tl

from .triton_pdl import await_inputs


@triton.jit
def swiglu_kernel(H, Y, F, sh, sy, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """Program (row, column block): ``y = silu(gate) * up`` for the row's
    ``gate = h[:F]`` and ``up = h[F:]`` (two contiguous halves), as PyTorch's
    ``silu(gate) * up`` rounds it: the SiLU in float32 rounded to the
    activation dtype, then the product in float32, rounded."""
    await_inputs(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    keep = cols < F
    gate = tl.load(H + row * sh + cols, mask=keep, other=0.0)
    up = tl.load(H + row * sh + F + cols, mask=keep, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    y = act.to(tl.float32) * up.to(tl.float32)
    tl.store(Y + row * sy + cols, y.to(Y.dtype.element_ty), mask=keep)
