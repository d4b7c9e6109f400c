"""The exact merge of partial softmax attentions by their log-sum-exp.

Attention over a key set split into blocks K_1..K_n equals the merge of the
per-block results: with ``o_i = softmax(q K_i^T) V_i`` and
``lse_i = log sum exp(q K_i^T)``,

    lse = log sum_i exp(lse_i),   o = sum_i exp(lse_i - lse) * o_i

(Milakov & Gimelshein 2018, "Online normalizer calculation for softmax").
This file is the only place the merge is written: ``merge_stack`` for n
blocks at once, ``merge_into`` for a running accumulator. Its callers: ring
attention's blocks and sequence-sharded decode (:mod:`shardwise.parallel.lse`)
and the split-key decode attention (:mod:`.decode`). A block where a query
sees no key has ``lse = -inf``; the merge gives it weight 0 instead of a NaN.

On CUDA ``merge_stack`` is one Triton kernel (:mod:`.triton_merge`; a
program per query row: the blocks' maximum lse, the sum of their
exponentials, the weighted sum of their outputs in float32), where PyTorch's
ops take about twenty kernels, logsumexp alone nine. It computes the same
expressions in the same order as the PyTorch path (``_merge_math``), which
runs everywhere else. The split-key decode kernel merges its splits in its
own launch with that file's tile form of the kernel (``merge_rows``).
"""
from __future__ import annotations

import torch

from .kernels import pdl, triton_kernel

NEG_INF = float("-inf")
_HALF = (torch.float16, torch.bfloat16)


def _finite(lse: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def _share(lse_i: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``exp(lse_i - lse)``, block i's share of the merged softmax. Relative to
    the merged lse it never exceeds 1, so nothing overflows; a block that sees
    nothing (``lse_i = -inf``) gets 0, and where no block sees anything
    (``lse = -inf``) every share is 0 instead of NaN."""
    return torch.exp(lse_i - _finite(lse))


def merge_stack(o: torch.Tensor, lse: torch.Tensor,
                dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``n`` partial results stacked on dim 0: ``o [n, ..., T, d]``,
    ``lse [n, ..., T]`` -> ``(o [..., T, d], lse [..., T])``, ``o`` in
    ``dtype`` (default: the partials'). A query that no block sees gets
    ``o = 0``, ``lse = -inf``. ``o`` and ``lse`` may be strided views (e.g.
    the columns of one gathered buffer)."""
    rows = _merge_rows(o, lse)
    if rows is not None:
        return _merge_launch(o, lse, *rows, dtype=dtype)
    return _merge_math(o, lse, dtype)


def _merge_math(o: torch.Tensor, lse: torch.Tensor,
                dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    total = torch.logsumexp(lse, dim=0)  # [..., T]; -inf (not NaN) where every lse is -inf
    share = _share(lse, total)[..., None]
    # A block of share 0 adds nothing, whatever its o (a fused kernel's
    # output for a query that saw no key is not defined).
    out = torch.where(share > 0, o.float() * share, 0.0).sum(dim=0)
    return out.to(dtype or o.dtype), total


_MERGE_MAX_D = 4096


def _merge_kernel():
    """``(triton, merge_kernel)`` (:mod:`.triton_merge`), or False without Triton."""
    return triton_kernel(f"{__package__}.triton_merge", "merge_kernel")


def _merge_rows(o: torch.Tensor, lse: torch.Tensor):
    """``(o [n, rows, d], lse [n, rows])`` as views of the inputs when the
    Triton merge takes them (CUDA, float32 lse, d <= 4096, rows of o evenly
    strided with contiguous columns), else None."""
    if not (o.is_cuda and o.dtype in (*_HALF, torch.float32) and lse.dtype == torch.float32
            and o.dim() >= 2 and o.shape[:-1] == lse.shape and o.shape[-1] <= _MERGE_MAX_D
            and o.stride(-1) == 1 and o.numel() > 0):
        return None
    n, d = o.shape[0], o.shape[-1]
    try:
        o3, l2 = o.view(n, -1, d), lse.view(n, -1)
    except RuntimeError:  # rows not evenly strided: the PyTorch path
        return None
    return (o3, l2) if _merge_kernel() else None


def _merge_launch(o, lse, o3, l2, dtype=None):
    triton, kernel = _merge_kernel()
    n, rows, d = o3.shape
    out = torch.empty(o.shape[1:], dtype=dtype or o.dtype, device=o.device)
    total = torch.empty(lse.shape[1:], dtype=torch.float32, device=o.device)
    block_n = min(64, triton.next_power_of_2(n))  # blocks read at once
    block_d = max(16, min(triton.next_power_of_2(d), 8192 // block_n))
    kernel[(rows,)](o3, l2, out, total, n, d, o3.stride(0), o3.stride(1), l2.stride(0),
                    l2.stride(1), BLOCK_N=block_n, BLOCK_D=block_d, **pdl(o.device))
    return out, total


def merge_lse(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor,
              lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial results over disjoint key sets (see module doc)."""
    return merge_stack(torch.stack([o_a, o_b]), torch.stack([lse_a, lse_b]))


def merge_into(o: torch.Tensor, lse: torch.Tensor, o_b: torch.Tensor,
               lse_b: torch.Tensor) -> None:
    """``merge_lse`` into an accumulator, in place: ``o [..., T, d]`` (float32,
    so repeated merges round once each in full precision) and ``lse [..., T]``
    absorb block ``(o_b, lse_b)``. Two passes over ``o`` and none over a
    stacked copy: ring attention merges once per ring step."""
    total = torch.logaddexp(lse, lse_b)  # -inf where both are -inf
    o.mul_(_share(lse, total)[..., None]).addcmul_(o_b, _share(lse_b, total)[..., None])
    lse.copy_(total)
