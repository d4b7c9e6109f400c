"""Fused residual-add + normalisation and the SwiGLU activation for GPUs
(Triton), with a plain PyTorch path everywhere else.

A pre-norm decoder layer computes ``h = x + a`` and then ``norm(h)``: two
memory-bound kernels, the second reading back what the first just wrote.
``add_norm`` does both in one pass over each row: it reads ``x`` and ``a``,
writes ``h`` (rounded to the activation dtype, exactly as the separate add
rounds it) and normalises that rounded ``h`` in float32, as PyTorch's
LayerNorm and RMSNorm do. In a decode step (16 rows) it is also one launch
instead of two. ``norm`` is the same kernel without the residual.

The Triton path is taken for CUDA tensors in bf16/fp16 whose rows fit one
block (d_model <= 32768) when Triton imports; anything else runs the
``nn.LayerNorm`` / ``nn.RMSNorm`` module itself. The two paths agree to the
rounding of the float32 statistics (a summation order), which the GPU tests
in ``tests/test_kernels.py`` bound.

``swiglu`` is the SwiGLU MLP's activation and product, ``silu(gate) * up``
of the fused up-projection's two halves, in one pass on GPUs (PyTorch runs
the SiLU and the product as two kernels, the second reading the first's
output back). The rotary embedding's kernel is in :mod:`.rotary`.

``expert_rows`` multiplies each routed (token, pick) row by its own expert's
matrix, reading that expert's weights from where they are held: a Mixture-of-
Experts decode step with fewer routed rows than held experts reads only the
routed experts (batch 1, top-2 of 8: a quarter of the dense path's bytes), with
no host synchronisation, so it is captured in CUDA graphs. Off the GPU the same
product runs as a gather and a batched matrix product.

``linear`` multiplies a decode step's rows by one matrix: one row by the
expert GEMV's kernel, 2 to 16 rows by ``rows_kernel`` (:mod:`.triton_rows`),
which streams the weights once over many programs with the rows as one
tensor-core tile, where cuBLAS's 16-row GEMMs read llama-3.1-8b's QKV at 2.5
TB/s of an H100's 3.0 (results/real/trace-llama-decode-16x4096-7de6b1e.txt).
``linear_swiglu`` is the SwiGLU up-projection with the activation in that
kernel's epilogue, and ``swiglu_mlp`` the whole MLP with the activation
wherever it costs no launch of its own.

``grouped_linear`` is a prompt's MoE layer's expert products: every
expert's rows (sorted by expert, the offsets on the device) by its own
matrix in one launch (:mod:`.triton_grouped`), the up-projection's SwiGLU in
its epilogue, where ``torch._grouped_mm`` writes both halves for the SwiGLU
kernel to read back.

``route_rows`` is a decode step's router in two kernels, where PyTorch
launches five: the logits' partial sums over chunks of the model's width, one
program per (token, chunk), then one program per token that sums them and
takes the top-k picks and their softmax. (One program per token walking the
whole width took 8.7 us in a CUDA graph for Mixtral's 8 x 4096 router on an
H100, one token, 17.2 in a profiled step: latency-bound, where the weights
are 64 KB.)

``sort_picks`` lays a prompt's (token, pick) slots out by expert for those
products with no sort: a counting sort in two kernels (each block's count of
each expert, then each slot's row), where PyTorch's stable sort, the offsets'
search and the inverse permutation take a dozen kernels; ``pick_top`` takes a
prompt's top-k picks and their softmax from the router's float32 logits in
one kernel (``route_rows``' second), where ``torch.topk`` and the softmax take
three.

``combine_picks`` sums each token's weighted expert outputs: on GPUs one pass
that gathers a token's rows from wherever the experts wrote them (sorted by
expert in a prompt), weights and sums them, where PyTorch scatters the rows
back, weights them and sums them in three kernels (a Mixtral-8x7b prompt of
2048 tokens on an H100: 330 us of those per two layers, results/real/
trace-mixtral-prefill-1x2048.txt).
"""
from __future__ import annotations

import functools
import importlib
import os

import torch
import torch.nn.functional as Fn
from torch import nn

_MAX_D = 32768
_LOADED: dict = {}  # (module, name) -> (triton, kernel), or False without Triton
# Set by shardwise.perf while it counts or records a step: every Triton kernel
# is then loaded through ``LOAD_HOOK(module, name, loaded)``, which returns
# the ``(triton, kernel)`` to launch in place of ``loaded`` (the real pair, or
# False where Triton is not installed). None: the real kernels.
LOAD_HOOK = None
_HALF = (torch.bfloat16, torch.float16)
# Whether the decode step's Triton kernels launch as programmatic dependent
# launches where the GPU has them (:func:`pdl`).
PDL = True
# Steps of weight rows (of the launch's inputs a step) that each program of
# ``rows_kernel`` and of the one-row GEMV asks L2 for before it waits on the
# kernel before it, in a programmatic dependent launch, and blocks of keys
# that the decode attention's programs ask for (PREFETCH of ``triton_rows``,
# ``triton_moe`` and ``triton_decode``): 0, off. Not yet timed on a GPU; a
# switch for an A/B of a decode step, on and off.
PREFETCH_STEPS = 0


def triton_kernel(module: str, name: str):
    """``(triton, kernel)``: the ``@triton.jit`` kernel ``name`` of ``module``
    (a module that imports Triton at its top), or False where Triton is not
    installed. Loaded once and kept here, so callers ask at every launch (a
    dict lookup) and a step run under ``LOAD_HOOK`` sees every kernel it
    launches. Triton compiles at the first launch."""
    key = (module, name)
    if key not in _LOADED:
        try:
            import triton

            _LOADED[key] = triton, getattr(importlib.import_module(module), name)
        except ImportError:
            _LOADED[key] = False
        if _LOADED[key] and os.environ.get("TRITON_INTERPRET") == "1":
            _interpreter_fixes()
    return _LOADED[key] if LOAD_HOOK is None else LOAD_HOOK(module, name, _LOADED[key])


