"""Attention of one query position over a KV cache, split over the keys
(flash-decoding), on GPUs; everything else keeps PyTorch's kernels.

A decode step's attention reads the cache once and computes almost nothing,
so its time is how many of the GPU's SMs stream the cache. PyTorch's fused
kernels give a program to each (sequence, head) and walk all its keys: at
batch 1 with 8 K/V heads, Llama 3.1 8B's 2062-key cache took 33-50 us a
layer on an H100 (results/llama/probe.jsonl), 170-250 GB/s, where a
copy streams 3 TB/s. Here each (sequence, K/V head) is split into ``splits``
runs of keys so the grid has a few programs per SM; each program computes
its run for all the query heads of its K/V head (each K/V row read once,
grouped-query attention never repeats K/V), and :mod:`.merge`'s kernel
merges the runs exactly by their log-sum-exp (Dao et al. 2023,
"Flash-Decoding for long-context inference").

``fuse=True`` makes the attention one launch instead: the last program of a
(sequence, K/V head) to finish merges its runs, each program counting itself
done in an int32 per (sequence, K/V head) that the last sets back to zero
(:func:`_counts`; where no counts can be had, a CUDA graph being captured with
more rows than the counts made before it, the merge kernel runs). It is not
the default: on one H100, in CUDA graphs, the two launches made a batch-1
decode step 2.7% (Llama 3.1 8B) and 2.0% (Mixtral) faster than the one, and
were even with it at 16 x 4096 (results/real/README.md, 1f88207).

``attend(q, k, v, n)``: ``q [B, H, 1, d]`` (or ``[B, H, d]``) over the first
``n`` keys (all ``S`` where ``n`` is larger) of ``k, v [B, Hkv, S, d]``
(any strides, rows contiguous: the
token-major cache's views). ``n`` is an int or a device tensor of one
element (a CUDA graph replays the step at every position: the grid depends
on ``S`` only, and splits past ``n`` exit at once). Returns ``o`` shaped as
``q`` in q's dtype and ``lse [B, H]`` (natural log, float32; ``-inf`` where
``n`` is 0, with ``o = 0``).

Callers: the reference's ``causal_attention`` (every strategy's decode step
over a whole cache) and ``parallel.lse.attend_lse_prefix`` (helix's and
ring's sequence-sharded decode). Taken by :func:`decode_ok`: CUDA, bf16/fp16,
a power-of-two head_dim of at most 256, at most 64 query heads a K/V head,
Triton installed; under Triton's interpreter (the CPU tests) fp16 on any device.
"""
from __future__ import annotations

import math
import os

import torch

from .kernels import _sms, pdl_ahead, triton_kernel
from .merge import merge_stack
from .once import made_once

_HALF = (torch.float16, torch.bfloat16)
BLOCK_N = 64  # keys a program reads per step
WAVES = 4  # programs per SM the split aims for


def _kernel():
    """``(triton, decode_split_kernel)`` (:mod:`.triton_decode`), or False
    without Triton."""
    return triton_kernel(f"{__package__}.triton_decode", "decode_split_kernel")


def _interpreted(q: torch.Tensor) -> bool:
    # Triton's interpreter (the CPU tests) multiplies fp16 operands right and
    # misreads bf16 ones (Triton 3.6 to 3.9), as flash.py notes.
    return os.environ.get("TRITON_INTERPRET") == "1" and q.dtype == torch.float16


def decode_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether :func:`attend` takes these tensors (the module doc)."""
    d = q.shape[-1]
    H, Hkv = q.shape[1], k.shape[1]
    return ((q.is_cuda or _interpreted(q)) and q.dtype in _HALF and k.dtype == q.dtype
            and v.dtype == q.dtype and (q.dim() == 3 or q.shape[2] == 1)
            and 16 <= d <= 256 and d & (d - 1) == 0 and k.shape[-1] == d and v.shape[-1] == d
            and H % Hkv == 0 and H // Hkv <= 64 and k.stride(-1) == 1 and v.stride(-1) == 1
            and q.stride(-1) == 1 and bool(_kernel()))


_COUNTS: dict = {}  # device -> int32 zeros: the fused merge's arrivals
COUNTS_MIN = 4096  # counts made at once: (sequence, K/V head) pairs


def _counts(rows: int, device: torch.device) -> torch.Tensor | None:
    """``rows`` or more int32 zeros for the kernel's arrival counts, one buffer
    a device: a step's attention launches run one after another (on one
    stream, or in one graph's replay) and each leaves its counts at zero.
    None while a CUDA graph is being captured and the buffer made before it
    (by the eager warm-up steps that precede a capture) is too small: a
    capture cannot make it zero."""
    key = str(device)
    buf = _COUNTS.get(key)
    if buf is None or buf.numel() < rows:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        with made_once():
            buf = _COUNTS[key] = torch.zeros(max(rows, COUNTS_MIN), dtype=torch.int32,
                                             device=device)
    return buf


def split_keys(rows: int, S: int, sms: int, block_n: int = BLOCK_N, waves: int = WAVES):
    """``(splits, chunk)``: runs of ``chunk`` keys (a multiple of ``block_n``)
    per (sequence, K/V head), so that ``rows`` of them make at least
    ``waves`` programs an SM where the keys allow; at most one run a block."""
    want = max(1, min(-(-waves * sms // max(rows, 1)), -(-S // block_n)))
    chunk = -(-(-(-S // want)) // block_n) * block_n
    return -(-S // chunk), chunk


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n, scale: float | None = None,
           kernel=None, block_n: int = BLOCK_N, waves: int = WAVES, warps: int = 4,
           stages: int = 2, fuse: bool = False):
    """``(o, lse)`` (the module doc); needs :func:`decode_ok`. ``kernel``:
    ``(triton, decode_split_kernel)`` (tests pass the interpreted one);
    ``fuse``: the merge inside the split kernel (the module doc); the other
    options are the launch's (the benchmark's sweep)."""
    triton, split_kernel = kernel or _kernel()
    B, H, d = q.shape[0], q.shape[1], q.shape[-1]
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    splits, chunk = split_keys(B * Hkv, S, _sms(q.device), block_n, waves)
    o_split = torch.empty(splits, B * H, d, dtype=torch.float32, device=q.device)
    lse_split = torch.empty(splits, B * H, dtype=torch.float32, device=q.device)
    counts = _counts(B * Hkv, q.device) if fuse else None
    if counts is not None:  # the merge's outputs [B*H, d], [B*H], written by the kernel
        o = torch.empty(B * H, d, dtype=q.dtype, device=q.device)
        lse = torch.empty(B * H, dtype=torch.float32, device=q.device)
        merged = (o, lse, counts)
    else:
        merged = (o_split, lse_split, lse_split)  # not read (FUSE off)
    on_device = isinstance(n, torch.Tensor)
    split_kernel[(B * Hkv, splits)](
        q, k, v, o_split, lse_split, n if on_device else q, 0 if on_device else int(n), S,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), Hkv, B * H, chunk, scale * math.log2(math.e),
        *merged, splits, G=G, G_PAD=max(16, triton.next_power_of_2(G)), D=d, BLOCK_N=block_n,
        N_PTR=on_device, FUSE=counts is not None, num_warps=warps, num_stages=stages,
        **pdl_ahead(q.device, d * k.element_size() % 128 == 0))  # whole lines a K/V row
    if counts is None:
        o, lse = merge_stack(o_split, lse_split, q.dtype)  # [B*H, d], [B*H]
    return o.view(q.shape), lse.view(B, H)
