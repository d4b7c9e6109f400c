"""Model FLOPs and bytes a step must move: the numerators of MFU and of the
HBM floor.

MFU follows the usual convention (PaLM, Chowdhery et al. 2022, appendix B):
model FLOPs only (matmuls and attention scores/values), no recomputation.
Per token and layer: 2 x (parameters touched by a matmul) for the Q/K/V/O
projections and the MLP (top_k experts for MoE, plus the router), and
4 x H x d x ctx for attention, where ctx is the number of keys the token
attends to: (L + 1) / 2 on average under causal prefill, the whole cache in
decode.
"""
from __future__ import annotations

from ..spec import ModelSpec, dtype_bytes


def matmul_flops_per_token(spec: ModelSpec) -> float:
    attn = 2 * spec.attn_params()
    if spec.is_moe:
        mlp = 2 * (spec.top_k * spec.expert_params() + spec.n_experts * spec.d_model)
    else:
        mlp = 2 * spec.expert_params()
    head = 2 * spec.d_model * spec.vocab_size if spec.vocab_size else 0
    return spec.n_layers * (attn + mlp) + head


def attention_flops_per_token(spec: ModelSpec, ctx: float) -> float:
    return spec.n_layers * 4 * spec.n_heads * spec.head_dim * ctx


def prefill_flops(spec: ModelSpec, batch: int, seq_len: int) -> float:
    ctx = (seq_len + 1) / 2
    return batch * seq_len * (matmul_flops_per_token(spec) + attention_flops_per_token(spec, ctx))


def decode_flops(spec: ModelSpec, batch: int, ctx: int) -> float:
    return batch * (matmul_flops_per_token(spec) + attention_flops_per_token(spec, ctx))


def weight_bytes(spec: ModelSpec) -> int:
    return spec.total_params() * dtype_bytes(spec.dtype)


def kv_bytes(spec: ModelSpec, batch: int, ctx: int) -> int:
    return 2 * spec.n_layers * batch * ctx * spec.kv_heads * spec.head_dim * dtype_bytes(spec.dtype)


def decode_bytes(spec: ModelSpec, batch: int, ctx: int) -> int:
    """Fewest bytes one decode step must read: every weight once (all experts:
    with batch x top_k routed tokens nearly every expert is hit) and the KV
    cache of ``ctx`` positions."""
    return weight_bytes(spec) + kv_bytes(spec, batch, ctx)
