"""Partial softmax attention and its exact log-sum-exp merge.

Attention over a key set split into blocks K_1..K_n equals the merge of the
per-block results: with ``o_i = softmax(q K_i^T) V_i`` and
``lse_i = log sum exp(q K_i^T)``,

    lse = log sum_i exp(lse_i),   o = sum_i exp(lse_i - lse) * o_i

(Milakov & Gimelshein 2018, "Online normalizer calculation for softmax";
used by ring attention, Liu et al. 2023, and by sequence-sharded decode).
This file is the only place the merge is written. A block where a query
sees no key has ``lse = -inf`` and ``o = 0``; the merge gives it weight 0
instead of a NaN.
"""
from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")


def attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               mask: torch.Tensor | None = None, scale: float | None = None):
    """Attention of ``q [B, H, T, d]`` over ``k, v [B, H, S, d]`` (kv heads
    already expanded) with an optional boolean ``mask [T, S]`` or
    ``[B, H, T, S]`` (True = may attend). Returns ``o [B, H, T, d]`` in q's
    dtype and ``lse [B, H, T]`` in float32."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale  # [B, H, T, S]
    if mask is not None:
        s = s.masked_fill(~mask, NEG_INF)
    lse = torch.logsumexp(s, dim=-1)  # [B, H, T]; -inf where nothing is visible
    p = torch.exp(s - _finite(lse)[..., None])  # exp(-inf) = 0 on masked entries
    o = torch.matmul(p, v.float())
    return o.to(q.dtype), lse


def _finite(lse: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))


def merge_lse(o_a: torch.Tensor, lse_a: torch.Tensor, o_b: torch.Tensor,
              lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial results over disjoint key sets (see module doc)."""
    return merge_stack(torch.stack([o_a, o_b]), torch.stack([lse_a, lse_b]))


def merge_stack(o: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``n`` partial results stacked on dim 0: ``o [n, ..., T, d]``,
    ``lse [n, ..., T]`` -> ``(o [..., T, d], lse [..., T])``."""
    m = _finite(lse.max(dim=0).values)  # [..., T]
    w = torch.exp(lse - m)  # [n, ..., T]; 0 for empty blocks
    total = w.sum(dim=0)  # [..., T]
    out = (o.float() * w[..., None]).sum(dim=0) / total.clamp_min(1e-30)[..., None]
    lse_out = torch.where(total > 0, m + torch.log(total.clamp_min(1e-30)),
                          torch.full_like(total, NEG_INF))
    return out.to(o.dtype), lse_out
