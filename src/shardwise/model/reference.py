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
from .kernels import add_norm

# Prompts at least this long have their K/V projection written straight into
# the cache, one GEMM per sequence (each large enough to run at full rate).
DIRECT_CACHE_MIN_TOKENS = 1024

_DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


_STEP: dict | None = None  # index tensors of the step being run (see one_step)

# A loop whose iterations each do the same work (one per sequence of a batch)
# iterates ``same_work(n)``; a recorder of what a step does (shardwise.perf)
# replaces it to run one iteration and count it n times.
SAME_WORK = range


def same_work(n: int):
    return SAME_WORK(n)


@contextmanager
def one_step():
    """Scope of one forward step. Inside it, the index tensors derived from a
    device-tensor position (cache slots, the position mask) are built by the
    first layer that asks and shared by the others: in a static-shape decode
    step captured in a CUDA graph, that is a few kernels a step instead of a
    few a layer. Nested scopes share the outer one."""
    global _STEP
    outer = _STEP
    _STEP = {} if outer is None else outer
    try:
        yield
    finally:
        _STEP = outer


def _per_step(key: tuple, make):
    """``make()``, once per step for ``key`` (every call outside a step)."""
    if _STEP is None:
        return make()
    if key not in _STEP:
        _STEP[key] = make()
    return _STEP[key]


def _slots(pos: torch.Tensor, T: int, device) -> torch.Tensor:
    """Cache positions ``pos..pos+T`` for a device-tensor ``pos``, once a step."""
    return _per_step(("slots", id(pos), T, device), lambda: pos + torch.arange(T, device=device))


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


def rotary(x: torch.Tensor, pos, theta: float) -> torch.Tensor:
    """Rotary position embedding (Su et al. 2021), Hugging Face "rotate half"
    layout, on ``x [B, T, H, d]`` for absolute positions ``pos..pos+T``
    (``pos`` an int or a 0-d device tensor)."""
    B, T, H, d = x.shape
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    t = (pos + torch.arange(T, device=x.device)).to(torch.float32)
    ang = torch.outer(t, inv)  # [T, d/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[None, :, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[None, :, None, :]
    xf = x.float()
    x1, x2 = xf[..., : d // 2], xf[..., d // 2 :]
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def causal_attention(q, k, v, q_start) -> torch.Tensor:
    """Softmax attention of ``q [B, H, T, d]`` (absolute positions
    ``q_start..q_start+T``) over ``k, v [B, Hkv, S, d]`` (positions ``0..S``),
    each query seeing keys at positions <= its own. Returns ``[B, H, T, d]``.
    ``q_start`` may be a 0-d device tensor (static-shape decode)."""
    T, S = q.shape[2], k.shape[2]
    gqa = q.shape[1] != k.shape[1]
    if isinstance(q_start, torch.Tensor):
        def make_mask():
            q_pos = q_start + torch.arange(T, device=q.device)
            seen = torch.arange(S, device=q.device)[None, :] <= q_pos[:, None]  # [T, S]
            # Additive (0 / -inf), once a step: SDPA turns a boolean mask into
            # this form on every call, a few kernels a layer.
            return torch.zeros(T, S, dtype=q.dtype, device=q.device).masked_fill_(
                ~seen, float("-inf"))

        mask = _per_step(("mask", id(q_start), T, S, q.dtype, q.device), make_mask)
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


class Attention(nn.Module):
    """Multi-head (or grouped-query) causal self-attention with fused QKV.

    Built with local sizes by tensor-parallel strategies: ``n_heads`` and
    ``n_kv_heads`` are the heads this module holds.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int,
                 rope_theta: float | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.rope_theta = rope_theta
        self.wqkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * head_dim, bias=False)
        self.wo = nn.Linear(n_heads * head_dim, d_model, bias=False)

    def qkv(self, x: torch.Tensor, pos: int):
        """``x [B, T, D]`` -> q ``[B, T, H, d]``, k, v ``[B, T, Hkv, d]``."""
        B, T, _ = x.shape
        H, Hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.wqkv(x).split([H * d, Hkv * d, Hkv * d], dim=-1)
        q, k, v = q.view(B, T, H, d), k.view(B, T, Hkv, d), v.view(B, T, Hkv, d)
        if self.rope_theta is not None:
            q, k = rotary(q, pos, self.rope_theta), rotary(k, pos, self.rope_theta)
        return q, k, v

    def forward(self, x: torch.Tensor, cache: KVCache | None, pos: int) -> torch.Tensor:
        B, T, _ = x.shape
        if cache is not None and self.rope_theta is None:
            q, (k, v) = self._qkv_into_cache(x, cache, pos)  # [B, T, H, d]; [B, Hkv, pos+T, d]
            q = q.transpose(1, 2)
        else:
            q, k, v = self.qkv(x, pos)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H*, T, d]
            if cache is not None:
                k, v = cache.write(pos, k, v)  # [B, Hkv, pos+T, d]
        o = causal_attention(q, k, v, pos)  # [B, H, T, d]
        return self.wo(o.transpose(1, 2).reshape(B, T, -1))

    def _qkv_into_cache(self, x: torch.Tensor, cache: KVCache, pos):
        """Queries ``[B, T, H, d]``, with this step's keys and values stored
        in ``cache`` (no rotary embedding). A long prompt runs the Q
        projection and, per sequence, the K/V projection with the cache's
        rows as its output; a short step runs the fused projection and stores
        K and V with one copy."""
        B, T, _ = x.shape
        H, d = self.n_heads, self.head_dim
        if isinstance(pos, int) and T >= DIRECT_CACHE_MIN_TOKENS:
            w_q, w_kv = self.wqkv.weight.split([H * d, 2 * self.n_kv_heads * d])
            q = Fn.linear(x, w_q)
            x = x.contiguous()
            for b in same_work(B):
                torch.mm(x[b], w_kv.t(), out=cache.rows(b, pos, T))
            return q.view(B, T, H, d), cache.upto(pos + T)
        qkv = self.wqkv(x)
        return qkv[..., : H * d].view(B, T, H, d), cache.write_packed(pos, qkv[..., H * d :])


@functools.cache
def _zeros(n: int, dtype, device) -> torch.Tensor:
    return torch.zeros(n, dtype=dtype, device=device)


def up_projection(x: torch.Tensor, w_in: torch.Tensor, activation: str) -> torch.Tensor:
    """The MLP's first matrix and its activation: ``x [..., D]``, ``w_in
    [F or 2F, D]`` -> ``[..., F]``.

    ``gelu_tanh`` (the tanh form of GELU, as in GPT-2/3) on CUDA half
    precision runs as one cuBLASLt GEMM with the GELU in its epilogue, applied
    to the float32 accumulator before rounding: the ``[N, F]`` intermediate
    is written once instead of written, read and written again."""
    if activation == "gelu_tanh" and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        shape = x.shape
        zero = _zeros(w_in.shape[0], x.dtype, x.device)  # the epilogue takes a bias
        h = torch._addmm_activation(zero, x.reshape(-1, shape[-1]), w_in.t(), use_gelu=True)
        return h.view(*shape[:-1], w_in.shape[0])
    h = Fn.linear(x, w_in)
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return Fn.silu(gate) * up
    return Fn.gelu(h, approximate="tanh" if activation == "gelu_tanh" else "none")


class MLP(nn.Module):
    """Two-matrix GELU MLP, or SwiGLU (gate and up fused in one matrix)."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu"):
        super().__init__()
        self.activation, self.d_ff = activation, d_ff
        n_in = 2 if activation == "swiglu" else 1
        self.w_in = nn.Linear(d_model, n_in * d_ff, bias=False)  # [gate; up] for swiglu
        self.w_down = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_down(up_projection(x, self.w_in.weight, self.activation))


