"""Fill (local-sized) reference modules with the slices a rank holds.

Modules are built on the ``meta`` device (no memory), then each parameter is
replaced by the slice the rank holds, read from a :class:`WeightSource`.
A tensor-parallel rank asks for its heads and its d_ff columns; the
reference asks for everything. Index tensors name *global* positions.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .reference import Attention, Block, MLP, MoE, Transformer
from .weights import WeightSource, lm_head_name


def head_rows(heads: Sequence[int] | torch.Tensor, head_dim: int,
              dims: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
    """Row indices of heads ``heads`` (restricted to ``dims`` of each head) in a
    ``[H*d, ...]`` projection, head-major: ``[h0 dims..., h1 dims..., ...]``."""
    heads = torch.as_tensor(heads, dtype=torch.long)
    dims = torch.arange(head_dim) if dims is None else torch.as_tensor(dims, dtype=torch.long)
    return (heads[:, None] * head_dim + dims[None, :]).reshape(-1)


def set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    setattr(module, name, nn.Parameter(value, requires_grad=False))


class ShardLoader:
    """Reads parameter slices of one model in one dtype onto one device."""

    def __init__(self, source: WeightSource, dtype: torch.dtype, device):
        self.source, self.dtype, self.device = source, dtype, torch.device(device)
        self.spec = source.spec

    def get(self, name: str, index=None) -> torch.Tensor:
        return self.source.get(name, index, dtype=self.dtype, device=self.device)

    # -- attention --------------------------------------------------------
    def qkv(self, layer: int, q_rows: torch.Tensor | None, kv_rows: torch.Tensor | None):
        """Fused ``[wq[q_rows]; wk[kv_rows]; wv[kv_rows]]``: ``[nq + 2*nkv, D]``."""
        p = f"layers.{layer}.attn"
        return torch.cat([self.get(f"{p}.wq", [q_rows]), self.get(f"{p}.wk", [kv_rows]),
                          self.get(f"{p}.wv", [kv_rows])])

    def qkv_bias(self, layer: int, q_rows: torch.Tensor | None,
                 kv_rows: torch.Tensor | None) -> torch.Tensor:
        """Fused ``[bq[q_rows]; bk[kv_rows]; bv[kv_rows]]`` (models with q/k/v biases)."""
        p = f"layers.{layer}.attn"
        return torch.cat([self.get(f"{p}.bq", [q_rows]), self.get(f"{p}.bk", [kv_rows]),
                          self.get(f"{p}.bv", [kv_rows])])

    def load_qkv(self, attn: Attention, layer: int, q_rows: torch.Tensor | None,
                 kv_rows: torch.Tensor | None) -> None:
        """Fill ``attn.wqkv`` (and its bias, where the model has one) with the given rows."""
        set_param(attn.wqkv, "weight", self.qkv(layer, q_rows, kv_rows))
        if self.spec.qkv_bias:
            set_param(attn.wqkv, "bias", self.qkv_bias(layer, q_rows, kv_rows))

    def lm_head(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of the LM head (the embedding's, when the model ties them)."""
        return self.get(lm_head_name(self.spec), [rows])

    def wo(self, layer: int, q_rows: torch.Tensor | None, out_rows=None) -> torch.Tensor:
        """``wo[out_rows, q_rows]``: ``[D or len(out_rows), nq]``."""
        return self.get(f"layers.{layer}.attn.wo", [out_rows, q_rows])

    # -- MLP --------------------------------------------------------------
    def mlp_in(self, layer: int, ff: torch.Tensor | None) -> torch.Tensor:
        """``[w_gate[ff]; w_up[ff]]`` for SwiGLU, ``w_up[ff]`` for GELU: ``[(2)nf, D]``."""
        p = f"layers.{layer}.mlp"
        up = self.get(f"{p}.w_up", [ff])
        if self.spec.activation == "swiglu":
            return torch.cat([self.get(f"{p}.w_gate", [ff]), up])
        return up

    def mlp_down(self, layer: int, ff: torch.Tensor | None) -> torch.Tensor:
        return self.get(f"layers.{layer}.mlp.w_down", [None, ff])

    def moe_in(self, layer: int, experts: torch.Tensor | None, ff: torch.Tensor | None = None):
        """``[E_local, (2)nf, D]``: per expert, gate rows then up rows for SwiGLU."""
        p = f"layers.{layer}.moe"
        up = self.get(f"{p}.w_up", [experts, ff])
        if self.spec.activation == "swiglu":
            return torch.cat([self.get(f"{p}.w_gate", [experts, ff]), up], dim=1)
        return up

    def moe_down(self, layer: int, experts: torch.Tensor | None, ff: torch.Tensor | None = None):
        return self.get(f"layers.{layer}.moe.w_down", [experts, None, ff])

    def norm(self, module: nn.Module, prefix: str) -> None:
        set_param(module, "weight", self.get(f"{prefix}.weight"))
        if isinstance(module, nn.LayerNorm):
            set_param(module, "bias", self.get(f"{prefix}.bias"))

    # -- whole modules ----------------------------------------------------
    def load_block(self, block: Block, layer: int, *, q_heads=None, kv_heads=None,
                   ff=None, experts=None) -> Block:
        """Fill ``block`` with the given heads / d_ff positions / experts (None: all)."""
        d = self.spec.head_dim
        q_rows = None if q_heads is None else head_rows(q_heads, d)
        kv_rows = None if kv_heads is None else head_rows(kv_heads, d)
        attn: Attention = block.attn
        self.load_qkv(attn, layer, q_rows, kv_rows)
        set_param(attn.wo, "weight", self.wo(layer, q_rows))
        self.norm(block.attn_norm, f"layers.{layer}.attn_norm")
        self.norm(block.mlp_norm, f"layers.{layer}.mlp_norm")
        mlp = block.mlp
        ff = None if ff is None else torch.as_tensor(ff, dtype=torch.long)
        if isinstance(mlp, MoE):
            ex = None if experts is None else torch.as_tensor(experts, dtype=torch.long)
            set_param(mlp.router, "weight", self.get(f"layers.{layer}.moe.router"))
            set_param(mlp, "w_in", self.moe_in(layer, ex, ff))
            set_param(mlp, "w_down", self.moe_down(layer, ex, ff))
        else:
            assert isinstance(mlp, MLP)
            set_param(mlp.w_in, "weight", self.mlp_in(layer, ff))
            set_param(mlp.w_down, "weight", self.mlp_down(layer, ff))
        return block

    def load_transformer(self, model: Transformer) -> Transformer:
        """Fill every (full-sized) layer of ``model`` and its ends."""
        for blk, layer in zip(model.layers, model.layer_ids):
            self.load_block(blk, layer)
        return self.load_ends(model)

    def load_ends(self, model: Transformer) -> Transformer:
        """Fill the embedding, final norm and LM head that ``model`` holds."""
        if model.embed is not None:
            set_param(model.embed, "weight", self.get("embed.weight"))
        if model.norm is not None:
            self.norm(model.norm, "norm")
        if model.lm_head is not None:
            if self.spec.tie_embeddings and model.embed is not None:
                model.lm_head.weight = model.embed.weight  # one tensor, as the model ties them
            else:
                set_param(model.lm_head, "weight", self.lm_head())
        return model


def build_reference(source: WeightSource, dtype: torch.dtype, device,
                    layers: Sequence[int] | None = None, first: bool = True,
                    last: bool = True) -> Transformer:
    """The reference model (or a contiguous range of its layers), built on
    ``meta`` and filled from ``source`` without a float32 detour."""
    with torch.device("meta"):
        model = Transformer(source.spec, layers, first, last)
    return ShardLoader(source, dtype, device).load_transformer(model).eval()
