"""Deterministic synthetic weights that any rank can slice without the whole.

Every element of every parameter is a pure function of (seed, parameter name,
element index): a counter-based hash (no generator state), computed with
int64 arithmetic that never overflows, so CPU and CUDA produce bit-identical
values. A rank asks for the rows and columns it holds and only those are
computed; the 30B preset never materialises a full layer anywhere.

Values are uniform with the standard deviation the parameter table gives
(1/sqrt(fan_in) for projections), so activations stay O(1) through the layers.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..spec import ModelSpec

_MASK32 = 0xFFFFFFFF
# Both multipliers are < 2**31, so (x < 2**32) * M < 2**63: no int64 overflow
# on any device, hence identical results on CPU and CUDA.
_M1 = 0x7FEB352D
_M2 = 0x5BD1E995
_CHUNK = 1 << 22  # elements hashed at a time (bounds the int64 temporaries)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * _M1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _M2) & _MASK32
    return x ^ (x >> 16)


def _key(seed: int, name: str) -> tuple[int, int]:
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def uniform_at(seed: int, name: str, flat_index: torch.Tensor) -> torch.Tensor:
    """U(-1, 1) in fp32 at the given flat element indices (any device)."""
    k1, k2 = _key(seed, name)
    lo = flat_index & _MASK32
    hi = flat_index >> 32
    h = _mix32(_mix32(lo ^ k1) ^ ((hi + k2) & _MASK32))
    u = ((h >> 8).to(torch.float32) + 0.5) * (2.0**-24)  # 24 bits: exact in fp32
    return u * 2.0 - 1.0


def generate(
    seed: int,
    name: str,
    shape: Sequence[int],
    index: Sequence[torch.Tensor | slice | None] | None = None,
    *,
    scale: float = 1.0,
    offset: float = 0.0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Slice ``[index]`` of the parameter ``name`` of full ``shape``.

    ``index`` holds, per dimension, a 1-D LongTensor of positions, a slice, or
    None (all). The result is ``offset + scale * U(-1, 1)``, computed only for
    the selected elements, on ``device``.
    """
    shape = tuple(int(s) for s in shape)
    index = list(index or [])
    index += [None] * (len(shape) - len(index))
    device = torch.device(device)
    positions = []
    for dim, (size, sel) in enumerate(zip(shape, index)):
        if sel is None:
            sel = torch.arange(size, device=device)
        elif isinstance(sel, slice):
            sel = torch.arange(size, device=device)[sel]
        else:
            sel = torch.as_tensor(sel, dtype=torch.long)  # checked where it was made (CPU)
            if sel.numel() and not sel.is_meta and (int(sel.min()) < 0 or int(sel.max()) >= size):
                raise IndexError(f"{name}: index out of range for dim {dim} of size {size}")
            sel = sel.to(device)
        positions.append(sel)
    strides = [math.prod(shape[d + 1 :]) for d in range(len(shape))]
    out_shape = [p.numel() for p in positions]
    out = torch.empty(out_shape, dtype=dtype, device=device)
    if out.numel() == 0:
        return out
    if not shape:
        flat = torch.zeros((), dtype=torch.long, device=device)
        return (offset + scale * uniform_at(seed, name, flat)).to(dtype)
    # The first dimension is processed in chunks so temporaries stay small.
    inner = [p * s for p, s in zip(positions[1:], strides[1:])]
    inner_flat = torch.zeros((), dtype=torch.long, device=device)
    for d, term in enumerate(inner):
        inner_flat = inner_flat.unsqueeze(-1) + term.view(*([1] * d), -1)
    inner_numel = max(1, inner_flat.numel())
    rows_per_chunk = max(1, _CHUNK // inner_numel)
    first = positions[0] * strides[0]
    for r0 in range(0, first.numel(), rows_per_chunk):
        rows = first[r0 : r0 + rows_per_chunk]
        flat = rows.view(-1, *([1] * inner_flat.dim())) + inner_flat
        out[r0 : r0 + rows.numel()] = (offset + scale * uniform_at(seed, name, flat)).to(dtype)
    return out


@dataclass(frozen=True)
class ParamInfo:
    """A global parameter: its full shape and how its values are drawn."""

    shape: tuple[int, ...]
    scale: float  # half-width of the uniform distribution
    offset: float = 0.0


def _proj(out_features: int, in_features: int) -> ParamInfo:
    # Uniform(-a, a) has std a/sqrt(3); std 1/sqrt(fan_in) keeps activations O(1).
    return ParamInfo((out_features, in_features), math.sqrt(3.0 / in_features))


def _norm_params(prefix: str, spec: ModelSpec) -> dict[str, ParamInfo]:
    # Not exactly one and zero, so a test notices a norm that is skipped or misplaced.
    params = {f"{prefix}.weight": ParamInfo((spec.d_model,), 0.1, 1.0)}
    if spec.norm == "layernorm":
        params[f"{prefix}.bias"] = ParamInfo((spec.d_model,), 0.1)
    return params


def layer_param_table(spec: ModelSpec, layer: int) -> dict[str, ParamInfo]:
    """Every parameter of one decoder layer, with the global name and shape.

    Linear weights are stored ``[out_features, in_features]`` as in ``nn.Linear``
    and Hugging Face checkpoints.
    """
    D, H, Hkv, d, F = spec.d_model, spec.n_heads, spec.kv_heads, spec.head_dim, spec.d_ff
    p = f"layers.{layer}"
    t = {}
    t.update(_norm_params(f"{p}.attn_norm", spec))
    t[f"{p}.attn.wq"] = _proj(H * d, D)
    t[f"{p}.attn.wk"] = _proj(Hkv * d, D)
    t[f"{p}.attn.wv"] = _proj(Hkv * d, D)
    t[f"{p}.attn.wo"] = _proj(D, H * d)
    if spec.qkv_bias:
        t[f"{p}.attn.bq"] = ParamInfo((H * d,), 0.1)
        t[f"{p}.attn.bk"] = ParamInfo((Hkv * d,), 0.1)
        t[f"{p}.attn.bv"] = ParamInfo((Hkv * d,), 0.1)
    t.update(_norm_params(f"{p}.mlp_norm", spec))
    if spec.is_moe:
        E = spec.n_experts
        t[f"{p}.moe.router"] = _proj(E, D)
        up = _proj(F, D)
        down = _proj(D, F)
        t[f"{p}.moe.w_up"] = ParamInfo((E, F, D), up.scale)
        if spec.activation == "swiglu":
            t[f"{p}.moe.w_gate"] = ParamInfo((E, F, D), up.scale)
        t[f"{p}.moe.w_down"] = ParamInfo((E, D, F), down.scale)
    else:
        t[f"{p}.mlp.w_up"] = _proj(F, D)
        if spec.activation == "swiglu":
            t[f"{p}.mlp.w_gate"] = _proj(F, D)
        t[f"{p}.mlp.w_down"] = _proj(D, F)
    return t


def param_table(spec: ModelSpec) -> dict[str, ParamInfo]:
    """Every parameter of the model, by global name."""
    t: dict[str, ParamInfo] = {}
    if spec.vocab_size is not None:
        t["embed.weight"] = ParamInfo((spec.vocab_size, spec.d_model), 1.0)
    for i in range(spec.n_layers):
        t.update(layer_param_table(spec, i))
    t.update(_norm_params("norm", spec))
    if spec.vocab_size is not None and not spec.tie_embeddings:
        t["lm_head.weight"] = _proj(spec.vocab_size, spec.d_model)
    return t


def lm_head_name(spec: ModelSpec) -> str:
    """The parameter the LM head reads: its own, or the embedding when tied."""
    return "embed.weight" if spec.tie_embeddings else "lm_head.weight"


class WeightSource:
    """Where a rank gets the slices it holds: ``source.get(name, index)``.

    The synthetic source computes them from the seed; a checkpoint source
    (safetensors) reads them from disk. Both give the same names and shapes.
    """

    def __init__(self, spec: ModelSpec, seed: int = 0):
        self.spec = spec
        self.seed = seed
        self.table = param_table(spec)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.table[name].shape

    def get(
        self,
        name: str,
        index: Sequence[torch.Tensor | slice | None] | None = None,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> torch.Tensor:
        info = self.table[name]
        return generate(
            self.seed, name, info.shape, index,
            scale=info.scale, offset=info.offset, dtype=dtype, device=device,
        )


def make_inputs(spec: ModelSpec, batch: int, seq_len: int, decode_steps: int, seed: int,
                dtype: torch.dtype, device, block: int | None = None
                ) -> tuple[torch.Tensor | Rows, list[torch.Tensor]]:
    """The prompt and the decode-step inputs, identical on every rank.

    Hidden-state models get U(-1,1)*sqrt(3) vectors (unit variance); models
    with a vocabulary get token ids. Decode inputs are fixed in advance
    (teacher forcing), so a strategy and the reference see the same tokens.
    ``block``: the prompt as a timed run hands it over, :class:`Rows` of its
    first ``block`` sequences (the most one call of the first stage takes).
    """
    name = f"inputs/{batch}x{seq_len}+{decode_steps}"
    shape = (batch, seq_len + decode_steps)

    def make(index):
        if spec.vocab_size is None:
            return generate(seed, name, (*shape, spec.d_model), index, scale=math.sqrt(3.0),
                            dtype=dtype, device=device)
        u = generate(seed, name, shape, index, dtype=torch.float64, device=device)
        return ((u + 1) / 2 * spec.vocab_size).long().clamp_(0, spec.vocab_size - 1)

    rows = slice(0, batch if block is None else min(block, batch))
    prompt = make([rows, slice(0, seq_len)])
    if block is not None:
        prompt = Rows(prompt, (batch, seq_len, *prompt.shape[2:]))
    steps = [make([None, slice(seq_len + t, seq_len + t + 1)]) for t in range(decode_steps)]
    return prompt, steps


class Rows:
    """A prompt ``[B, T, ...]`` handed over a block of sequences at a time,
    as a timed run hands it: the first stage of a pipeline takes a
    micro-batch's rows when it runs it (:func:`take_rows`), so no rank holds
    the batch's inputs (the hidden states a model without a vocabulary takes
    stand for what an embedding makes of a micro-batch's token ids). Every
    block of ``n`` sequences is the prompt's first ``n`` (a view of
    ``block``): a timing needs their shapes, and verification hands the
    whole prompt as a tensor instead. ``taken``: whether a step took rows."""

    def __init__(self, block: torch.Tensor, shape: tuple[int, ...]):
        self.block, self.shape, self.taken = block, tuple(shape), False
        self.dtype, self.device = block.dtype, block.device

    @property
    def nbytes(self) -> int:
        return self.block.nbytes

    def take(self, b0: int, b1: int) -> torch.Tensor:
        n = b1 - b0
        if n > self.block.shape[0]:
            raise ValueError(f"a block of {self.block.shape[0]} sequences was handed over, "
                             f"a step took {n}")
        self.taken = True
        return self.block if n == self.block.shape[0] else self.block[:n]


def take_rows(inputs: torch.Tensor | Rows, b0: int, b1: int) -> torch.Tensor:
    """Sequences ``b0:b1`` of a step's inputs (a tensor or :class:`Rows`)."""
    if isinstance(inputs, Rows):
        return inputs.take(b0, b1)
    return inputs if (b0, b1) == (0, inputs.shape[0]) else inputs[b0:b1]