def router_logits(router: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Router scores ``[N, E]`` computed in fp32. In bf16 the logits are
    rounded to 8 bits, so many tokens have exact top-k ties, and a strategy
    whose input differs from the reference's by one rounding picks other
    experts; fp32 scores leave only genuine near-ties (E x D, cheap)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return Fn.linear(x.to(dtype), router.weight.to(dtype))


def route(logits: torch.Tensor, top_k: int):
    """Softmax top-k router: ``logits [N, E]`` -> (weights [N, k], experts [N, k]).

    The softmax is taken over the chosen k logits (equivalently, top-k of the
    full softmax renormalised), in fp32, as in Mixtral."""
    top, idx = torch.topk(logits.float(), top_k, dim=-1)
    return torch.softmax(top, dim=-1), idx


def expert_mlp(x: torch.Tensor, w_in: torch.Tensor, w_down: torch.Tensor,
               activation: str) -> torch.Tensor:
    """One expert on its tokens: ``x [n, D]``, ``w_in [F or 2F, D]``, ``w_down [D, F]``."""
    return up_projection(x, w_in, activation) @ w_down.t()


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
        weights, experts = route(router_logits(self.router, x), self.top_k)  # [N, k]
        if x.shape[0] <= DENSE_MOE_MAX_TOKENS:
            return self._dense(x, weights, experts).view(shape)
        out = torch.zeros_like(x)
        for e in range(self.w_in.shape[0]):
            token, slot = torch.nonzero(experts == self.first_expert + e, as_tuple=True)
            if token.numel():
                y = expert_mlp(x[token], self.w_in[e], self.w_down[e], self.activation)
                out.index_add_(0, token, y * weights[token, slot, None].to(y.dtype))
        return out.view(shape)

    def _dense(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor):
        """Every held expert on every token ``x [N, D]``, added in expert order
        with its routing weight, which is 0 for the tokens that did not pick
        it: each token gets the same terms, rounded and added in the same
        order, as the loop over routed tokens."""
        held = self.w_in.shape[0]
        ids = torch.arange(self.first_expert, self.first_expert + held, device=x.device)
        # [N, held]: a token's weight for each held expert (top-k picks are distinct)
        gate = (weights[:, :, None] * (experts[:, :, None] == ids)).sum(1).to(x.dtype)
        out = torch.zeros_like(x)
        for e in range(held):
            y = expert_mlp(x, self.w_in[e], self.w_down[e], self.activation)
            out += y * gate[:, e, None]
        return out


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
                     spec.head_dim, spec.rope_theta)
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
                 first: bool = True, last: bool = True):
        super().__init__()
        self.spec = spec
        self.layer_ids = list(range(spec.n_layers) if layers is None else layers)
        self.first, self.last = first, last
        has_vocab = spec.vocab_size is not None
        # _weight skips reset_parameters (slow on meta); the loader fills it.
        self.embed = (nn.Embedding(spec.vocab_size, spec.d_model,
                                   _weight=torch.empty(spec.vocab_size, spec.d_model))
                      if has_vocab and first else None)
        self.layers = nn.ModuleList(make_block(spec) for _ in self.layer_ids)
        self.norm = make_norm(spec) if last else None
        self.lm_head = (nn.Linear(spec.d_model, spec.vocab_size, bias=False)
                        if has_vocab and last else None)

    def forward(self, inputs: torch.Tensor, caches: Sequence[KVCache] | None = None,
                pos: int = 0) -> torch.Tensor:
        x = self.embed(inputs) if self.embed is not None else inputs
        pending = None  # the last layer's MLP output, added with the next norm
        with one_step():
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
