"""A step's rotary embedding in one GPU kernel (Triton), with the plain
PyTorch form everywhere else.

:func:`rotate` turns the projections of one step into what attention reads:
the queries rotated in place, the keys rotated (in place, or into the KV
cache's key rows) and, with a cache, the values stored beside them. Unfused,
that is a chain of small kernels per call (the angles, cos and sin, the
rotate-half concatenation, the products and sums, the casts) and two cache
copies; here it is one kernel, reading each element once.

Positions index the tables of :meth:`~shardwise.model.rope.Rope.table`
(float32, built once per model, device and length), so the frequencies of
the model's scaling are those transformers computes. A position given as a
0-d device tensor (the static decode step a CUDA graph replays) is read on
the device; the caller says how long the table must be (``length``).

The Triton path takes CUDA tensors in bf16, fp16 or fp32 whose head dims
are strided alike in q, k and v; it computes the rotation in float32 with
the same expressions as :func:`~shardwise.model.rope.rotated`, which the
PyTorch path runs (on CPU, in fp32, exactly the reference's arithmetic).
``tests/test_rotary.py`` compares the two, on CPU through Triton's
interpreter and on GPUs.
"""
from __future__ import annotations

import torch

from .kernels import pdl, triton_kernel
from .rope import Rope, rotated

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _kernel():
    """``(triton, rotary_kernel)`` (:mod:`.triton_rotary`), or False without Triton."""
    return triton_kernel(f"{__package__}.triton_rotary", "rotary_kernel")


def rotate(rope: Rope, pos, q: torch.Tensor | None = None, k: torch.Tensor | None = None,
           v: torch.Tensor | None = None, kv: torch.Tensor | None = None, slot=None,
           length: int | None = None) -> None:
    """Rotate this step's ``q [B, T, H, d]`` and ``k [B, T, Hkv, d]`` (either
    may be None) for positions ``pos..pos+T``, in one kernel on GPUs.

    ``q`` is rotated in place. Without ``kv``, so is ``k``. With ``kv``, a
    KV cache's storage ``[B, S, 2, Hkv, d]``, the rotated keys and ``v`` go
    to its rows ``slot..slot+T`` (``slot`` defaults to ``pos``; an int or a
    0-d device tensor) and ``k`` is left as it was. ``pos`` is an int or a
    0-d device tensor; for a tensor, ``length`` bounds the positions (the
    table's rows). Views are fine as long as each head's dims are evenly
    strided."""
    x = q if q is not None else k
    if x.is_cuda and x.dtype in _DTYPES and _kernel():
        _launch(rope, pos, q, k, v, kv, slot, length)
    else:
        _torch(rope, pos, q, k, v, kv, slot, length)


def _table_length(pos, T: int, length: int | None) -> int:
    if isinstance(pos, torch.Tensor):
        if length is None:
            raise ValueError("a device-tensor position needs the table length (length=)")
        return length
    return pos + T


def _torch(rope, pos, q, k, v, kv, slot, length) -> None:
    """:func:`rotate` in PyTorch ops (the reference's arithmetic)."""
    x = q if q is not None else k
    T = x.shape[1]
    cos, sin = rope.cos_sin(pos, T, _table_length(pos, T, length), x.device)
    if q is not None:
        q.copy_(rotated(q, cos, sin))
    if k is None:
        return
    keys = rotated(k, cos, sin)
    if kv is None:
        k.copy_(keys)
        return
    at = pos if slot is None else slot
    rows = torch.stack([keys, v], dim=2)  # [B, T, 2, Hkv, d]
    if isinstance(at, torch.Tensor):
        kv.index_copy_(1, at + torch.arange(T, device=kv.device), rows)
    else:
        kv[:, at : at + T].copy_(rows)


def _launch(rope, pos, q, k, v, kv, slot, length) -> None:
    """:func:`rotate` as one Triton launch."""
    triton, kernel = _kernel()
    x = q if q is not None else k
    B, T, _, d = x.shape
    cos, sin = rope.table(_table_length(pos, T, length), x.device)
    if k is not None:
        groups = k.shape[2]
    else:  # queries alone: one program a token, every head
        groups = 1
    G = q.shape[2] // groups if q is not None else 0
    at = pos if slot is None else slot
    if k is not None and kv is not None:
        ko, vo = kv[:, :, 0], kv[:, :, 1]  # [B, S, Hkv, d] views
    else:
        ko, vo, at = k, None, 0
    tensors = [t if t is not None else x for t in (q, k, v, ko, vo)]  # absent: never read
    strides = [s for t in (q, k, v, ko) for s in (t.stride() if t is not None else (0,) * 4)]
    # A device-tensor position or slot is read by the kernel; an int is passed as is.
    on_device = [isinstance(t, torch.Tensor) for t in (pos, at)]
    half = d // 2
    block = triton.next_power_of_2(half)
    gb = triton.next_power_of_2(max(G, 1))
    kernel[(B * T, groups)](
        *tensors, cos, sin, *(t if dev else cos for t, dev in zip((pos, at), on_device)),
        T, *(0 if dev else t for t, dev in zip((pos, at), on_device)), *strides,
        HALF=half, BLOCK=block, G=G, GB=gb, HAS_Q=q is not None, HAS_K=k is not None,
        HAS_V=v is not None and kv is not None, POS_PTR=on_device[0], SLOT_PTR=on_device[1],
        num_warps=1 if gb * block <= 512 else 4, **pdl(cos.device))
