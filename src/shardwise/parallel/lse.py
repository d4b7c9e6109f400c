"""Partial softmax attention with its log-sum-exp, the pieces that ring
attention (Liu et al. 2023) and sequence-sharded decode merge exactly
(:mod:`shardwise.model.merge`, re-exported here: ``merge_stack``,
``merge_lse``, ``merge_into``). A block where a query sees no key has
``lse = -inf`` and ``o = 0``.

``attend_lse`` computes one block. On CUDA, without an explicit mask, it
calls fused kernels that also return the log-sum-exp: at head_dim 256 and
512 in half precision shardwise's own (:mod:`shardwise.model.flash`, which
reads grouped-query K/V heads once), otherwise PyTorch's (cuDNN's flash
attention for fp16/bf16 and head_dim <= 128, FlashAttention-2 up to 256, the
memory-efficient kernel otherwise); elsewhere, and with a mask, it computes
the scores explicitly in float32. ``attend_lse_prefix`` attends over a
prefix of the keys whose length is on the device (a static decode step).
"""
from __future__ import annotations

import math

import torch

from ..model.decode import attend as decode_attend, decode_ok
from ..model.flash import attend as wide_attend, wide_ok
from ..model.merge import (NEG_INF, _finite, _merge_math, _merge_rows, _share,  # noqa: F401
                           merge_into, merge_lse, merge_stack)
from ..model.reference import per_step

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
    computed in float32. One query position on GPUs (half precision,
    head_dim <= 256) takes :mod:`shardwise.model.decode`'s split-key kernel,
    which reads ``n`` on the device and skips the keys past it."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    S, T = k.shape[2], q.shape[2]
    if T == 1 and decode_ok(q, k, v):  # an empty prefix gives lse = -inf, o = 0
        o, lse = decode_attend(q, k, v, n.reshape(1), scale)
        return o, lse[..., None]
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
    mask = per_step(n, ("prefix-mask", T, S, q.dtype, q.device, fused), make)
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
