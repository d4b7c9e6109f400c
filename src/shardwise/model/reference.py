"""The single-device reference transformer: the source of truth.

A plain pre-norm decoder (dense or Mixture-of-Experts) with causal attention
through ``scaled_dot_product_attention`` and a static KV cache. It knows
nothing of distribution. Strategies build the same modules with *local*
sizes (fewer heads, a slice of d_ff, a range of layers) and wrap them; they
never change this file's arithmetic.

Shapes: B batch, T new tokens, S cached positions, D d_model, H heads,
Hkv key/value heads, d head_dim, F d_ff, E experts.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager
from typing import Sequence

import torch
import torch.nn.functional as Fn
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..spec import ModelSpec
from .decode import attend as decode_attend, decode_ok
from .once import made_once
from .flash import attend as wide_attend, wide_ok
from .kernels import (add_norm, batched_linear, combine_picks, expert_rows, grouped_linear,
                      linear, linear_swiglu, pick_rows, pick_top, pickable, routable, route_rows,
                      sort_picks, swiglu, swiglu_mlp)
from .rope import Rope
from .rotary import rotate

# Prompts at least this long have their K/V projection written straight into
# the cache, one GEMM per sequence (each large enough to run at full rate).
DIRECT_CACHE_MIN_TOKENS = 1024

_DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


# A loop whose iterations each do the same work (one per sequence of a batch)
# iterates ``same_work(n)``; a recorder of what a step does (shardwise.perf)
# replaces it to run one iteration and count it n times.
SAME_WORK = range


def same_work(n: int):
    return SAME_WORK(n)


def _each(items: list, fn) -> list:
    return [fn(item) for item in items]


# A map over items that each take the same work (a model's layers, their KV
# caches' views); a recorder of what a step does (shardwise.perf) replaces it
# to run the first two and let the second's result stand for the rest.
EACH_ALIKE = _each


def each_alike(items, fn) -> list:
    """``[fn(item) for item in items]``, for items that each take the same work."""
    return EACH_ALIKE(list(items), fn)


def build_layers(layers, build) -> nn.ModuleList:
    """``nn.ModuleList`` of ``build(layer)`` for each of ``layers`` (they differ
    in their weights only)."""
    return nn.ModuleList(each_alike(layers, build))


@contextmanager
def one_step(pos=None):
    """Scope of one forward step at ``pos``. Inside it, the index tensors
    derived from a device-tensor position (cache slots, the position mask)
    are built by the first layer that asks and shared by the others
    (:func:`per_step`): in a static-shape decode step captured in a CUDA
    graph, that is a few kernels a step instead of a few a layer. They are
    held by ``pos`` itself for the step and dropped at its end (the position
    changes in place between steps), so no module keeps step state. A scope
    inside another at the same position shares it; at an int position
    nothing is derived and the scope does nothing."""
    if not isinstance(pos, torch.Tensor) or _MEMO in pos.__dict__:
        yield
        return
    memo = pos.__dict__[_MEMO] = {}
    try:
        yield
    finally:
        del pos.__dict__[_MEMO]
        memo.clear()


_MEMO = "_shardwise_step"  # the attribute of a step's position that holds its memo


def per_step(anchor: torch.Tensor, key: tuple, make):
    """``make()``, made once a step for ``(anchor, key)`` where ``anchor`` is
    the step's position (:func:`one_step`) or a tensor made this way from it
    (which then holds the step's memo too); made on every call outside a step."""
    memo = anchor.__dict__.get(_MEMO)
    if memo is None:
        return make()
    at = (id(anchor), *key)
    if at not in memo:
        value = memo[at] = make()
        for t in value if isinstance(value, tuple) else (value,):
            if isinstance(t, torch.Tensor):
                t.__dict__[_MEMO] = memo
    return memo[at]


def _slots(pos: torch.Tensor, T: int, device) -> torch.Tensor:
    """Cache positions ``pos..pos+T`` for a device-tensor ``pos``, once a step."""
    return per_step(pos, ("slots", T, device), lambda: pos + torch.arange(T, device=device))


class KVCache:
    """Static cache for one layer: ``k, v [B, Hkv, S_max, d]``.

    The storage ``kv`` is token-major, ``[B, S_max, 2, Hkv, d]``: each
    position holds its keys then its values in one contiguous run, the
    order of the K and V rows of the fused QKV weight. ``k, v`` are its
    ``[B, Hkv, S, d]`` views (attention kernels take them as they are; only
    the last dimension must be contiguous). So a decode step stores its
    keys and values with one copy, and a long prefill has its K/V
    projection written by the GEMM straight into the cache (``rows``), with
    no copy at all (FlashAttention's cache is token-major for the same reason).

    ``batch_view`` gives a micro-batch a view that writes through to the
    same storage, so pipelines and data-parallel splits need no copies.
    """

    def __init__(self, kv: torch.Tensor):
        self.kv = kv  # [B, S_max, 2, Hkv, d]
        self.k = kv[:, :, 0].transpose(1, 2)  # [B, Hkv, S_max, d]
        self.v = kv[:, :, 1].transpose(1, 2)

    @classmethod
    def allocate(cls, batch, kv_heads, max_len, head_dim, dtype, device) -> "KVCache":
        return cls(torch.zeros(batch, max_len, 2, kv_heads, head_dim, dtype=dtype, device=device))

    def batch_view(self, b0: int, b1: int) -> "KVCache":
        return KVCache(self.kv[b0:b1])

    def rows(self, b: int, pos: int, T: int) -> torch.Tensor:
        """Sequence ``b``'s positions ``pos..pos+T`` as contiguous ``[T, 2*Hkv*d]``
        rows (keys then values): the ``out=`` of its K/V projection."""
        return self.kv[b, pos : pos + T].view(T, -1)

    def write_packed(self, pos, kv: torch.Tensor):
        """Store ``kv [B, T, 2*Hkv*d]`` (K then V per position, as the fused
        QKV projection lays them out) at ``pos..pos+T`` in one copy; ``pos``
        an int or a 0-d device tensor. Returns what ``write`` returns."""
        B, T = kv.shape[:2]
        kv = kv.view(B, T, *self.kv.shape[2:])
        if isinstance(pos, torch.Tensor):
            self.kv.index_copy_(1, _slots(pos, T, kv.device), kv)
            return self.k, self.v
        _copy_rows(self.kv[:, pos : pos + T], kv)
        return self.upto(pos + T)

    def upto(self, n: int):
        """``k, v`` for positions ``0..n`` (views)."""
        return self.k[:, :, :n], self.v[:, :, :n]

    def write(self, pos, k: torch.Tensor, v: torch.Tensor):
        """Store ``k, v [B, Hkv, T, d]`` at positions ``pos..pos+T`` and return
        the cache up to ``pos+T`` (views, no copy).

        ``pos`` may be a device tensor (0-d): then the whole static cache is
        returned and the caller masks positions past ``pos+T``. Shapes then do
        not depend on the position, so a decode step can be captured once in a
        CUDA graph and replayed at every position."""
        T = k.shape[2]
        if isinstance(pos, torch.Tensor):
            at = _slots(pos, T, k.device)
            self.k.index_copy_(2, at, k)
            self.v.index_copy_(2, at, v)
            return self.k, self.v
        _copy_rows(self.k[:, :, pos : pos + T], k)
        _copy_rows(self.v[:, :, pos : pos + T], v)
        return self.upto(pos + T)

    def write_rotated(self, rope: Rope, pos, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      slot=None, length: int | None = None):
        """Rotate ``q [B, T, H, d]`` in place and store the rotated ``k`` and
        ``v [B, T, Hkv, d]`` at ``slot..slot+T`` (default ``pos``), for
        positions ``pos..pos+T``: one kernel on GPUs (:func:`.rotary.rotate`).
        ``length`` bounds a device-tensor ``pos`` (default: the cache's
        length, a cache indexed by position). Returns what ``write`` returns
        for ``slot``."""
        at = pos if slot is None else slot
        rotate(rope, pos, q, k, v, kv=self.kv, slot=at,
               length=self.kv.shape[1] if length is None else length)
        if isinstance(at, torch.Tensor):
            return self.k, self.v
        return self.upto(at + k.shape[1])

    def nbytes(self) -> int:
        return self.kv.nbytes


def _copy_rows(dst: torch.Tensor, src: torch.Tensor) -> None:
    """``dst.copy_(src)`` for strided views whose last dimension is
    contiguous: moved as 8-byte words when the rows allow it. A strided copy
    runs PyTorch's generic (unvectorised) element-wise kernel, whose cost is
    per element: 8-byte elements move bf16 rows ~4x faster than 2-byte ones."""
    row = src.shape[-1] * src.element_size()
    if (src.dtype == dst.dtype and row % 8 == 0 and src.stride(-1) == 1 and dst.stride(-1) == 1
            and src.element_size() < 8):
        try:
            dst.view(torch.int64).copy_(src.view(torch.int64))
            return
        except RuntimeError:  # strides or offsets not 8-byte aligned
            pass
    dst.copy_(src)


def make_norm(spec: ModelSpec) -> nn.Module:
    if spec.norm == "rmsnorm":
        return nn.RMSNorm(spec.d_model, eps=spec.norm_eps)
    return nn.LayerNorm(spec.d_model, eps=spec.norm_eps)


def causal_attention(q, k, v, q_start) -> torch.Tensor:
    """Softmax attention of ``q [B, H, T, d]`` (absolute positions
    ``q_start..q_start+T``) over ``k, v [B, Hkv, S, d]`` (positions ``0..S``),
    each query seeing keys at positions <= its own. Returns ``[B, H, T, d]``.
    ``q_start`` may be a 0-d device tensor (static-shape decode). One query
    position on GPUs (half precision, head_dim <= 256) runs the split-key
    kernel of :mod:`.decode`, which streams the cache on every SM; wide heads
    (head_dim 256 and 512) the flash kernel of :mod:`.flash` where it is the
    faster; everything else ``scaled_dot_product_attention``.

    Grouped-query attention (``Hkv < H``) never repeats K/V: a prompt goes to
    SDPA's grouped path (``enable_gqa``: cuDNN's kernel takes it as it is),
    and one decode token's ``H / Hkv`` query heads become the rows of their
    key/value head's queries (all at the same position, so every mask
    applies to each row alike): attention over ``Hkv`` heads of ``H / Hkv``
    rows, each head's keys read once. A static step in half precision
    (cuDNN's, with its mask) keeps ``enable_gqa``: on an H100 cuDNN's own
    grouping read Llama 3.1 8B's cache 8% faster than the grouped rows at
    batch 16 (94 vs 102 us, results/llama/probe.jsonl)."""
    B, H, T, d = q.shape
    Hkv = k.shape[1]
    if T == 1 and decode_ok(q, k, v):
        if isinstance(q_start, torch.Tensor):  # keys 0..q_start, counted once a step
            n = per_step(q_start, ("keys",), lambda: q_start + 1)
        else:
            n = min(q_start + 1, k.shape[2])
        return decode_attend(q, k, v, n)[0]
    if not isinstance(q_start, torch.Tensor) and wide_ok(q, k, v, q_start == 0 and T == k.shape[2]):
        return wide_attend(q, k, v, q_start, causal=True)[0]
    cudnn_static = (isinstance(q_start, torch.Tensor) and q.dtype in (torch.bfloat16, torch.float16)
                    and d <= 128 and q.is_cuda)
    if T == 1 and H != Hkv and not cudnn_static:
        o = _causal_sdpa(q.reshape(B, Hkv, H // Hkv, d), k, v, q_start, 1, False)
        # A view of FlashAttention's output (laid out as q is); the
        # memory-efficient kernel's ([B, rows, Hkv, d] transposed) is copied.
        return o.reshape(B, H, 1, d)
    return _causal_sdpa(q, k, v, q_start, T, H != Hkv)


def _causal_sdpa(q, k, v, q_start, T: int, gqa: bool) -> torch.Tensor:
    """:func:`causal_attention` through SDPA; ``T`` positions (q's rows are
    those positions, or with ``T == 1`` any number of rows at one position)."""
    S = k.shape[2]
    if isinstance(q_start, torch.Tensor):
        def make_mask():
            q_pos = q_start + torch.arange(T, device=q.device)
            seen = torch.arange(S, device=q.device)[None, :] <= q_pos[:, None]  # [T, S]
            # Additive (0 / -inf), once a step: SDPA turns a boolean mask into
            # this form on every call, a few kernels a layer. Rows padded to 16
            # elements, the alignment the fused kernels read a bias with (a
            # narrower row is padded by SDPA on every call).
            bias = torch.zeros(T, S + (-S % 16), dtype=q.dtype, device=q.device)[:, :S]
            return bias.masked_fill_(~seen, float("-inf"))

        mask = per_step(q_start, ("mask", T, S, q.dtype, q.device), make_mask)
        return Fn.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if q_start == 0 and T == S:
        return Fn.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if q_start + T == S and T == 1:
        # A decode step sees a new key count every step. cuDNN's attention
        # builds an execution plan per shape (tens of ms each), so it is left
        # out here; the flash and memory-efficient kernels need no plan.
        with sdpa_kernel(_DECODE_BACKENDS):
            return Fn.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    q_pos = torch.arange(q_start, q_start + T, device=q.device)
    mask = torch.arange(S, device=q.device)[None, :] <= q_pos[:, None]  # [T, S]
    return Fn.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


class Linear(nn.Linear):
    """``nn.Linear`` whose product is :func:`.kernels.linear`: a decode
    step's single row on GPUs by a Triton GEMV that reads the weights at the
    copy rate, every other call ``Fn.linear`` as before."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


# Tokens a call looks up by indexing rather than ``Fn.embedding`` on GPUs:
# ``index_select``'s kernel for a few indices gives each block every index
# in turn. On one H100, in CUDA graphs, 16 rows of a 128256 x 4096 bf16
# table took 8.0 us that way and 1.7 by indexing (4 rows: 3.2 and 1.7); at
# one row embedding was the faster (2.0 and 2.9), from 64 rows even
# (results/real/README.md, 1f88207: ``scripts/embed-rows.py``).
EMBED_INDEX_ROWS = (2, 64)


class Embedding(nn.Embedding):
    """``nn.Embedding`` whose lookup of 2 to 64 tokens on a GPU indexes the
    table (``weight[ids]``, the same rows; :data:`EMBED_INDEX_ROWS`)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        low, high = EMBED_INDEX_ROWS
        if ids.is_cuda and low <= ids.numel() <= high and self.padding_idx is None \
                and self.max_norm is None:
            return self.weight[ids]
        return super().forward(ids)


class Attention(nn.Module):
    """Multi-head (or grouped-query) causal self-attention with fused QKV.

    Built with local sizes by tensor-parallel strategies: ``n_heads`` and
    ``n_kv_heads`` are the heads this module holds.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 rope: Rope | None = None, qkv_bias: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.rope = rope
        self.wqkv = Linear(d_model, (n_heads + 2 * n_kv_heads) * head_dim, bias=qkv_bias)
        self.wo = Linear(n_heads * head_dim, d_model, bias=False)

    def project(self, x: torch.Tensor):
        """``x [B, T, D]`` -> q ``[B, T, H, d]``, k, v ``[B, T, Hkv, d]``: views
        of the fused projection's output, before any rotary embedding."""
        B, T, _ = x.shape
        H, Hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.wqkv(x).split([H * d, Hkv * d, Hkv * d], dim=-1)
        return q.view(B, T, H, d), k.view(B, T, Hkv, d), v.view(B, T, Hkv, d)

    def qkv(self, x: torch.Tensor, pos, length: int | None = None):
        """:meth:`project` with the rotary embedding applied in place, at
        positions ``pos..pos+T`` (a device-tensor ``pos``: below ``length``)."""
        q, k, v = self.project(x)
        if self.rope is not None:
            rotate(self.rope, pos, q, k, length=length)
        return q, k, v

    def forward(self, x: torch.Tensor, cache: KVCache | None, pos: int) -> torch.Tensor:
        B, T, _ = x.shape
        if cache is not None:
            q, (k, v) = self._qkv_into_cache(x, cache, pos)  # [B, T, H, d]; [B, Hkv, pos+T, d]
            q = q.transpose(1, 2)
        else:
            q, k, v = self.qkv(x, pos)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H*, T, d]
        o = causal_attention(q, k, v, pos)  # [B, H, T, d]
        return self.wo(o.transpose(1, 2).reshape(B, T, -1))

    def _qkv_into_cache(self, x: torch.Tensor, cache: KVCache, pos):
        """Queries ``[B, T, H, d]``, with this step's keys and values stored
        in ``cache`` (rotated, with a rotary embedding). A long prompt runs
        the Q projection and, per sequence, the K/V projection with the
        cache's rows as its output, then rotates the queries and the cached
        keys in place; a short step runs the fused projection and stores K
        and V with one copy, or rotates and stores them in one kernel."""
        B, T, _ = x.shape
        H, d = self.n_heads, self.head_dim
        if isinstance(pos, int) and T >= DIRECT_CACHE_MIN_TOKENS:
            w_q, w_kv = self.wqkv.weight.split([H * d, 2 * self.n_kv_heads * d])
            b_q, b_kv = (None, None) if self.wqkv.bias is None else \
                self.wqkv.bias.split([H * d, 2 * self.n_kv_heads * d])
            q = Fn.linear(x, w_q, b_q).view(B, T, H, d)
            x = x.contiguous()
            for b in same_work(B):
                if b_kv is None:
                    torch.mm(x[b], w_kv.t(), out=cache.rows(b, pos, T))
                else:
                    torch.addmm(b_kv, x[b], w_kv.t(), out=cache.rows(b, pos, T))
            if self.rope is not None:
                rotate(self.rope, pos, q, cache.kv[:, pos : pos + T, 0])
            return q, cache.upto(pos + T)
        if self.rope is not None:
            q, k, v = self.project(x)
            return q, cache.write_rotated(self.rope, pos, q, k, v)
        qkv = self.wqkv(x)
        return qkv[..., : H * d].view(B, T, H, d), cache.write_packed(pos, qkv[..., H * d :])


@functools.cache
def _zeros(n: int, dtype, device) -> torch.Tensor:
    with made_once():
        return torch.zeros(n, dtype=dtype, device=device)


def up_projection(x: torch.Tensor, w_in: torch.Tensor, activation: str) -> torch.Tensor:
    """The MLP's first matrix and its activation: ``x [..., D]``, ``w_in
    [F or 2F, D]`` -> ``[..., F]``.

    ``gelu_tanh`` (the tanh form of GELU, as in GPT-2/3) on CUDA half
    precision runs as one cuBLASLt GEMM with the GELU in its epilogue, applied
    to the float32 accumulator before rounding: the ``[N, F]`` intermediate
    is written once instead of written, read and written again. SwiGLU's
    activation and product run as one kernel on GPUs (:func:`.kernels.swiglu`),
    or, for a decode step's few rows, in the GEMM's epilogue
    (:func:`.kernels.linear_swiglu`)."""
    if activation == "gelu_tanh" and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        shape = x.shape
        zero = _zeros(w_in.shape[0], x.dtype, x.device)  # the epilogue takes a bias
        h = torch._addmm_activation(zero, x.reshape(-1, shape[-1]), w_in.t(), use_gelu=True)
        return h.view(*shape[:-1], w_in.shape[0])
    if activation == "swiglu":
        return linear_swiglu(x, w_in)
    return activate(linear(x, w_in), activation)


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """The MLP's activation of an up-projection's output ``h [..., F or 2F]``."""
    if activation == "swiglu":
        return swiglu(h)
    return Fn.gelu(h, approximate="tanh" if activation == "gelu_tanh" else "none")


def grouped_expert_mlp(x: torch.Tensor, sizes: list[int], w_in: torch.Tensor,
                       w_down: torch.Tensor, activation: str) -> torch.Tensor:
    """Experts on rows grouped by expert: ``x [R, D]`` holds ``sizes[e]`` rows
    for local expert e, in expert order; ``w_in [El, (2)F, D]``,
    ``w_down [El, D, F]``. Returns ``[R, D]``: one matrix product per expert
    over its contiguous slice (the loop is over local experts, never tokens)."""
    out = torch.empty_like(x)
    start = 0
    for e, n in enumerate(sizes):
        if n:
            out[start : start + n] = expert_mlp(x[start : start + n], w_in[e], w_down[e],
                                                activation)
        start += n
    return out


def up_projections(x: torch.Tensor, w_in: torch.Tensor, activation: str) -> torch.Tensor:
    """:func:`up_projection` of ``x [N, D]`` through every expert of ``w_in
    [E, F or 2F, D]`` in one GEMM (the experts' rows stacked): ``[N, E, F]``."""
    E, rows, D = w_in.shape
    if activation == "swiglu":  # each expert's [gate; up] rows: its own halves
        return linear_swiglu(x, w_in.reshape(E * rows, D), groups=E).view(x.shape[0], E,
                                                                            rows // 2)
    return up_projection(x, w_in.reshape(E * rows, D), activation).view(x.shape[0], E, rows)


class MLP(nn.Module):
    """Two-matrix GELU MLP, or SwiGLU (gate and up fused in one matrix)."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu"):
        super().__init__()
        self.activation, self.d_ff = activation, d_ff
        n_in = 2 if activation == "swiglu" else 1
        self.w_in = Linear(d_model, n_in * d_ff, bias=False)  # [gate; up] for swiglu
        self.w_down = Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation == "swiglu":  # the activation where it costs no launch of its own
            return swiglu_mlp(x, self.w_in.weight, self.w_down.weight)
        return self.w_down(up_projection(x, self.w_in.weight, self.activation))


def router_logits(router: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Router scores ``[N, E]`` computed in fp32. In bf16 the logits are
    rounded to 8 bits, so many tokens have exact top-k ties, and a strategy
    whose input differs from the reference's by one rounding picks other
    experts; fp32 scores leave only genuine near-ties (E x D, cheap).

    On GPUs a half-precision ``x`` is multiplied as it is, by a GEMM that
    sums the (exact) products in fp32 and writes fp32 (``torch.mm``'s
    ``out_dtype``): the same sums in another order, with no fp32 copy of
    ``x`` (a Mixtral prompt of 24,000 tokens: 390 MB written and read again,
    and an fp32 GEMM, per layer)."""
    w = router.weight
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and w.dtype == x.dtype \
            and _MM_OUT_DTYPE:
        return torch.mm(x.reshape(-1, x.shape[-1]), w.t(),
                        out_dtype=torch.float32).view(*x.shape[:-1], w.shape[0])
    dtype = torch.promote_types(x.dtype, torch.float32)
    return Fn.linear(x.to(dtype), w.to(dtype))


# Whether this PyTorch has torch.mm(..., out_dtype=): a half-precision GEMM
# with an fp32 output (CUDA only).
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


def route(logits: torch.Tensor, top_k: int):
    """Softmax top-k router: ``logits [N, E]`` -> (weights [N, k], experts [N, k]).

    The softmax is taken over the chosen k logits (equivalently, top-k of the
    full softmax renormalised), in fp32, as in Mixtral."""
    top, idx = torch.topk(logits.float(), top_k, dim=-1)
    return torch.softmax(top, dim=-1), idx


def route_tokens(router: nn.Linear, x: torch.Tensor, top_k: int):
    """:func:`route` of :func:`router_logits`: ``x [N, D]`` -> (weights [N, k],
    experts [N, k]); a decode step's few tokens on a GPU in one kernel
    (:func:`.kernels.route_rows`: the same float32 sums in another order), a
    prompt's picks from its logits in one (:func:`.kernels.pick_top`)."""
    if routable(x, router.weight):
        return route_rows(x, router.weight, top_k)
    logits = router_logits(router, x)  # [N, E]
    return pick_top(logits, top_k) if pickable(logits) else route(logits, top_k)


def expert_mlp(x: torch.Tensor, w_in: torch.Tensor, w_down: torch.Tensor,
               activation: str) -> torch.Tensor:
    """One expert on its tokens: ``x [n, D]``, ``w_in [F or 2F, D]``, ``w_down [D, F]``.
    A group's rows are the routing's, so its products are GEMMs whatever
    their count (not :func:`.kernels.linear`'s kernels for a few rows): the
    kernels a prompt launches do not depend on where its tokens go, and a
    recorded step's are a real one's."""
    if activation == "gelu_tanh":  # the GELU in the GEMM's epilogue
        return up_projection(x, w_in, activation) @ w_down.t()
    return activate(Fn.linear(x, w_in), activation) @ w_down.t()


def grouped_gemm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` multiplies ``x`` by the experts' ``w``
    as one kernel with its group offsets on the device: bf16 on a Hopper or
    newer GPU (elsewhere PyTorch loops over the groups with the offsets read
    to the host). Rows in 16-byte units. Traced steps (meta tensors along
    the GPU branches) take it as a Hopper GPU would."""
    if not (x.is_cuda and x.dtype == torch.bfloat16 and w.dtype == x.dtype
            and hasattr(torch, "_grouped_mm") and x.shape[-1] % 8 == 0 and w.shape[-2] % 8 == 0):
        return False
    return x.device.type != "cuda" or _capability(x.device) >= (9, 0)


@functools.lru_cache(maxsize=None)
def _capability(device) -> tuple:
    return torch.cuda.get_device_capability(device)


# Whether a prompt's grouped expert products on GPUs (:meth:`MoE._grouped`)
# run shardwise's grouped kernel (:func:`.kernels.grouped_linear`: on Hopper
# ``grouped_tma_kernel``, SwiGLU in the up-projection's epilogue) rather than
# ``torch._grouped_mm``: the up-projection, the down-projection. On an H100
# at Mixtral-8x7b's widths (2 layers, a prompt of 1 x 2048 tokens replayed
# from a CUDA graph, interleaved runs) the step took 6.254 and 6.286 ms with
# the up-projection's kernel against 6.598 and 6.622 with
# ``torch._grouped_mm`` and the SwiGLU kernel, and 6.317 and 6.338 with the
# down-projection's kernel too, at a launch slower than
# :func:`.kernels.grouped_launch`'s (results/real/ab-prefill-mixtral-1x2048-3aef160.jsonl).
# Alone, the down-projection's best launch took 766 us a layer, where
# ``torch._grouped_mm`` took 771 (results/real/moe-grouped-layouts-b78ac47.jsonl).
GROUPED_UP = True
GROUPED_DOWN = False

# Tokens a call up to which MoE runs every expert it holds on every token,
# weighted by the routing (zero where a token did not pick the expert): no
# host synchronisation and shapes that do not depend on the routing, so a
# decode step can be captured in a CUDA graph. With batch x top_k routed rows
# nearly every expert is hit anyway, so its weights are read either way.
DENSE_MOE_MAX_TOKENS = 64


class MoE(nn.Module):
    """Dropless top-k Mixture-of-Experts MLP (every routed token is computed).

    It holds the router for all ``n_experts`` and the weights of experts
    ``first_expert .. first_expert + local_experts``; with all experts (the
    reference) the output is the full MoE, with a subset it is that subset's
    share of the sum (tensor-parallel strategies add the shares)."""

    def __init__(self, d_model: int, d_ff: int, n_experts: int, top_k: int,
                 activation: str = "gelu", first_expert: int = 0,
                 local_experts: int | None = None):
        super().__init__()
        self.top_k, self.activation = top_k, activation
        self.first_expert = first_expert
        local = n_experts if local_experts is None else local_experts
        n_in = 2 if activation == "swiglu" else 1
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.w_in = nn.Parameter(torch.empty(local, n_in * d_ff, d_model))
        self.w_down = nn.Parameter(torch.empty(local, d_model, d_ff))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        weights, experts = route_tokens(self.router, x, self.top_k)  # [N, k]
        if x.shape[0] <= DENSE_MOE_MAX_TOKENS:
            return self.static(x, weights, experts).view(shape)
        return self._routed(x, weights, experts).view(shape)

    def static(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor):
        """The held experts' share for ``x [N, D]`` routed to ``experts [N, k]``
        with no host synchronisation (a decode step, graph-capturable): each
        routed row through its own expert when there are fewer rows than held
        experts (:meth:`_sparse`, reading only those), else every held expert
        on every row (:meth:`_dense`, reading each expert once)."""
        if experts.numel() < self.w_in.shape[0]:
            return self._sparse(x, weights, experts)
        return self._dense(x, weights, experts)

    def _routed(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor):
        """Each held expert on the tokens that picked it: :meth:`_grouped` on
        GPUs that have the grouped GEMM when this module holds every expert,
        else the loop below. The (token, pick)
        pairs sorted by expert (stable: tokens in order), one host
        synchronisation for the counts that size the groups, one GEMM pair
        per expert on its contiguous rows (:func:`grouped_expert_mlp`), then
        each token's weighted terms (rounded) summed in float32 over its
        picks (the sum a running bf16 sum gives for two picks), gathered from
        the rows where the experts wrote them (:func:`.kernels.combine_picks`:
        one kernel on GPUs)."""
        if grouped_gemm_ok(x, self.w_in) and self.w_in.shape[0] == self.router.out_features:
            return self._grouped(x, weights, experts)
        N, k = experts.shape
        held = self.w_in.shape[0]
        local = experts.reshape(-1) - self.first_expert  # [N*k]
        key = torch.where((local >= 0) & (local < held), local, held)  # others sort last
        order = torch.argsort(key, stable=True)
        sizes = torch.bincount(key, minlength=held + 1)[:held].cpu().tolist()  # the host waits
        rows = order[: sum(sizes)]  # the held experts' (token, pick) pairs, by expert
        y = grouped_expert_mlp(x.index_select(0, rows // k), sizes, self.w_in, self.w_down,
                               self.activation)
        return combine_picks(y, weights, pick_rows(rows, N * k))

    def _grouped(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor):
        """:meth:`_routed` with no host synchronisation and two GEMM launches:
        the (token, pick) rows sorted by expert (:func:`.kernels.sort_picks`:
        a counting sort on GPUs), each expert's slice ending at an offset
        computed on the device, and every expert's product in
        one grouped GEMM (``torch._grouped_mm``: CUTLASS's on Hopper) for the
        up-projection and one for the down; then the weighted terms, summed
        in float32 over a token's picks, as in the loop."""
        # every expert is held here: [held] where each expert's rows end,
        # [N*k] the token of each sorted row and the row of each (token, pick)
        ends, src, pos = sort_picks(experts, self.w_in.shape[0])
        # [N*k, D], by expert: index_select's row copy, where x[src] runs an
        # element-wise indexing kernel
        rows = x.index_select(0, src)
        if GROUPED_UP and self.activation == "swiglu":  # the activation in its epilogue
            a = grouped_linear(rows, self.w_in, ends, gated=True)  # [N*k, F]
        else:
            a = activate(torch._grouped_mm(rows, self.w_in.transpose(1, 2), offs=ends),
                         self.activation)  # [N*k, F]
        if GROUPED_DOWN:
            y = grouped_linear(a, self.w_down, ends)  # [N*k, D]
        else:
            y = torch._grouped_mm(a, self.w_down.transpose(1, 2), offs=ends)
        return combine_picks(y, weights, pos)

    def _sparse(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor):
        """Fewer routed (token, pick) rows than held experts (a decode step at
        small batch): each row through its own expert, reading only the
        routed experts' weights (:func:`.kernels.expert_rows`), a row whose
        expert is not held here contributing zero; then the weighted terms,
        each rounded, summed in float32 over a token's picks, as in
        :meth:`_routed`. No host synchronisation: graph-capturable."""
        N, k = experts.shape
        h = expert_rows(x, self.w_in, experts, self.first_expert, k)  # [N*k, (2)F]
        gated = self.activation == "swiglu"  # silu(gate) * up as the GEMV loads it
        h = h if gated else activate(h, self.activation)
        y = expert_rows(h, self.w_down, experts, self.first_expert, 1, gated)  # [N*k, D]
        return combine_picks(y, weights)

    def _dense(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor):
        """Every held expert on every token ``x [N, D]``, weighted by its
        routing weight, which is 0 for the tokens that did not pick it: a
        token's terms are its picked experts' weighted outputs, each rounded,
        as in the loop over routed tokens; they are summed in float32 and
        rounded once (the loop's running sum for two picks). A few kernels
        whatever the experts: one product for every expert's up-projection
        and its activation (:func:`.kernels.linear_swiglu` over the stacked
        experts), one batched product down (:func:`.kernels.batched_linear`;
        both ``rows_kernel`` for 2 to 16 tokens on GPUs, where cuBLAS's GEMMs
        read the weights at 2.84-2.86 TB/s of an H100's 3.0:
        results/real/trace-mixtral-decode-16x4096-1686832.txt), the weighting
        and the sum."""
        held = self.w_in.shape[0]
        ids = torch.arange(self.first_expert, self.first_expert + held, device=x.device)
        # [N, held]: a token's weight for each held expert (top-k picks are distinct)
        gate = (weights[:, :, None] * (experts[:, :, None] == ids)).sum(1).to(x.dtype)
        h = up_projections(x, self.w_in, self.activation)  # [N, held, F]
        y = batched_linear(h.transpose(0, 1), self.w_down)  # [held, N, D]
        return (y * gate.t()[:, :, None]).sum(0)


class Block(nn.Module):
    """Pre-norm decoder layer: ``h = x + attn(norm(x)); y = h + mlp(norm(h))``."""

    def __init__(self, attn: nn.Module, mlp: nn.Module, attn_norm: nn.Module,
                 mlp_norm: nn.Module):
        super().__init__()
        self.attn_norm, self.attn, self.mlp_norm, self.mlp = attn_norm, attn, mlp_norm, mlp

    def forward(self, x: torch.Tensor, cache: KVCache | None, pos: int) -> torch.Tensor:
        h, m = self.residual_parts(x, None, cache, pos)
        return h + m

    def residual_parts(self, x: torch.Tensor, pending: torch.Tensor | None,
                       cache: KVCache | None, pos):
        """The layer on ``x + pending`` (``pending``: the previous layer's MLP
        output, not yet added), returned the same way: ``(h, mlp output)``.
        Each residual add runs in one kernel with the norm that follows it
        (``add_norm``); a stack of layers adds its last output at the end."""
        x, n = add_norm(self.attn_norm, x, pending)
        h, n = add_norm(self.mlp_norm, x, self.attn(n, cache, pos))
        return h, self.mlp(n)


def make_block(spec: ModelSpec, *, n_heads: int | None = None, n_kv_heads: int | None = None,
               d_ff: int | None = None, experts: range | None = None) -> Block:
    """A decoder layer with (possibly local) sizes; defaults are the full model's.
    ``experts`` is the contiguous range of experts held (MoE only)."""
    attn = Attention(spec.d_model, n_heads or spec.n_heads, n_kv_heads or spec.kv_heads,
                     spec.head_dim, Rope.of(spec), spec.qkv_bias)
    if spec.is_moe:
        experts = experts if experts is not None else range(spec.n_experts)
        mlp = MoE(spec.d_model, d_ff or spec.d_ff, spec.n_experts, spec.top_k,
                  spec.activation, experts.start, len(experts))
    else:
        mlp = MLP(spec.d_model, d_ff or spec.d_ff, spec.activation)
    return Block(attn, mlp, make_norm(spec), make_norm(spec))


class Transformer(nn.Module):
    """Embedding (if vocab), decoder layers, final norm, LM head (if vocab).

    ``forward(inputs, caches, pos)``: inputs are token ids ``[B, T]`` or hidden
    states ``[B, T, D]``; returns logits ``[B, T, V]`` or hidden ``[B, T, D]``.
    """

    def __init__(self, spec: ModelSpec, layers: Sequence[int] | None = None,
                 first: bool = True, last: bool = True, blocks: bool = True):
        super().__init__()
        self.spec = spec
        self.layer_ids = list(range(spec.n_layers) if layers is None else layers)
        self.first, self.last = first, last
        has_vocab = spec.vocab_size is not None
        # _weight skips reset_parameters (slow on meta); the loader fills it.
        self.embed = (Embedding(spec.vocab_size, spec.d_model,
                                   _weight=torch.empty(spec.vocab_size, spec.d_model))
                      if has_vocab and first else None)
        # blocks=False: the caller sets ``layers`` (a strategy's shards of them)
        self.layers = (build_layers(self.layer_ids, lambda _: make_block(spec)) if blocks
                       else nn.ModuleList())
        self.norm = make_norm(spec) if last else None
        self.lm_head = (Linear(spec.d_model, spec.vocab_size, bias=False)
                        if has_vocab and last else None)

    def forward(self, inputs: torch.Tensor, caches: Sequence[KVCache] | None = None,
                pos: int = 0) -> torch.Tensor:
        x = self.embed(inputs) if self.embed is not None else inputs
        pending = None  # the last layer's MLP output, added with the next norm
        with one_step(pos):
            for i, layer in enumerate(self.layers):
                cache = caches[i] if caches is not None else None
                if type(layer) is Block:
                    x, pending = layer.residual_parts(x, pending, cache, pos)
                else:
                    x = layer(x if pending is None else x + pending, cache, pos)
                    pending = None
        if self.norm is not None:
            x = add_norm(self.norm, x, pending)[1]
        elif pending is not None:
            x = x + pending
        if self.lm_head is not None:
            x = self.lm_head(x)
        return x

    def allocate_caches(self, batch: int, max_len: int) -> list[KVCache]:
        p = next(self.parameters())
        return [KVCache.allocate(batch, blk.attn.n_kv_heads, max_len, blk.attn.head_dim,
                                 p.dtype, p.device) for blk in self.layers]
