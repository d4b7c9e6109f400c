"""shardwise's Triton kernels off the GPU: computed by PyTorch on CPU (so a
count of a real step along the GPU branches runs them, one launch each) and
described as the device kernel they are (so a recorded step prices them).

The code launches a Triton kernel as ``kernel[grid](*args, **constexprs)``
with the kernel loaded through ``model.kernels.triton_kernel``; while a step
is counted or recorded the load hook hands out these stand-ins under the
kernel's name, with :class:`TritonShim` in place of ``triton``. Each stand-in
takes the kernel's own arguments:

* ``run(grid, *args, **kw)``: the kernel's effect on CPU tensors, by the
  PyTorch form of the same arithmetic (rounding aside);
* ``effect(recorder, grid, *args, **kw)``: what a recorded launch leaves
  that later work reads (the routing a router kernel picks); nothing by
  default;
* ``kernel(grid, *args, **kw)``: the :class:`~.events.Kernel` it is on a GPU.
  By default a ``triton`` kernel moving the bytes of its tensor arguments
  (rows: the grid's first dimension); the rotary embedding moves only this
  step's rows, and the flash kernel is an ``attention`` kernel of backend
  ``wide`` with its FLOPs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .events import Kernel
from .trace import _Lazy, set_shadow, shadow_of


class TritonShim:
    """What code that launches a Triton kernel asks of ``triton`` itself, where
    the kernel is a stand-in."""

    @staticmethod
    def next_power_of_2(n: int) -> int:
        return 1 << max(0, int(n) - 1).bit_length()

    @staticmethod
    def cdiv(a: int, b: int) -> int:
        return -(-a // b)

    class tools:  # noqa: N801 - triton.tools.tensor_descriptor.TensorDescriptor's place
        class tensor_descriptor:  # noqa: N801
            @dataclass
            class TensorDescriptor:
                base: torch.Tensor
                shape: list
                strides: list
                block_shape: list


def _tensors(args) -> list[torch.Tensor]:
    """The tensors a launch hands the kernel (a descriptor's by its base)."""
    out = []
    for a in args:
        if isinstance(a, TritonShim.tools.tensor_descriptor.TensorDescriptor):
            a = a.base
        if isinstance(a, torch.Tensor):
            out.append(a)
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


class StandIn:
    """A Triton kernel by name; :meth:`run` where it has a PyTorch form."""

    def __init__(self, name: str):
        self.name = name

    def run(self, grid, *args, **kw) -> None:
        raise NotImplementedError(f"no CPU form of the Triton kernel {self.name}")

    def effect(self, recorder, grid, *args, **kw) -> None:
        pass

    def kernel(self, grid, *args, **kw) -> Kernel:
        tensors = _tensors(args)
        rows = grid[0] if isinstance(grid, tuple) else 1
        width = tensors[0].numel() // max(rows, 1) if tensors else 0
        moved = float(sum(map(_nbytes, tensors)))
        return Kernel("triton", 0.0, moved, (self.name, rows, width),
                      _dtype(tensors[0]) if tensors else "")


class AddNorm(StandIn):
    """:mod:`shardwise.model.kernels`' fused residual add + norm."""

    def run(self, grid, X, A, H, Y, W, B, D, eps, HAS_RES, HAS_BIAS, RMS, BLOCK, num_warps):
        import torch.nn.functional as Fn

        h = X + A if HAS_RES else X
        if HAS_RES:
            H.copy_(h)
        hf = h.float()
        if RMS:
            y = hf * (hf.pow(2).mean(-1, keepdim=True) + eps).rsqrt() * W.float()
        else:
            y = Fn.layer_norm(hf, (D,), W.float(), B.float() if HAS_BIAS else None, eps)
        Y.copy_(y)


class Merge(StandIn):
    """:mod:`shardwise.model.merge`'s merge of attention partials."""

    def run(self, grid, O, L, OUT, LOUT, N, D, so_n, so_r, sl_n, sl_r, **blocks):
        from ..model.merge import _merge_math

        out, total = _merge_math(O, L)  # [rows, d], [rows]
        OUT.view(-1, D).copy_(out)
        LOUT.view(-1).copy_(total)


class SwiGLU(StandIn):
    """:func:`shardwise.model.kernels.swiglu`'s ``silu(gate) * up``."""

    def run(self, grid, H, Y, F, sh, sy, BLOCK, num_warps):
        from ..model.kernels import _swiglu_torch

        Y.view(-1, F).copy_(_swiglu_torch(H))  # H: the rows [n, 2F]


class Rotary(StandIn):
    """:func:`shardwise.model.rotary.rotate`: q (and k) of this step's tokens
    rotated; with a cache, the rotated keys and the values stored at its rows
    ``slot..slot+T``. Reads and writes those rows only."""

    @staticmethod
    def _at(ptr, value, on_device: bool) -> int:
        return int(ptr) if on_device else int(value)

    def run(self, grid, Q, K, V, KO, VO, COS, SIN, POS, SLOT, T, pos0, slot0, *strides,
            HAS_Q, HAS_K, HAS_V, POS_PTR, SLOT_PTR, **kw):
        from ..model.rope import rotated

        p = self._at(POS, pos0, POS_PTR)
        cos, sin = COS[p : p + T], SIN[p : p + T]
        if HAS_Q:
            Q.copy_(rotated(Q, cos, sin))
        if HAS_K:
            s = self._at(SLOT, slot0, SLOT_PTR)
            KO[:, s : s + T].copy_(rotated(K, cos, sin))
            if HAS_V:
                VO[:, s : s + T].copy_(V)

    def kernel(self, grid, Q, K, V, KO, VO, COS, SIN, POS, SLOT, T, pos0, slot0, *strides,
               HAS_Q, HAS_K, HAS_V, **kw):
        step = [Q] * HAS_Q + [K] * HAS_K + [V] * HAS_V  # read once, written once
        moved = 2.0 * sum(map(_nbytes, step))
        x = Q if HAS_Q else K
        return Kernel("triton", 0.0, moved, (self.name, grid[0], math.prod(x.shape[2:])), _dtype(x))


class Flash(StandIn):
    """:mod:`shardwise.model.flash`'s attention for wide heads, with its lse:
    on CPU the float32 attention of :mod:`shardwise.parallel.lse`; on a GPU
    an attention kernel (backend ``wide``) of 4 d FLOPs per scored pair and
    head, reading q, K, V and writing o and the lse."""

    def run(self, grid, Q, desc_k, desc_v, desc_o, LSE, sq_b, sq_h, sq_t, T, S, G, Hkv,
            q_start, qk_scale, CAUSAL, **kw):
        from ..parallel.lse import _attend_math, _expand_kv

        k, v = _expand_kv(Q, desc_k.base, desc_v.base)
        keep = None
        if CAUSAL:  # query t sees keys up to q_start + t
            keep = torch.arange(S)[None, :] <= q_start + torch.arange(T)[:, None]
        o, lse = _attend_math(Q, k, v, keep, qk_scale / math.log2(math.e), False)
        desc_o.base.copy_(o)
        LSE.copy_(lse)

    def kernel(self, grid, Q, desc_k, desc_v, desc_o, LSE, sq_b, sq_h, sq_t, T, S, G, Hkv,
               q_start, qk_scale, CAUSAL, **kw):
        B, H, _, d = Q.shape
        if CAUSAL:  # query t sees min(S, q_start + t + 1) keys
            full = max(0, min(T, S - q_start))  # queries before the keys run out
            pairs = full * (q_start + 1) + full * (full - 1) / 2 + (T - full) * S
        else:
            pairs = T * S
        moved = sum(map(_nbytes, (Q, desc_k.base, desc_v.base, desc_o.base, LSE)))
        return Kernel("attention", 4.0 * B * H * d * pairs, float(moved),
                      ("wide", B, H, T, S, d, bool(CAUSAL), False), _dtype(Q))


class ExpertRows(StandIn):
    """:func:`shardwise.model.kernels.expert_rows`: each routed row through
    its own expert (a grouped GEMV), reading only the routed experts'
    weights: a GEMM-class kernel of the rows whose expert is held (all of
    them where the routing is not known). ``DENSE``: every row by one matrix
    (:func:`shardwise.model.kernels.linear`); ``SWIGLU``: rows of ``[gate |
    up]`` (twice the width read) activated as they are loaded."""

    def run(self, grid, X, W, E, Y, O, held, first, sx, swe, swo, sy, I, PER, DENSE=False,
            SWIGLU=False, **kw):
        from ..model.kernels import _expert_rows_torch, _swiglu_torch

        if SWIGLU:  # the rows are silu(gate) * up of X's [gate | up]
            X = _swiglu_torch(X)
        if DENSE:  # :func:`shardwise.model.kernels.linear`'s GEMV: one matrix, every row
            Y.copy_(X @ W[0].t())
        else:
            Y.copy_(_expert_rows_torch(X, W, E, first, PER))

    def kernel(self, grid, X, W, E, Y, O, held, first, sx, swe, swo, sy, I, PER, DENSE=False,
               **kw):
        picks = shadow_of(E)  # the routing, where the recorder holds it
        if DENSE:
            rows = grid[0]
        else:
            rows = E.numel() if picks is None else int(((picks >= first)
                                                        & (picks < first + held)).sum())
        moved = rows * O * I * W.element_size() + _nbytes(X) + _nbytes(Y)
        return Kernel("gemm", 2.0 * rows * O * I, float(moved), (rows, 1, I, O), _dtype(X))


class Rows(StandIn):
    """:func:`shardwise.model.kernels.linear` of 2 to 16 rows (``rows_kernel``):
    ``x [M, I]`` by ``W [(2)O, I]``, and (``GATED``) SwiGLU of the gate's and
    the up's products; split (``SPLIT`` > 1), the float32 sums of the
    programs' shares into ``P``, which :class:`RowsFinish` adds. A
    GEMM-class kernel of ``M`` rows reading the weights once."""

    def run(self, grid, X, W, Y, P, M, O, F, sx, sw, sy, sxb, swb, syb, *, GATED, SPLIT, **kw):
        from ..model.kernels import _swiglu_torch

        if X.dim() == 3:  # a batch (ungated, unsplit): x [E, N, I], w [E, O, I]
            Y.copy_(torch.bmm(X.float(), W.float().transpose(1, 2)))
            return
        h = X[:M].float() @ W.float().t()  # [M, (2)O]
        if GATED:  # O / F stacked [gate; up]: the gates' outputs, then the ups'
            h = h.view(M, O // F, 2, F).transpose(1, 2).reshape(M, 2 * O)
        if SPLIT > 1:  # the whole sum in the first share, zeros in the others
            P.zero_()
            P[0].copy_(h)
        else:
            Y.copy_(_swiglu_torch(h.to(Y.dtype)) if GATED else h)

    def kernel(self, grid, X, W, Y, P, M, O, F, sx, sw, sy, sxb, swb, syb, *, I, GATED, SPLIT,
               **kw):
        outs, batch = (1 + GATED) * O, grid[2] if len(grid) > 2 else 1
        moved = _nbytes(W) + SPLIT * _nbytes(X) + (_nbytes(P) if SPLIT > 1 else _nbytes(Y))
        return Kernel("gemm", 2.0 * batch * M * I * outs, float(moved), (batch, M, I, outs),
                      _dtype(X))


class RowsFinish(StandIn):
    """``rows_finish_kernel``: :class:`Rows`' split sums added and rounded
    (and, ``GATED``, activated). Priced by its arguments."""

    def run(self, grid, P, Y, M, O, sy, *, GATED, **kw):
        from ..model.kernels import _swiglu_torch

        h = P.sum(0)
        Y.copy_(_swiglu_torch(h.to(Y.dtype)) if GATED else h)


class Grouped(StandIn):
    """:func:`shardwise.model.kernels.grouped_linear`: each expert's rows
    (sorted by expert, ending at ``ENDS``) by its own matrix, and
    (``GATED``) SwiGLU of the gate's and the up's products. A GEMM-class
    kernel of every row, reading each expert's weights, priced as the
    grouped GEMM it replaces."""

    def run(self, grid, X, W, Y, ENDS, O, sx, swe, sw, sy, *, GATED, **kw):
        _grouped_run(X, W, Y, ENDS, GATED)

    def kernel(self, grid, X, W, Y, ENDS, O, sx, swe, sw, sy, *, K, E, GATED, **kw):
        return _grouped_kernel(X, W, Y, K, E, O, GATED)


class GroupedTMA(StandIn):
    """``grouped_tma_kernel``: :class:`Grouped`'s product with its operands
    given as TMA descriptors (each of the tensor it addresses: ``x``, and
    the ``[E, (2)O, K]`` weights)."""

    def run(self, grid, x_desc, x_half, w_desc, Y, ENDS, O, sy, *, GATED, **kw):
        _grouped_run(x_desc.base, w_desc.base, Y, ENDS, GATED)

    def kernel(self, grid, x_desc, x_half, w_desc, Y, ENDS, O, sy, *, K, E, GATED, **kw):
        return _grouped_kernel(x_desc.base, w_desc.base, Y, K, E, O, GATED)


def _grouped_run(X, W, Y, ENDS, GATED) -> None:
    """The grouped product's rows where the offsets are known (not on meta tensors)."""
    from ..model.kernels import _grouped_torch

    if not X.is_meta:
        rows = int(ENDS[-1])
        Y[:rows].copy_(_grouped_torch(X[:rows], W, ENDS, GATED))


def _grouped_kernel(X, W, Y, K, E, O, GATED) -> Kernel:
    rows, outs = X.shape[0], (1 + GATED) * O
    moved = _nbytes(X) + _nbytes(W) + _nbytes(Y)
    return Kernel("gemm", 2.0 * rows * K * outs, float(moved), (E, max(1, rows // E), K, outs),
                  _dtype(X))


class Combine(StandIn):
    """:func:`shardwise.model.kernels.combine_picks`: each token's picked
    expert rows gathered, weighted and summed (the default pricing: the bytes
    of its arguments, each row of ``y`` read once, each token's row written)."""

    def run(self, grid, Y, W, POS, OUT, D, sy, so, K, HAS_POS, BLOCK, **kw):
        from ..model.kernels import _combine_torch

        OUT.copy_(_combine_torch(Y, W, POS if HAS_POS else None))


class ExpertCounts(StandIn):
    """:func:`shardwise.model.kernels.sort_picks`' first kernel: each block of
    (token, pick) slots' count of each expert (priced by its arguments)."""

    def run(self, grid, EX, C, N, *, BLOCK, EP, **kw):
        if not EX.is_meta:
            blocks = torch.arange(N, device=EX.device) // BLOCK
            C.zero_().index_put_((blocks, EX[:N]), torch.ones_like(C[0, :1]).expand(N),
                                 accumulate=True)


class ExpertSort(StandIn):
    """:func:`shardwise.model.kernels.sort_picks`' second kernel: the slots
    sorted by expert (their rows, tokens and each expert's end), written as
    the sort's PyTorch form writes them (priced by its arguments)."""

    def run(self, grid, EX, C, POS, SRC, ENDS, N, E, CHUNKS, *, K, **kw):
        from ..model.kernels import _sort_torch

        if not EX.is_meta:
            for out, got in zip((ENDS, SRC, POS), _sort_torch(EX[:N].view(-1, K), E)):
                out.copy_(got)

    def effect(self, recorder, grid, EX, C, POS, SRC, ENDS, N, E, CHUNKS, *, K, **kw) -> None:
        """The sorted order where the recorder holds the picks (their draw):
        what sizes the work that reads it (an exchange's splits)."""
        from ..model.kernels import _sort_torch

        picks = shadow_of(EX)
        if picks is None:
            return
        sort = _Lazy(lambda: _sort_torch(picks.reshape(-1)[:N].view(-1, K), E))
        for i, out in enumerate((ENDS, SRC, POS)):
            set_shadow(out, _Lazy(lambda i=i: sort.get()[i]))


class DecodeSplit(StandIn):
    """:mod:`shardwise.model.decode`'s split-key attention of one query
    position: each split's float32 attention (:mod:`shardwise.parallel.lse`'s
    math) over its run of keys, stacked ``[splits, B*H]``, and (``FUSE``)
    their merge (:mod:`shardwise.model.merge`'s math) into ``OUT, LOUT``. On
    a GPU an attention kernel of backend ``split``: 4 d FLOPs per key and
    query head, reading q and the cache's K and V views once, writing the
    float32 partials and, fused, reading them back and writing the merge."""

    def run(self, grid, Q, K, V, O, L, N, n0, S, sq_b, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s,
            Hkv, rows_all, chunk, qk_scale, OUT, LOUT, CNT, splits, D, N_PTR, FUSE, **kw):
        from ..parallel.lse import _attend_math, _expand_kv

        B, H = Q.shape[0], Q.shape[1]
        q = Q.reshape(B, H, 1, D).float()
        n = min(int(N.reshape(-1)[0]) if N_PTR else int(n0), S)
        for s in range(grid[1]):
            lo, hi = s * chunk, min((s + 1) * chunk, n)
            if hi <= lo:
                O[s], L[s] = 0.0, float("-inf")
                continue
            k, v = _expand_kv(q, K[:, :, lo:hi], V[:, :, lo:hi])
            o, lse = _attend_math(q, k.float(), v.float(), None, qk_scale / math.log2(math.e), False)
            O[s], L[s] = o.reshape(B * H, D), lse.reshape(B * H)
        if FUSE:
            from ..model.merge import _merge_math

            o, lse = _merge_math(O, L, OUT.dtype)
            OUT.copy_(o)
            LOUT.copy_(lse)

    def kernel(self, grid, Q, K, V, O, L, N, n0, S, sq_b, sq_h, sk_b, sk_h, sk_s, sv_b, sv_h,
               sv_s, Hkv, rows_all, chunk, qk_scale, OUT, LOUT, CNT, splits, *, D, FUSE, **kw):
        B, H = Q.shape[0], Q.shape[1]
        # the keys held (a static step: all of them); fused, the partials read back and the merge
        parts = (O, L, O, L, OUT, LOUT) if FUSE else (O, L)
        moved = sum(map(_nbytes, (Q, K, V, *parts)))
        return Kernel("attention", 4.0 * B * H * D * S, float(moved),
                      ("split", B, H, 1, S, D, False, False), _dtype(Q))


class RouteLogits(StandIn):
    """:func:`shardwise.model.kernels.route_rows`' first kernel: the router's
    float32 partial logits of each token over each chunk of ``BLOCK_D``
    columns, ``P[t, s, :E]`` (the products of ``R[:, chunk]`` and ``X[t,
    chunk]`` in float32). Priced by its arguments: it reads ``X`` and ``R``
    and writes ``P``."""

    def run(self, grid, X, R, P, D, E, sx, sr, *, BLOCK_D, **kw):
        for s in range(grid[1]):
            chunk = slice(s * BLOCK_D, min(D, (s + 1) * BLOCK_D))
            P[:, s, :E] = X[:, chunk].float() @ R[:, chunk].float().t()


class Route(StandIn):
    """:func:`shardwise.model.kernels.route_rows`' second kernel: each token's
    logits summed from :class:`RouteLogits`' partials, its top-k picks and
    their softmax for a decode step's tokens (:func:`.reference.route` of the
    float32 logits on CPU). Recorded, its picks are drawn as the recorder
    draws any routing (:meth:`effect`), so the experts' kernels that read
    them are priced by the rows each rank holds."""

    def run(self, grid, P, WT, EX, S, E, K, **kw):
        from ..model.reference import route

        weights, experts = route(P[:, :S, :E].sum(1), K)
        WT.copy_(weights)
        EX.copy_(experts)

    def effect(self, recorder, grid, P, WT, EX, S, E, K, **kw) -> None:
        recorder.draw_picks(EX, grid[0], E, K)


STAND_INS = {"add_norm_kernel": AddNorm, "merge_kernel": Merge, "swiglu_kernel": SwiGLU,
             "rotary_kernel": Rotary, "flash_fwd_kernel": Flash,
             "expert_rows_kernel": ExpertRows, "decode_split_kernel": DecodeSplit,
             "combine_kernel": Combine, "route_logits_kernel": RouteLogits,
             "route_kernel": Route, "rows_kernel": Rows, "rows_finish_kernel": RowsFinish,
             "grouped_kernel": Grouped, "grouped_tma_kernel": GroupedTMA,
             "expert_counts_kernel": ExpertCounts, "expert_sort_kernel": ExpertSort}


def stand_in(name: str) -> StandIn:
    return STAND_INS.get(name, StandIn)(name)
