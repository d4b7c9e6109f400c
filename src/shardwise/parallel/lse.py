"""Partial softmax attention and its exact log-sum-exp merge.

Attention over a key set split into blocks K_1..K_n equals the merge of the
per-block results: with ``o_i = softmax(q K_i^T) V_i`` and
``lse_i = log sum exp(q K_i^T)``,

    lse = log sum_i exp(lse_i),   o = sum_i exp(lse_i - lse) * o_i

(Milakov & Gimelshein 2018, "Online normalizer calculation for softmax";
used by ring attention, Liu et al. 2023, and by sequence-sharded decode).
This file is the only place the merge is written (``merge_stack`` for n
blocks at once, ``merge_into`` for a running accumulator). A block where a query
sees no key has ``lse = -inf`` and ``o = 0``; the merge gives it weight 0
instead of a NaN.

``attend_lse`` computes one block. On CUDA, without an explicit mask, it
calls fused kernels that also return the log-sum-exp: at head_dim 256 and
512 in half precision shardwise's own (:mod:`shardwise.model.flash`, which
reads grouped-query K/V heads once), otherwise PyTorch's (cuDNN's flash
attention for fp16/bf16 and head_dim <= 128, FlashAttention-2 up to 256, the
memory-efficient kernel otherwise); elsewhere, and with a mask, it computes
the scores explicitly in float32.

On CUDA ``merge_stack`` is one Triton kernel (a program per query row: the
blocks' maximum lse, the sum of their exponentials, the weighted sum of their
outputs in float32), where PyTorch's ops take about twenty kernels, logsumexp
alone nine; a decode step merges once a layer. It computes the same
expressions in the same order as the PyTorch path (``_merge_math``), which
runs everywhere else.
"""
from __future__ import annotations

import math

import torch

from ..model.flash import attend as wide_attend, wide_ok
from ..model.kernels import triton_kernel
from ..model.reference import _per_step

NEG_INF = float("-inf")

_HALF = (torch.float16, torch.bfloat16)


def attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None, scale: float | None = None,
               causal: bool = False):
    """Attention of ``q [B, H, T, d]`` over ``k, v [B, Hkv, S, d]`` (``H`` a
    multiple of ``Hkv``: query head h reads key/value head ``h // (H / Hkv)``,
    as in the reference's grouped-query attention).

    ``mask``: optional boolean ``[T, S]`` or ``[B, H, T, S]`` (True = may
    attend). ``causal``: query t sees keys 0..t (needs ``T == S``).
    Returns ``o [B, H, T, d]`` in q's dtype and ``lse [B, H, T]`` in float32;
    a query that sees no key gets ``o = 0`` and ``lse = -inf``."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"causal block needs as many queries as keys, got {q.shape[2]} and {k.shape[2]}")
    if mask is None and wide_ok(q, k, v):
        return wide_attend(q, k, v, 0, causal, scale)
    if _groupable(q, k, causal, mask):
        rows = _group(q, k)
        if mask is None and _fused_ok(q):
            return _ungroup(q, *_attend_fused(rows, k, v, scale, False, queries=q.shape[2]))
        return _ungroup(q, *_attend_math(rows, k, v, mask, scale, False))
    if mask is None and _fused_ok(q):
        return _attend_fused(q, k, v, scale, causal)
    k, v = _expand_kv(q, k, v)
    return _attend_math(q, k, v, mask, scale, causal)


def attend_lse_prefix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: torch.Tensor,
                      scale: float | None = None, may_be_empty: bool = False):
    """:func:`attend_lse` of ``q [B, H, T, d]`` over the first ``n`` of the
    ``S`` keys in ``k, v [B, Hkv, S, d]``, with ``n`` a device tensor (one
    element, >= 1, or >= 0 with ``may_be_empty``: then where it is 0 the
    lse is set to -inf, which the merges read as an empty block whatever
    the kernel's output): the shapes do not depend on ``n``, so a decode step over
    a cache that grows can be captured once in a CUDA graph. On CUDA the
    keys past ``n`` get an additive ``-inf`` bias in a fused kernel that
    returns the log-sum-exp with the output: cuDNN's in half precision up to
    head_dim 128 (its plan is built once: the shapes never change), the
    memory-efficient kernel otherwise; elsewhere the masked scores are
    computed in float32."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    S, T = k.shape[2], q.shape[2]
    if _groupable(q, k, False, None) and T == 1:  # the key prefix applies to each row alike
        return _ungroup(q, *attend_lse_prefix(_group(q, k), k, v, n, scale, may_be_empty))
    B, H, T, _ = q.shape
    fused = _fused_ok(q)
    if not fused:
        k, v = _expand_kv(q, k, v)

    def make():
        keep = torch.arange(S, device=q.device) < n.reshape(1)  # [S]
        if not fused:
            return keep
        # The kernels read the bias in rows aligned to 16 elements.
        bias = q.new_zeros(T, S + (-S % 16))[:, :S]
        return bias.masked_fill_(~keep, NEG_INF)

    # Every layer of a step masks the same positions: built once a step.
    mask = _per_step(("prefix-mask", id(n), T, S, q.dtype, q.device, fused), make)
    if not fused:  # an empty prefix: o = 0, lse = -inf
        return _attend_math(q, k, v, mask[None, :], scale, False)
    o, lse = _attend_fused(q, k, v, scale, False, mask.expand(B, H, T, S))
    if may_be_empty:
        lse = lse.masked_fill(n.reshape(1, 1, 1) == 0, NEG_INF)
    return o, lse


def _groupable(q: torch.Tensor, k: torch.Tensor, causal: bool, mask) -> bool:
    """Whether grouped-query attention can run as attention over the
    ``Hkv`` key/value heads with the ``G = H / Hkv`` query heads of each as
    its rows (:func:`_group`): exact when every row sees the same keys, i.e.
    no causal block, and a mask (if any) for one query position."""
    return (q.shape[1] != k.shape[1] and not causal
            and (mask is None or (q.shape[2] == 1 and mask.dim() == 2)))


def _group(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``q [B, H, T, d]`` as ``[B, Hkv, G*T, d]``: query head ``h`` is row
    block ``h % G`` of key/value head ``h // G``, so each key/value head is
    read once for all its query heads (a view for one query position)."""
    B, H, T, d = q.shape
    return q.reshape(B, k.shape[1], H // k.shape[1] * T, d)


def _ungroup(q: torch.Tensor, o: torch.Tensor, lse: torch.Tensor):
    """:func:`_group`'s inverse on the result: ``o [B, H, T, d]``, ``lse [B, H, T]``."""
    B, H, T, d = q.shape
    return o.reshape(B, H, T, d), lse.reshape(B, H, T)


def _expand_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """``k, v`` with their heads repeated to ``q``'s, for the kernels that
    take no grouped-query attention where :func:`_groupable` is not (causal
    blocks): the math path and the memory-efficient kernel. cuDNN's and
    FlashAttention's take ``Hkv < H`` as it is (PyTorch 2.11, H100: the same
    result as repeated heads, results/llama/probe.jsonl)."""
    if q.shape[1] == k.shape[1]:
        return k, v
    g = q.shape[1] // k.shape[1]
    return k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)


def _fused_ok(q: torch.Tensor) -> bool:
    # The fused kernels need the head dim in 16-byte units.
    return q.is_cuda and q.shape[-1] % 8 == 0 and q.dtype in (*_HALF, torch.float32)


# Cleared the first time cuDNN refuses a shape (old cuDNN, odd strides): for
# unbiased blocks, and for biased static-shape steps, separately.
_CUDNN = {"plain": True, "bias": True}


def _attend_fused(q, k, v, scale: float, causal: bool, bias: torch.Tensor | None = None,
                  queries: int | None = None):
    """The fused kernels with the log-sum-exp; ``bias`` an additive
    ``[B, H, T, S]`` bias (static-shape steps). ``queries``: the query
    positions (q's rows unless grouped, :func:`_group`)."""
    T = q.shape[2]
    use = "plain" if bias is None else "bias"
    # cuDNN's flash kernel: on Hopper ~1.5x FlashAttention-2's rate. Not for an
    # eager decode step (one query): cuDNN plans each new key count (tens of
    # ms); a biased step's shapes never change, so its plan is built once.
    one = (T if queries is None else queries) == 1
    if q.dtype in _HALF and q.shape[-1] <= 128 and (not one or bias is not None) and _CUDNN[use]:
        try:
            out = torch.ops.aten._scaled_dot_product_cudnn_attention(
                q, k, v, bias, True, 0.0, causal, False, scale=scale)
            o, lse = out[0], out[1]
            return o, lse.reshape(o.shape[:3]).float()  # [B, H, T] or [B, H, T, 1] by release
        except RuntimeError:
            _CUDNN[use] = False
    if bias is None and q.dtype in _HALF and q.shape[-1] <= 256:
        out = torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, causal, False, scale=scale)
        o, lse = out[0], out[1]  # lse [B, H, T] float32, natural log
    else:
        k, v = _expand_kv(q, k, v)
        out = torch.ops.aten._scaled_dot_product_efficient_attention(
            q, k, v, bias, True, 0.0, causal, scale=scale)
        o, lse = out[0], out[1][..., :T]  # the kernel pads lse to a multiple of 32 queries
    return o, lse.float()


