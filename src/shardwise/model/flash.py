"""Flash attention for wide heads (head_dim 256 and 512) on GPUs, with the
log-sum-exp; everything else keeps PyTorch's kernels.

PyTorch has no fast kernel for head_dim 512: its flash and cuDNN backends
refuse the width and the memory-efficient kernel reaches about a fifth of
what head_dim 128 does. :func:`attend` runs :mod:`.triton_flash` (Triton);
:func:`wide_ok` says where, from what was measured against PyTorch's
kernels on the same GPU (``scripts/attn-wide.py``, results/flash/README.md):

* head_dim 512: every call of two or more queries (the causal prefill at
  2.8x SDPA's memory-efficient kernel on an H100, a chunk at a query offset
  at 2.6x);
* head_dim 256: a chunk at a query offset (SDPA takes an explicit mask
  there, the memory-efficient kernel: 2.0x) and ``attend_lse``'s blocks
  (which call FlashAttention-2: 1.8x); not the plain causal prefill, where
  SDPA runs cuDNN's kernel, 1.4x this one;
* one query (a decode step) keeps PyTorch's kernels at both widths:
  FlashAttention-2 splits the keys over programs, this kernel does not.

Callers: the reference's ``causal_attention`` (every strategy's prefill
and eager decode) and ``parallel.lse.attend_lse`` (ring's blocks,
sequence-sharded decode). CPU tensors and other shapes take their present
path.

``attend(q, k, v, q_start, causal)``: ``q [B, H, T, d]`` at absolute
positions ``q_start .. q_start + T`` over ``k, v [B, Hkv, S, d]`` at
positions ``0 .. S`` (``causal``: a query sees the keys at or before its
position; else all of them). Returns ``o [B, H, T, d]`` in q's dtype and
``lse [B, H, T]`` (natural log, float32), as ``attend_lse`` does. Q, K and
V are read in place where their rows are contiguous and 16-byte aligned
(the KV cache's views, ring's travelling block), else copied first;
grouped-query heads read each K/V head once.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from .kernels import triton_kernel


@dataclass(frozen=True)
class Config:
    """A kernel's tiles: query rows and keys per step, output columns per
    program (``dv`` < head_dim splits them over programs, each computing the
    scores), warps, pipeline stages; and whether the plain causal prefill
    (queries and keys from position 0) takes this kernel over SDPA's."""

    block_m: int
    block_n: int
    dv: int
    warps: int
    stages: int
    plain_causal: bool = True


# The fastest tiles of scripts/attn-wide.py's sweep at length 16384
# (results/flash). At head_dim 512 a 128-row float32 output does not fit the
# registers: its columns are split over two programs.
CONFIGS: dict[int, Config] = {
    256: Config(block_m=128, block_n=64, dv=256, warps=8, stages=2, plain_causal=False),
    512: Config(block_m=128, block_n=64, dv=256, warps=8, stages=1),
}

_HALF = (torch.float16, torch.bfloat16)
_MAX_GRID_Y = 65535  # CUDA's limit on a grid's second dimension: sequences x K/V heads


def _kernel():
    """``(triton, flash_fwd_kernel)`` (:mod:`.triton_flash`), or False without Triton."""
    return triton_kernel(f"{__package__}.triton_flash", "flash_fwd_kernel")


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a contiguous copy where its rows are not what the kernel
    reads in place: contiguous and 16-byte aligned (tensor descriptors, the
    copy engine, read K and V so; helix's K/V gathered over head-dim slices
    are strided in the head dim)."""
    e = t.element_size()
    if (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
            and all((s * e) % 16 == 0 for s in t.stride()[:-1])):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _interpreted(q: torch.Tensor) -> bool:
    # TRITON_INTERPRET=1 runs Triton's kernels on the CPU (numpy): the tests'
    # way to run this kernel without a GPU. In fp16 only: the interpreter's
    # matrix product misreads bf16 operands (Triton 3.6 to 3.9).
    return os.environ.get("TRITON_INTERPRET") == "1" and q.dtype == torch.float16


def wide_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            plain_causal: bool = False) -> bool:
    """Whether :func:`attend` should take these tensors (see the module doc):
    CUDA (or fp16 on any device under Triton's interpreter), bf16/fp16 alike, a
    head_dim of :data:`CONFIGS`, at least two queries (``plain_causal``: a
    causal prefill from position 0, where SDPA may be faster), query heads a
    multiple of the K/V heads, at most 65535 sequences x K/V heads, Triton
    installed."""
    d = q.shape[-1]
    c = CONFIGS.get(d)
    return ((q.is_cuda or _interpreted(q)) and q.dtype in _HALF and k.dtype == q.dtype
            and v.dtype == q.dtype and c is not None and (c.plain_causal or not plain_causal)
            and k.shape[-1] == d and v.shape[-1] == d and q.shape[1] % k.shape[1] == 0
            and q.shape[2] >= 2 and k.shape[2] > 0 and q.shape[0] * k.shape[1] <= _MAX_GRID_Y
            and bool(_kernel()))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int = 0,
           causal: bool = False, scale: float | None = None, config: Config | None = None):
    """``(o [B, H, T, d], lse [B, H, T])`` (see the module doc); needs :func:`wide_ok`.
    ``config``: other tiles than :data:`CONFIGS`' (the benchmark's sweep)."""
    return launch(_kernel(), q, k, v, q_start, causal, scale, config)


def launch(kernel, q, k, v, q_start: int = 0, causal: bool = False,
           scale: float | None = None, config: Config | None = None):
    """:func:`attend` with ``kernel`` = ``(triton, flash_fwd_kernel)`` (tests
    pass the kernel compiled for Triton's interpreter)."""
    triton, fwd = kernel
    TensorDescriptor = triton.tools.tensor_descriptor.TensorDescriptor
    q, k, v = _rows(q), _rows(k), _rows(v)
    B, H, T, d = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    c = config or CONFIGS[d]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    o = torch.empty(B, H, T, d, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, T, dtype=torch.float32, device=q.device)
    desc_k = TensorDescriptor(k, list(k.shape), list(k.stride()), [1, 1, c.block_n, d])
    desc_v = TensorDescriptor(v, list(v.shape), list(v.stride()), [1, 1, c.block_n, c.dv])
    # Rows (head of the group, query) of each K/V head, contiguous in o.
    desc_o = TensorDescriptor(o, [B * Hkv, G * T, d], [G * T * d, d, 1], [1, c.block_m, c.dv])
    grid = (triton.cdiv(G * T, c.block_m), B * Hkv, d // c.dv)
    fwd[grid](q, desc_k, desc_v, desc_o, lse, q.stride(0), q.stride(1), q.stride(2),
              T, S, G, Hkv, int(q_start), scale * math.log2(math.e),
              HEAD_DIM=d, DV=c.dv, BLOCK_M=c.block_m, BLOCK_N=c.block_n, CAUSAL=bool(causal),
              num_warps=c.warps, num_stages=c.stages)
    return o, lse