def _interpreter_fixes() -> None:
    """Two defects of Triton's interpreter (``TRITON_INTERPRET=1``: the CPU
    tests' way to run the kernels), mended where it runs them:

    * before 3.7 it takes a scalar as an index (a loop bound) with ``int()``
      of a one-element array, which NumPy 2.4 refuses ("only 0-dimensional
      arrays can be converted"); 3.7 squeezes the array first, and so does this;
    * 3.9 makes a boolean block combined with a boolean scalar (``keep & (p >=
      0)``) an int32 block, which its loads and stores refuse as a mask ("mask
      has unsupported dtype"); its values are 0 and 1, read here as booleans."""
    import numpy as np
    from triton.runtime import interpreter

    patch = interpreter._patch_lang_tensor
    if not getattr(patch, "squeezes", False):
        def patched(tensor, scope):
            patch(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

        patched.squeezes = True
        interpreter._patch_lang_tensor = patched

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_masked_load, "boolean_masks", False):
        return
    load, store = builder.create_masked_load, builder.create_masked_store

    def boolean(mask):
        data = mask.data
        if isinstance(data, np.ndarray) and data.dtype != np.bool_:
            return interpreter.TensorHandle(data.astype(np.bool_), mask.dtype)
        return mask

    def masked_load(self, ptrs, mask, *args, **kw):
        return load(self, ptrs, boolean(mask), *args, **kw)

    def masked_store(self, ptrs, value, mask, *args, **kw):
        return store(self, ptrs, value, boolean(mask), *args, **kw)

    masked_load.boolean_masks = True
    builder.create_masked_load, builder.create_masked_store = masked_load, masked_store


def _kernel():
    """``(triton, add_norm_kernel)`` (:mod:`.triton_norm`), or False without Triton."""
    return triton_kernel(f"{__package__}.triton_norm", "add_norm_kernel")


def eps_of(module: nn.Module, x: torch.Tensor) -> float:
    eps = module.eps
    return torch.finfo(x.dtype).eps if eps is None else float(eps)


def norm_fusable(module: nn.Module | None, x: torch.Tensor) -> bool:
    """Whether a fused kernel can apply ``module`` to ``x``'s rows: CUDA
    half-precision rows of at most 32768 and a LayerNorm or RMSNorm with a
    weight of that dtype over the whole row (``None``: no norm, always)."""
    if not (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and x.shape[-1] <= _MAX_D):
        return False
    return module is None or (
        isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and module.weight is not None
        and module.weight.dtype == x.dtype and tuple(module.normalized_shape) == (x.shape[-1],))


def _fusable(module: nn.Module, *tensors: torch.Tensor) -> bool:
    return (module is not None and norm_fusable(module, tensors[0])
            and all(t.is_contiguous() for t in tensors) and bool(_kernel()))