def _attend_math(q, k, v, mask, scale: float, causal: bool):
    T, S = q.shape[2], k.shape[2]
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [B, H, T, S]
    if causal:
        tril = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
        mask = tril if mask is None else mask & tril
    if mask is not None:
        s = s.masked_fill(~mask, NEG_INF)
    lse = torch.logsumexp(s, dim=-1)  # [B, H, T]; -inf where nothing is visible
    p = torch.exp(s - _finite(lse)[..., None])  # exp(-inf) = 0 on masked entries
    o = torch.matmul(p, v.float())
    return o.to(q.dtype), lse


def _finite(lse: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def _share(lse_i: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """``exp(lse_i - lse)``, block i's share of the merged softmax. Relative to
    the merged lse it never exceeds 1, so nothing overflows; a block that sees
    nothing (``lse_i = -inf``) gets 0, and where no block sees anything
    (``lse = -inf``) every share is 0 instead of NaN."""
    return torch.exp(lse_i - _finite(lse))


def merge_stack(o: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``n`` partial results stacked on dim 0: ``o [n, ..., T, d]``,
    ``lse [n, ..., T]`` -> ``(o [..., T, d], lse [..., T])``.
    A query that no block sees gets ``o = 0``, ``lse = -inf``. ``o`` and
    ``lse`` may be strided views (e.g. the columns of one gathered buffer)."""
    rows = _merge_rows(o, lse)
    if rows is not None:
        return _merge_launch(o, lse, *rows)
    return _merge_math(o, lse)


def _merge_math(o: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    total = torch.logsumexp(lse, dim=0)  # [..., T]; -inf (not NaN) where every lse is -inf
    share = _share(lse, total)[..., None]
    # A block of share 0 adds nothing, whatever its o (a fused kernel's
    # output for a query that saw no key is not defined).
    out = torch.where(share > 0, o.float() * share, 0.0).sum(dim=0)
    return out.to(o.dtype), total


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


def _merge_launch(o, lse, o3, l2):
    triton, kernel = _merge_kernel()
    n, rows, d = o3.shape
    out = torch.empty(o.shape[1:], dtype=o.dtype, device=o.device)
    total = torch.empty(lse.shape[1:], dtype=torch.float32, device=o.device)
    kernel[(rows,)](o3, l2, out, total, n, d, o3.stride(0), o3.stride(1), l2.stride(0),
                    l2.stride(1), BLOCK=triton.next_power_of_2(d))
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
