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


def distinct_experts(local: int, n_experts: int, top_k: int, tokens: float) -> float:
    """Expected number of ``local`` experts (of ``n_experts``) that receive at
    least one of ``tokens`` tokens, each routed to ``top_k`` distinct experts
    uniformly: a given expert is missed by a token with probability 1 - k/E."""
    if tokens <= 0:
        return 0.0
    return local * (1.0 - (1.0 - top_k / n_experts) ** tokens)


def decode_bytes(spec: ModelSpec, batch: int, ctx: int) -> int:
    """Fewest bytes one decode step must read: once each, the weights the step
    multiplies (every layer's attention, norms and router; of the experts,
    those the batch's ``batch x top_k`` picks reach, in expectation under
    uniform routing: top_k of them for one sequence, nearly all for many;
    the LM head), the embedding rows of the batch's tokens (not the table),
    and the KV cache of ``ctx`` positions."""
    per_layer = spec.attn_params() + spec.norm_params()
    if spec.is_moe:
        hit = distinct_experts(spec.n_experts, spec.n_experts, spec.top_k, batch)
        per_layer += hit * spec.expert_params() + spec.n_experts * spec.d_model
    else:
        per_layer += spec.expert_params()
    ends = spec.norm_params() // 2  # the final norm
    if spec.vocab_size is not None:
        ends += spec.vocab_size * spec.d_model  # the LM head (the tied table: read once)
        if not spec.tie_embeddings:
            ends += batch * spec.d_model  # the tokens' embedding rows
    weights = round(spec.n_layers * per_layer + ends) * dtype_bytes(spec.dtype)
    return weights + kv_bytes(spec, batch, ctx)