def _launch(module: nn.Module, x: torch.Tensor, a: torch.Tensor | None):
    triton, kernel = _kernel()
    D = x.shape[-1]
    rows = x.numel() // D
    y = torch.empty_like(x)
    h = torch.empty_like(x) if a is not None else x
    rms = isinstance(module, nn.RMSNorm)
    bias = None if rms else module.bias
    block = triton.next_power_of_2(D)
    kernel[(rows,)](x, a if a is not None else x, h, y, module.weight,
                    bias if bias is not None else module.weight, D, eps_of(module, x),
                    HAS_RES=a is not None, HAS_BIAS=bias is not None, RMS=rms, BLOCK=block,
                    num_warps=min(16, max(4, block // 512)), **pdl(x.device))
    return h, y


def norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a LayerNorm or RMSNorm module, fused on GPUs."""
    return add_norm(module, x, None)[1]


def add_norm(module: nn.Module, x: torch.Tensor, a: torch.Tensor | None):
    """``h = x + a`` and ``module(h)``, in one pass on GPUs: returns ``(h, norm(h))``.
    ``a`` None: no residual (``h`` is ``x``)."""
    if a is None:
        return _launch(module, x, None) if _fusable(module, x) else (x, module(x))
    if a.dtype != x.dtype or a.shape != x.shape or not _fusable(module, x, a):
        h = x + a
        return h, module(h)
    return _launch(module, x, a)


def _swiglu_kernel():
    """``(triton, swiglu_kernel)`` (:mod:`.triton_swiglu`), or False without Triton."""
    return triton_kernel(f"{__package__}.triton_swiglu", "swiglu_kernel")


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` of ``h [..., 2F]`` laid out ``[gate | up]`` (the
    fused ``[gate; up]`` weight's output): ``[..., F]``, one kernel on GPUs."""
    if h.is_cuda and h.dtype in (*_HALF, torch.float32) and h.stride(-1) == 1 and _swiglu_kernel():
        return _swiglu_launch(h)
    return _swiglu_torch(h)


def _swiglu_torch(h: torch.Tensor) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return Fn.silu(gate) * up


def _swiglu_launch(h: torch.Tensor) -> torch.Tensor:
    triton, kernel = _swiglu_kernel()
    F = h.shape[-1] // 2
    rows = h.reshape(-1, 2 * F)  # a view for the GEMM's output
    y = torch.empty(*h.shape[:-1], F, dtype=h.dtype, device=h.device)
    block = min(1024, triton.next_power_of_2(F))
    kernel[(rows.shape[0], triton.cdiv(F, block))](rows, y, F, rows.stride(0), F, BLOCK=block,
                                                    num_warps=4 if block >= 512 else 1,
                                                    **pdl(h.device))
    return y


def _experts_kernel():
    """``(triton, expert_rows_kernel)`` (:mod:`.triton_moe`), or False without Triton."""
    return triton_kernel(f"{__package__}.triton_moe", "expert_rows_kernel")


def expert_rows(x: torch.Tensor, w: torch.Tensor, experts: torch.Tensor, first: int,
                per: int, gated: bool = False) -> torch.Tensor:
    """``y [R, O]``: row r is ``w[experts[r] - first] @ x[r // per]`` for
    ``x [R / per, I]``, the held experts' ``w [held, O, I]`` and the routed
    experts ``experts [R]`` (global ids); zero where ``experts[r]`` is not held.
    ``per`` is top-k for the up-projection (each token's row serves its k
    picks) and 1 for the down-projection (one row per pick). ``gated``: ``x
    [R / per, 2I]`` is the SwiGLU up-projection's ``[gate | up]``, and the rows
    are :func:`swiglu` of it (on GPUs computed as the kernel loads them)."""
    if (x.is_cuda and x.dtype in (*_HALF, torch.float32) and w.dtype == x.dtype
            and w.stride(-1) == 1 and x.stride(-1) == 1 and _experts_kernel()):
        return _expert_rows_launch(x, w, experts, first, per, **({"SWIGLU": True} if gated else {}))
    return _expert_rows_torch(swiglu(x) if gated else x, w, experts, first, per)


def _expert_rows_torch(x, w, experts, first, per):
    held = w.shape[0]
    local = experts.reshape(-1) - first  # [R]
    mine = (local >= 0) & (local < held)
    picked = w[torch.where(mine, local, 0)]  # [R, O, I]: a copy of each routed matrix
    rows = x.repeat_interleave(per, dim=0) if per > 1 else x  # [R, I]
    y = torch.bmm(picked, rows[:, :, None])[:, :, 0]  # [R, O]
    return torch.where(mine[:, None], y, torch.zeros((), dtype=y.dtype, device=y.device))


def _expert_rows_launch(x, w, experts, first, per, block_o: int | None = None,
                        block_i: int | None = None, **launch):
    """``block_o``, ``block_i`` and ``launch`` (Triton's num_warps, num_stages,
    ``DOT``): where a probe sets them (scripts/moe-rows.py); else
    :func:`expert_rows_launch`'s. ``DENSE=True`` in ``launch``: every row of
    ``x`` by the one matrix ``w [1, O, I]`` (``experts`` unread);
    ``SWIGLU=True``: the rows are ``silu(gate) * up`` of ``x [.., 2I]``."""
    if launch.get("DOT") and launch.get("SWIGLU"):
        raise ValueError("expert_rows_kernel: SWIGLU activates the input of the FMA loop only, "
                         "not DOT's")
    triton, kernel = _experts_kernel()
    held, O, I = w.shape
    R = x.shape[0] if launch.get("DENSE") else experts.numel()
    y = torch.empty(R, O, dtype=x.dtype, device=x.device)
    chosen = expert_rows_launch(R, O, _sms(x.device))
    block_o = block_o or chosen["block_o"]
    block_i = min(block_i or chosen["block_i"], triton.next_power_of_2(I))
    # a step of block_i inputs of 2 bytes holds block_i // 64 lines of a row
    dependent = pdl_ahead(x.device, block_i >= 64 and bool(launch.get("DENSE")))
    kernel[(R, triton.cdiv(O, block_o))](
        x, w, experts.reshape(-1), y, O, held, first, x.stride(0), w.stride(0),
        w.stride(1), y.stride(0), I=I, PER=per, BLOCK_O=block_o, BLOCK_I=block_i,
        **{"num_warps": chosen["num_warps"], "num_stages": 2, **dependent, **launch})
    return y


# Rows up to which :func:`linear` multiplies on GPUs by the Triton GEMV (a
# decode step of one sequence), where cuBLAS's GEMMs for one row read the
# weights at 2.4 TB/s (QKV and W_o) to 2.8 (the LM head) on an H100, the
# expert GEMV at 3.08 of a 3.04 copy rate. On an H100 it made a graph decode
# step at 1 x 2048 4.5% faster for llama-3.1-8b and 1.3% for mixtral-8x7b
# (results/real/README.md, 9b6b4c0).
GEMV_MAX_ROWS = 1
# Rows up to which (from GEMV_MAX_ROWS + 1) :func:`linear` and
# :func:`linear_swiglu` multiply on GPUs by ``rows_kernel`` (:mod:`.triton_rows`):
# a decode step of up to 16 sequences, the rows one tensor-core tile.
ROWS_MAX = 16


def _halves_on_gpu(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``x`` and ``w`` are GPU tensors of one half precision, ``w``'s
    rows contiguous: what the Triton products take."""
    return x.is_cuda and x.dtype in _HALF and w.dtype == x.dtype and w.stride(-1) == 1


def _product_rows(x: torch.Tensor, w: torch.Tensor, bias, width: int) -> int:
    """The rows of ``x [..., width]`` where its product by ``w [O, I]`` is a
    half-precision one on a GPU with no bias (the Triton products'), else 0."""
    if bias is None and _halves_on_gpu(x, w) and w.dim() == 2 and x.shape[-1] == width:
        return x.numel() // width
    return 0


def _gemv(x: torch.Tensor, w: torch.Tensor, bias, width: int) -> bool:
    """Whether ``x [..., width]`` by ``w`` is one row for the GEMV."""
    return 0 < _product_rows(x, w, bias, width) <= GEMV_MAX_ROWS and bool(_experts_kernel())


def _few_rows(x: torch.Tensor, w: torch.Tensor, bias) -> bool:
    """Whether ``x [..., I]`` by ``w [O, I]`` is 2 to :data:`ROWS_MAX` rows:
    ``rows_kernel``'s product."""
    return (GEMV_MAX_ROWS < _product_rows(x, w, bias, w.shape[-1]) <= ROWS_MAX
            and bool(_rows_kernels()))


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
           gated: bool = False) -> torch.Tensor:
    """``Fn.linear(x, w, bias)``; a decode step's single row on GPUs (half
    precision, no bias) by the expert GEMV's kernel over the one matrix
    ``w [O, I]``, and 2 to :data:`ROWS_MAX` rows by ``rows_kernel``: the
    products summed in float32 and rounded once, as a GEMM sums them, in
    another order. ``gated``: ``x [..., 2I]`` is the SwiGLU up-projection's
    ``[gate | up]`` and the product is of :func:`swiglu` of it (the MLP's
    down-projection), which the GEMV computes as it loads its input, with
    the arithmetic of :func:`swiglu`'s kernel (the same values, so the same
    output): one launch where there were two."""
    if _gemv(x, w, bias, (1 + gated) * w.shape[-1]):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()
        y = _expert_rows_launch(x2, w.unsqueeze(0), x2, 0, 1, DENSE=True,
                                **({"SWIGLU": True} if gated else {}))
        return y.view(*x.shape[:-1], w.shape[0])
    x = swiglu(x) if gated else x
    if _few_rows(x, w, bias):
        return _rows_launch(x, w, gated=False)
    return Fn.linear(x, w, bias)


def linear_swiglu(x: torch.Tensor, w: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """:func:`swiglu` of ``linear(x, w)`` for the fused ``w [2F, D] = [gate;
    up]``: ``[..., F]``; with ``groups``, ``w`` is that many such matrices
    stacked (a MoE layer's experts, each its own ``[gate; up]``), each
    activated on its own halves: ``[..., groups F]``. For 2 to
    :data:`ROWS_MAX` rows on GPUs one launch of ``rows_kernel``, whose
    programs each compute a block of the gate's and the up's outputs and
    apply the activation to them before writing (the values of its ungated
    product followed by :func:`swiglu`'s kernel): the ``[N, 2F]`` output is
    neither written nor read back."""
    if _few_rows(x, w, None):
        return _rows_launch(x, w, gated=True, groups=groups)
    h = linear(x, w)  # (no -1 in the views: a rank may hold no rows)
    return swiglu(h.view(*h.shape[:-1], groups, w.shape[0] // groups)).view(
        *h.shape[:-1], w.shape[0] // 2)


def batched_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``torch.bmm(x, w.transpose(1, 2))``: ``x [E, N, I]`` (rows contiguous,
    any batch and row strides: a MoE layer's ``[N, E, F]`` activations seen
    per expert) by ``w [E, O, I]``, ``[E, N, O]``. For 2 to :data:`ROWS_MAX`
    rows a batch on GPUs one launch of ``rows_kernel`` over the batch (its
    third grid dimension), each matrix's weights streamed once."""
    if (_halves_on_gpu(x, w) and x.stride(-1) == 1 and GEMV_MAX_ROWS < x.shape[1] <= ROWS_MAX
            and bool(_rows_kernels())):
        return _rows_launch(x, w, gated=False)
    return torch.bmm(x, w.transpose(1, 2))


def swiglu_mlp(x: torch.Tensor, w_in: torch.Tensor, w_down: torch.Tensor) -> torch.Tensor:
    """The SwiGLU MLP ``w_down @ swiglu(w_in @ x)`` where its activation runs
    in the fewest launches: a single row on GPUs activates in the down-
    projection's GEMV (``linear(..., gated=True)``), a few rows in the up-
    projection's epilogue (:func:`linear_swiglu`), a prompt in
    :func:`swiglu`'s kernel between two GEMMs."""
    if _gemv(x, w_in, None, w_in.shape[-1]):
        return linear(linear(x, w_in), w_down, gated=True)
    return linear(linear_swiglu(x, w_in), w_down)


def _rows_kernels():
    """``(triton, (rows_kernel, rows_finish_kernel))`` (:mod:`.triton_rows`),
    or False without Triton."""
    main = triton_kernel(f"{__package__}.triton_rows", "rows_kernel")
    finish = triton_kernel(f"{__package__}.triton_rows", "rows_finish_kernel")
    return main and finish and (main[0], (main[1], finish[1]))


def _rows_launch(x: torch.Tensor, w: torch.Tensor, gated: bool, groups: int = 1,
                 block_o: int | None = None, block_i: int | None = None,
                 split: int | None = None, **launch) -> torch.Tensor:
    """``rows_kernel`` on ``x [..., I]`` (2 to 16 rows) and ``w [(2)O, I]``
    (gated: ``groups`` stacked ``[gate; up]`` matrices); a 3-D ``w [E, O,
    I]``: the batch of ``x [E, N, I]``'s products by each (ungated), ``[E,
    N, O]``. ``block_o``, ``block_i``, ``split`` and ``launch`` (Triton's
    num_warps, num_stages, ``W_LEFT``): where a probe sets them
    (scripts/rows-gemm.py); else :func:`rows_launch`'s."""
    triton, (kernel, finish) = _rows_kernels()
    if w.dim() == 3:  # a batch: x [E, N, I] by w [E, O, I]
        x2, (E, M, I), O = x, x.shape, w.shape[1]
        y = torch.empty(E, M, O, dtype=x.dtype, device=x.device)
        batch = (x.stride(0), w.stride(0), y.stride(0))
        x2s, ws, ys = x.stride(1), w.stride(1), y.stride(1)
    else:
        x2 = x.reshape(-1, x.shape[-1])
        x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
        (M, I), O, E = x2.shape, w.shape[0] // (1 + gated), 1
        y = torch.empty(M, O, dtype=x.dtype, device=x.device)
        batch, x2s, ws, ys = (0, 0, 0), x2.stride(0), w.stride(0), y.stride(0)
    chosen = rows_launch(gated)
    block_o, block_i = block_o or chosen["block_o"], block_i or chosen["block_i"]
    split = split or chosen["split"]
    block_i = min(block_i, max(16, triton.next_power_of_2(I)))
    parts = y if split == 1 else torch.empty(split, M, (1 + gated) * O, dtype=torch.float32,
                                             device=x.device)
    kernel[(triton.cdiv(O, block_o), split, E)](
        x2, w, y, parts, M, O, O // groups, x2s, ws, ys, *batch, I=I, BLOCK_M=16,
        BLOCK_O=block_o, BLOCK_I=block_i, SPLIT=split, GATED=gated,
        **{**{k: chosen[k] for k in ("num_warps", "num_stages", "W_LEFT")},
           **pdl_ahead(x.device, block_i >= 64), **launch})
    if split > 1:
        block = min(1024, triton.next_power_of_2(O))
        finish[(M, triton.cdiv(O, block))](parts, y, M, O, y.stride(0), SPLIT=split,
                                           GATED=gated, BLOCK=block, num_warps=4,
                                           **pdl(x.device))
    return y if w.dim() == 3 else y.view(*x.shape[:-1], O)


def rows_launch(gated: bool) -> dict:
    """The launch of ``rows_kernel`` for 2 to 16 rows, ``gated`` or not. From
    a sweep of 77 launches at 16 rows on an H100
    (results/real/rows-gemm-sweep-68055e2.jsonl; ``scripts/rows-gemm.py
    --sweep``), each the fastest or within 3% of it on llama-3.1-8b's
    matrices: an ungated product takes the weights as the dot's left
    operand, 64 rows of 256 inputs a step, five steps in flight (QKV 20.3 us
    where cuBLAS took 21.1, W_o 14.3 and 16.7, the down-projection 43.0 and
    45.5, the LM head 347.6 and 379.4); the gated up-projection, whose
    programs read the gate's and the up's rows, 128 outputs of 128 inputs,
    three steps (80.4 us where cuBLAS and the SwiGLU kernel took 88.7). No
    shape gained by splitting the inputs among programs (``split``, kept for
    the probe)."""
    if gated:
        return {"block_o": 128, "block_i": 128, "split": 1, "num_warps": 4, "num_stages": 3,
                "W_LEFT": False}
    return {"block_o": 64, "block_i": 256, "split": 1, "num_warps": 4, "num_stages": 5,
            "W_LEFT": True}


def _grouped_kernel(tma: bool = False):
    """``(triton, kernel)``: ``grouped_tma_kernel`` (``tma``) or
    ``grouped_kernel`` (:mod:`.triton_grouped`), or False without Triton."""
    name = "grouped_tma_kernel" if tma else "grouped_kernel"
    return triton_kernel(f"{__package__}.triton_grouped", name)


def grouped_linear(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor,
                   gated: bool = False, tma: bool | None = None, **launch) -> torch.Tensor:
    """Each expert's rows by its own matrix: ``x [R, K]``'s rows sorted by
    expert, expert e's ending at ``ends[e]`` (``[E]`` int32 on the device),
    by ``w [E, O, K]`` -> ``[R, O]``; ``gated``: ``w [E, 2F, K]`` holds each
    expert's ``[gate; up]`` and the result is ``silu(gate) * up``, ``[R,
    F]`` (:func:`swiglu` of the product, each half rounded first). A
    prompt's MoE layer on GPUs: one launch for every expert, the offsets
    never read to the host and the activation in its epilogue; rows past
    ``ends[-1]`` are left unwritten. The launch is ``grouped_tma_kernel``
    (persistent, its operands read through TMA descriptors) where
    :func:`_tma_fits` (``tma`` None) or ``tma`` says so, else
    ``grouped_kernel``. Elsewhere a loop over the experts' slices (the
    offsets read to the host). ``launch``: the kernel's blocks and Triton's
    options, where a probe sets them (scripts/moe-grouped.py); else
    :func:`grouped_launch`'s."""
    if not (_halves_on_gpu(x, w) and x.stride(-1) == 1):
        return _grouped_torch(x, w, ends, gated)
    tma = _tma_fits(x, w) if tma is None else tma
    found = _grouped_kernel(tma)
    if not found:
        return _grouped_torch(x, w, ends, gated)
    triton, kernel = found
    (R, K), (E, rows, _) = x.shape, w.shape
    O = rows // 2 if gated else rows
    chosen = {**grouped_launch(gated, tma), **launch}
    bm, bn, bk = chosen.pop("BLOCK_M"), chosen.pop("BLOCK_N"), chosen["BLOCK_K"]
    y = torch.empty(R, O, dtype=x.dtype, device=x.device)
    tiles = (triton.cdiv(R, bm) + E) * triton.cdiv(O, bn)  # the most tiles any routing has
    shapes = dict(K=K, E=E, EP=triton.next_power_of_2(E), BLOCK_M=bm, BLOCK_N=bn, GATED=gated)
    if not tma:
        kernel[(tiles,)](x, w, y, ends, O, x.stride(0), w.stride(0), w.stride(1), y.stride(0),
                         **shapes, **{**pdl(x.device), **chosen})
        return y
    TensorDescriptor = triton.tools.tensor_descriptor.TensorDescriptor
    x_desc = TensorDescriptor(x, [R, K], [x.stride(0), 1], [bm, bk])
    x_half = TensorDescriptor(x, [R, K], [x.stride(0), 1], [bm // 2, bk])
    if chosen.get("GATE_CAT"):  # [2E, F, K]: expert e's gate rows at 2e, its up rows at 2e + 1
        w_desc = TensorDescriptor(w, [2 * E, O, K], [O * K, K, 1], [2, bn, bk])
    else:
        w_desc = TensorDescriptor(w, [E * rows, K], [K, 1], [bn, bk])
    programs = chosen.pop("programs") or _sm_count(x.device)
    kernel[(min(programs, tiles),)](x_desc, x_half, w_desc, y, ends, O, y.stride(0), **shapes,
                                    **{**pdl(x.device), **chosen})
    return y


def _tma_fits(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``grouped_tma_kernel`` takes ``x`` and ``w`` (half-precision
    GPU tensors, ``x``'s rows contiguous): a GPU with TMA (:func:`_cuda_tma`;
    a step traced on meta tensors is taken as a Hopper GPU runs it), ``w``
    contiguous, and the 16-byte alignment a descriptor needs of ``x``'s
    start and row stride (``K`` a multiple of 8)."""
    if x.device.type not in ("cuda", "meta"):
        return False
    if x.device.type == "cuda" and not _cuda_tma(x.device.index
                                                 if x.device.index is not None
                                                 else torch.cuda.current_device()):
        return False
    unit = 16 // x.element_size()
    return (w.is_contiguous() and x.shape[1] % unit == 0 and x.stride(0) % unit == 0
            and x.data_ptr() % 16 == 0)


@functools.lru_cache(maxsize=None)
def _cuda_tma(index: int) -> bool:
    """Whether GPU ``index`` has TMA (Hopper and later) and Triton makes host
    descriptors (``triton.tools.tensor_descriptor``, Triton 3.4 and later)."""
    try:
        import triton.tools.tensor_descriptor  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.get_device_capability(index)[0] >= 9


def _sm_count(device) -> int:
    """The programs of a persistent kernel on ``device``: its SMs (an H100's
    132 off the GPU, where a traced step is taken as a Hopper GPU runs it)."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


def _grouped_torch(x: torch.Tensor, w: torch.Tensor, ends: torch.Tensor,
                   gated: bool) -> torch.Tensor:
    """:func:`grouped_linear` as a loop over the experts' slices."""
    O = w.shape[1] // 2 if gated else w.shape[1]
    y = x.new_zeros(x.shape[0], O)
    start = 0
    for e, end in enumerate(ends.tolist()):  # the host reads the offsets
        if end > start:
            h = Fn.linear(x[start:end], w[e])
            y[start:end] = swiglu(h) if gated else h
        start = end
    return y


def grouped_launch(gated: bool, tma: bool = False) -> dict:
    """The launch of ``grouped_tma_kernel`` (``tma``) or ``grouped_kernel``,
    ``gated`` or not. ``grouped_tma_kernel``'s are the fastest of the sweep
    at Mixtral-8x7b's widths and 2048 tokens on an H100 (one layer's
    products in CUDA graphs, results/real/moe-grouped-tma-3aef160.jsonl):
    gated, a gate tile and its up tile in one box and one dot (``GATE_CAT``)
    with three stages, 1528 us (0.795 of the GEMM peak, the SwiGLU
    included), where the two-dot launches took 1533 to 1551; ungated, 256
    outputs a tile, three stages, no half-height last blocks (``TAIL``), 766
    us (0.793), where ``TAIL`` took 804 to 835. One program per SM."""
    if tma:
        if gated:
            return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8,
                    "num_stages": 3, "TAIL": True, "GATE_CAT": True, "programs": None}
        return {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8,
                "num_stages": 3, "TAIL": False, "GATE_CAT": False, "programs": None}
    if gated:
        return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}
    return {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}


def expert_rows_launch(rows: int, outs: int, sms: int) -> dict:
    """The launch of :func:`expert_rows`'s kernel for ``rows`` routed rows of
    ``outs`` outputs on a GPU of ``sms`` SMs. A GEMV streams the weights
    once, so its rate is the loads each SM keeps in flight: a program reads
    16 weight rows, 256 inputs (512 B in bf16) of each, a step over 8 warps;
    where that grid has fewer than 4 programs an SM, 8 rows of 1024 inputs
    over 4 warps (the same 16 KB a step, half the programs' count lost). On
    an H100 at Mixtral-8x7b's widths and one token (two routed rows) these
    were the fastest of 36 launches each (results/real/moe-rows-sweep.jsonl):
    the up-projection (28672 x 4096) 207 us where the launch before them
    (64 rows of 256 inputs, 4 warps) took 253, the down-projection (4096 x
    14336) 134 where it took 196."""
    if rows * -(-outs // 16) >= 4 * sms:
        return {"block_o": 16, "block_i": 256, "num_warps": 8}
    return {"block_o": 8, "block_i": 1024, "num_warps": 4}


def _combine_kernel():
    """``(triton, combine_kernel)`` (:mod:`.triton_moe`), or False without Triton."""
    return triton_kernel(f"{__package__}.triton_moe", "combine_kernel")


def combine_picks(y: torch.Tensor, weights: torch.Tensor, pos: torch.Tensor | None = None,
                  out: torch.Tensor | None = None) -> torch.Tensor:
    """``out [N, D]``: token t's ``sum_j round(y[pos[t*k + j]] * weights[t, j])``
    for ``weights [N, k]`` (a token's routing weights, cast to ``y``'s dtype)
    and the expert outputs ``y [R, D]``; ``pos [N*k]`` is where (token, pick)
    ``t*k + j``'s row is in ``y`` (negative: not computed here, adding zero),
    None where ``y``'s rows are in (token, pick) order. Each weighted term is
    rounded to ``y``'s dtype and the terms summed in float32 and rounded once,
    as PyTorch's product and sum round them. Written into ``out`` where given
    (rows contiguous), else a new tensor."""
    if (y.is_cuda and y.dtype in (*_HALF, torch.float32) and y.stride(-1) == 1
            and (out is None or out.stride(-1) == 1) and _combine_kernel()):
        return _combine_launch(y, weights, pos, out)
    if out is None:
        return _combine_torch(y, weights, pos)
    return out.copy_(_combine_torch(y, weights, pos))


def pick_rows(rows: torch.Tensor, picks: int) -> torch.Tensor:
    """``pos [picks]`` for :func:`combine_picks`: ``pos[rows[i]] = i``, where
    (token, pick) ``rows[i]`` has row i of the experts' output, and -1 for the
    picks ``rows`` leaves out (experts not held here)."""
    pos = (torch.empty(picks, dtype=rows.dtype, device=rows.device) if rows.numel() == picks
           else torch.full((picks,), -1, dtype=rows.dtype, device=rows.device))
    return pos.scatter_(0, rows, torch.arange(rows.numel(), device=rows.device))


def sort_picks(experts: torch.Tensor, n_experts: int):
    """``(ends [E] int32, src [N*k], pos [N*k])`` for ``experts [N, k]`` (each
    token's picks, all below ``E = n_experts``): the (token, pick) slots
    sorted by expert, stably (tokens in order within an expert). Expert e's
    rows end at ``ends[e]``; row i of the sorted order is token ``src[i]``'s
    (``x.index_select(0, src)`` lays the experts' inputs out); slot ``t*k +
    j`` went to row ``pos[t*k + j]`` (:func:`combine_picks` reads it back).
    On GPUs a counting sort in two launches (:mod:`.triton_moe`'s
    ``expert_counts_kernel`` and ``expert_sort_kernel``), where PyTorch's
    stable sort of the int64 picks, the offsets' search and the inverse
    permutation's scatter take a dozen (a Mixtral-8x7b prompt of 2048 tokens
    on an H100: 67 us of radix sort alone per two layers, results/real/
    trace-mixtral-prefill-1x2048-039d4ee-graph.txt); elsewhere those. Both
    give the same three tensors: a stable order is unique."""
    N, k = experts.shape
    found = _sort_kernels() if experts.is_cuda and N else False
    if not found:
        return _sort_torch(experts, n_experts)
    (triton, counts_kernel), (_, sort_kernel) = found
    slots, ep = N * k, triton.next_power_of_2(n_experts)
    block = max(16, min(1024, 8192 // ep, triton.next_power_of_2(slots)))
    chunks = triton.cdiv(slots, block)
    key = experts.reshape(-1).contiguous()
    counts = torch.empty(chunks, ep, dtype=torch.int32, device=key.device)
    ends = torch.empty(n_experts, dtype=torch.int32, device=key.device)
    src = torch.empty(slots, dtype=torch.int64, device=key.device)
    pos = torch.empty(slots, dtype=torch.int64, device=key.device)
    counts_kernel[(chunks,)](key, counts, slots, BLOCK=block, EP=ep, num_warps=4,
                             **pdl(key.device))
    sort_kernel[(chunks,)](key, counts, pos, src, ends, slots, n_experts, chunks, K=k,
                           BLOCK=block, EP=ep, CB=max(1, min(1024, 4096 // ep)),
                           num_warps=4, **pdl(key.device))
    return ends, src, pos


def _sort_torch(experts: torch.Tensor, n_experts: int):
    """:func:`sort_picks` by PyTorch's stable sort."""
    N, k = experts.shape
    key = experts.reshape(-1)
    order = torch.argsort(key, stable=True)
    ends = torch.searchsorted(key[order], torch.arange(n_experts, device=key.device), right=True)
    return ends.to(torch.int32), order // k, pick_rows(order, N * k)


def _sort_kernels():
    """``expert_counts_kernel`` and ``expert_sort_kernel``, each ``(triton,
    kernel)`` (:mod:`.triton_moe`), or False without Triton."""
    found = [triton_kernel(f"{__package__}.triton_moe", name)
             for name in ("expert_counts_kernel", "expert_sort_kernel")]
    return found if all(found) else False


def _combine_torch(y, weights, pos):
    N, k = weights.shape
    w = weights.reshape(-1, 1).to(y.dtype)  # [N*k, 1]
    if pos is None:
        return (y * w).view(N, k, y.shape[-1]).sum(1)
    terms = y[pos.clamp(min=0)] * w  # [N*k, D], (token, pick) order
    terms = torch.where((pos >= 0)[:, None], terms, torch.zeros((), dtype=y.dtype, device=y.device))
    return terms.view(N, k, y.shape[-1]).sum(1)


def _combine_launch(y, weights, pos, out=None):
    triton, kernel = _combine_kernel()
    N, k = weights.shape
    D = y.shape[-1]
    out = torch.empty(N, D, dtype=y.dtype, device=y.device) if out is None else out
    if N == 0:
        return out
    block = min(1024, triton.next_power_of_2(D))
    w = weights.contiguous()
    kernel[(N, triton.cdiv(D, block))](y, w, w if pos is None else pos.contiguous(), out, D,
                                        y.stride(0), out.stride(0), K=k, HAS_POS=pos is not None,
                                        BLOCK=block, num_warps=4 if block >= 512 else 1,
                                        **pdl(y.device))
    return out


# Tokens up to which :func:`route_rows` routes them in its two kernels (a
# decode step's; a prompt's logits are a GEMM worth cuBLAS's), and the experts
# it holds in one block of registers. It replaces five kernels: an eager step
# launches three fewer. In CUDA-graph replays on an H100 (bf16, the median of
# 50 calls a replay), Mixtral's 8 x 4096 router at one token took 2.9 us, where
# the one program per token it replaced took 8.7 and PyTorch's five kernels
# 13.8; 64 tokens of 128 x 2048: 9.6 us (51.9, 17.7); but one token of 256 x
# 7168 (S = 448 splits of 16 columns, summed by one program): 23.8 us (338,
# 17.3), where PyTorch's kernels are faster: a router of more than 128 experts
# is left to them (results/real/route-kernels-aff592a.txt).
ROUTE_MAX_TOKENS = 64
ROUTE_MAX_EXPERTS = 128
# Elements of the router's weights a program of route_logits_kernel reads
# (E x BLOCK_D), and of the partials a step of route_kernel adds (BLOCK_S x
# BLOCK_E).
_ROUTE_TILE = 4096


def _route_kernel():
    """``(triton, route_kernel)`` (:mod:`.triton_moe`), or False without Triton."""
    return triton_kernel(f"{__package__}.triton_moe", "route_kernel")


def _route_logits_kernel():
    """``(triton, route_logits_kernel)`` (:mod:`.triton_moe`), or False without Triton."""
    return triton_kernel(f"{__package__}.triton_moe", "route_logits_kernel")


def routable(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether :func:`route_rows` routes ``x [N, D]`` by the router ``w [E, D]``
    in its two kernels: CUDA, half precision, a decode step's few tokens."""
    return (_halves_on_gpu(x, w) and x.dim() == 2 and x.stride(-1) == 1
            and x.shape[0] <= ROUTE_MAX_TOKENS and w.shape[0] <= ROUTE_MAX_EXPERTS
            and bool(_route_kernel())
            and bool(_route_logits_kernel()))


def route_rows(x: torch.Tensor, w: torch.Tensor, top_k: int):
    """``(weights [N, k] float32, experts [N, k] int64)``: the softmax top-k
    router ``w [E, D]`` on ``x [N, D]``, the picks and their softmax as
    :func:`.reference.route` takes them, in two launches:

    * ``route_logits_kernel``, grid ``(N, S)``: the float32 partial logits of
      each token over each chunk of ``BLOCK_D`` columns (``S = cdiv(D,
      BLOCK_D)``; ``E x BLOCK_D`` at most 4096 elements a program, ``BLOCK_D``
      16 to 256: 16 programs a token for Mixtral's 8 x 4096) into ``[N, S, E]``;
    * ``route_kernel``, grid ``(N,)``: each token's partials summed over the
      splits, its top-k picks (the lowest index first among equals) and their
      softmax.

    Two, not one: a single program per token walking all of ``D`` took 8.7 us
    in a graph (17.2 in a profiled step) for Mixtral's 8 x 4096 router (one
    token, an H100), latency-bound where
    the weights are 64 KB; the first kernel spreads that read over ``N x S``
    programs. The logits are the exact products summed in float32, as the
    router's float32-output GEMM sums them (:func:`.reference.router_logits`),
    in another order (each chunk's, then the chunks'). Callers ask
    :func:`routable`."""
    triton, kernel = _route_kernel()
    _, logits_kernel = _route_logits_kernel()
    (N, D), E = x.shape, w.shape[0]
    weights = torch.empty(N, top_k, dtype=torch.float32, device=x.device)
    experts = torch.empty(N, top_k, dtype=torch.int64, device=x.device)
    block_e = triton.next_power_of_2(E)
    block_d = max(16, min(256, _ROUTE_TILE // block_e, triton.next_power_of_2(D)))
    splits = triton.cdiv(D, block_d)
    partials = torch.empty(N, splits, E, dtype=torch.float32, device=x.device)
    logits_kernel[(N, splits)](x, w, partials, D, E, x.stride(0), w.stride(0),
                               BLOCK_E=block_e, BLOCK_D=block_d, num_warps=4, **pdl(x.device))
    block_s = max(1, min(triton.next_power_of_2(splits), _ROUTE_TILE // block_e))
    kernel[(N,)](partials, weights, experts, splits, E, K=top_k, BLOCK_S=block_s,
                 BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k),
                 num_warps=4 if block_s * block_e >= 1024 else 1, **pdl(x.device))
    return weights, experts


def pickable(logits: torch.Tensor) -> bool:
    """Whether :func:`pick_top` takes a prompt's router logits ``[N, E]``:
    float32 on a GPU, at most ``ROUTE_MAX_EXPERTS``, with Triton."""
    return (logits.is_cuda and logits.dtype == torch.float32 and logits.dim() == 2
            and 0 < logits.shape[0] and logits.shape[1] <= ROUTE_MAX_EXPERTS
            and bool(_route_kernel()))


def pick_top(logits: torch.Tensor, top_k: int):
    """:func:`.reference.route` of a prompt's float32 router logits ``[N, E]``
    (its GEMM's output): ``(weights [N, k] float32, experts [N, k] int64)``
    by ``route_kernel`` alone (the logits as its partials of one split): one
    launch where ``torch.topk`` and the softmax take three (a Mixtral-8x7b
    prompt of 2048 tokens on an H100: 13.8 us a layer, results/real/
    trace-mixtral-prefill-1x2048-039d4ee-graph.txt). The same picks but
    where two logits are exactly equal (the kernel takes the lower index).
    Callers ask :func:`pickable`."""
    triton, kernel = _route_kernel()
    N, E = logits.shape
    weights = torch.empty(N, top_k, dtype=torch.float32, device=logits.device)
    experts = torch.empty(N, top_k, dtype=torch.int64, device=logits.device)
    partials = logits.contiguous().view(N, 1, E)  # [N, S = 1, E]
    kernel[(N,)](partials, weights, experts, 1, E, K=top_k, BLOCK_S=1,
                 BLOCK_E=triton.next_power_of_2(E), BLOCK_K=triton.next_power_of_2(top_k),
                 num_warps=1, **pdl(logits.device))
    return weights, experts


def pdl(device) -> dict:
    """The launch options that make a kernel a programmatic dependent launch
    on ``device`` (Hopper and later, with a Triton that has
    ``griddepcontrol``): each kernel waits for the one before it at its first
    statement (:func:`.triton_pdl.await_inputs`), and is scheduled while that
    one's last programs run, hiding a launch between two kernels of a CUDA
    graph. ``{}`` elsewhere (off the GPU, under Triton's interpreter, while
    a step is counted or recorded)."""
    if (not PDL or device.type != "cuda" or LOAD_HOOK is not None
            or os.environ.get("TRITON_INTERPRET") == "1"):
        return {}
    return _cuda_pdl(torch.cuda.current_device() if device.index is None else device.index)


def pdl_ahead(device, lines: bool) -> dict:
    """:func:`pdl`'s options, and ``PREFETCH`` (:data:`PREFETCH_STEPS`) where
    the launch is dependent, the switch is on and ``lines``: the launch's
    steps hold whole 128-byte lines of each row it asks L2 for."""
    dependent = pdl(device)
    if dependent and PREFETCH_STEPS and lines:
        return {**dependent, "PREFETCH": PREFETCH_STEPS}
    return dependent


@functools.lru_cache(maxsize=None)
def _cuda_pdl(index: int) -> dict:
    import triton.language as tl

    ok = torch.cuda.get_device_capability(index)[0] >= 9 and hasattr(tl.extra.cuda, "gdc_wait")
    return {"PDL": True, "launch_pdl": True} if ok else {}


def _sms(device) -> int:
    """The GPU's SMs (1 off a GPU: Triton's interpreter on CPU), read once
    per device: an eager decode step launches this kernel twice a layer."""
    if device.type != "cuda":
        return 1
    return _cuda_sms(torch.cuda.current_device() if device.index is None else device.index)


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count
