"""All-reduce, residual add and normalisation in one GPU kernel (decode steps).

A tensor-parallel layer ends in a row-parallel matrix whose partial sums are
all-reduced, added to the residual stream and normalised for the next
matrix. In a decode step (a few rows) the all-reduce is latency: a one-shot
all-reduce on symmetric memory is one kernel and a cross-GPU handshake, and
the add and norm after it are a second kernel. :class:`FusedReduceNorm` does
all of it in one kernel: each program takes one row, copies this rank's
partial into a buffer its peers can read over NVLink, raises a flag in every
peer's flag array, waits for theirs, sums the partials in rank order in
float32, rounds the sum to the activation dtype (as the all-reduce does),
adds the residual and normalises, exactly as :func:`~shardwise.model.kernels.add_norm`
does after :meth:`~shardwise.parallel.comm.Comm.all_reduce`.

Handshake (no host involvement, so a CUDA graph can replay it): every row
keeps an epoch counter on the device, one more each call. A rank stores its
row in slot ``epoch % 2`` of its buffer, then writes ``epoch`` into the
peers' flags for (its rank, the row) with release semantics, and waits until
its own flags for every peer reach ``epoch`` (acquire). A slot is written
again two calls later, and by then this rank has seen the peers' flags of
the call in between, which they raise only after the call before it (whose
reads of that slot are the last) has finished on their stream.
Every rank must make the same sequence of calls on the axis, as for any
collective.
"""
from __future__ import annotations

import torch
from torch import nn

from ..model.kernels import eps_of, norm_fusable

# Rows one call may hold (a decode step's tokens on this rank).
MAX_ROWS = 128
_triton = None  # (triton, kernel), or False when Triton is unavailable


def _kernel():
    global _triton
    if _triton is None:
        try:
            import triton
            import triton.language as tl
        except ImportError:
            _triton = False
            return _triton

        @triton.jit
        def reduce_add_norm_kernel(P, BUFS, FLAGS, EPOCH, X, H, Y, W, B, D, eps,
                                   RANK: tl.constexpr, WORLD: tl.constexpr,
                                   ROWS: tl.constexpr, HAS_NORM: tl.constexpr,
                                   HAS_BIAS: tl.constexpr, RMS: tl.constexpr,
                                   BLOCK: tl.constexpr):
            row = tl.program_id(0)
            cols = tl.arange(0, BLOCK)
            keep = cols < D
            # This call's epoch for the row: every thread reads the old
            # value before any writes the new one.
            e = tl.load(EPOCH + row) + 1
            tl.debug_barrier()
            tl.store(EPOCH + row, e)
            slot = ((e % 2) * ROWS + row).to(tl.int64) * D
            p = tl.load(P + row.to(tl.int64) * D + cols, mask=keep, other=0.0)
            mine = tl.load(BUFS + RANK).to(tl.pointer_type(P.dtype.element_ty))
            tl.store(mine + slot + cols, p, mask=keep)
            tl.debug_barrier()  # the whole row is stored before the flags go up
            for j in tl.static_range(WORLD):
                if j != RANK:
                    flag = tl.load(FLAGS + j).to(tl.pointer_type(tl.int32)) + RANK * ROWS + row
                    tl.atomic_xchg(flag, e, sem="release", scope="sys")
            own = tl.load(FLAGS + RANK).to(tl.pointer_type(tl.int32))
            for j in tl.static_range(WORLD):
                if j != RANK:
                    seen = tl.atomic_add(own + j * ROWS + row, 0, sem="acquire", scope="sys")
                    while seen - e < 0:  # a peer is at most one call ahead
                        seen = tl.atomic_add(own + j * ROWS + row, 0, sem="acquire", scope="sys")
            tl.debug_barrier()
            acc = tl.zeros([BLOCK], dtype=tl.float32)
            for j in tl.static_range(WORLD):  # rank order: the same sum on every rank
                if j == RANK:
                    acc += p.to(tl.float32)
                else:
                    peer = tl.load(BUFS + j).to(tl.pointer_type(P.dtype.element_ty))
                    acc += tl.load(peer + slot + cols, mask=keep, other=0.0,
                                   volatile=True).to(tl.float32)
            base = row.to(tl.int64) * D
            x = tl.load(X + base + cols, mask=keep, other=0.0)
            a = acc.to(x.dtype)  # the all-reduce's result, rounded
            h = (x.to(tl.float32) + a.to(tl.float32)).to(x.dtype)
            tl.store(H + base + cols, h, mask=keep)
            if HAS_NORM:
                v = h.to(tl.float32)
                if RMS:
                    rstd = 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / D + eps)
                    y = v * rstd
                else:
                    mean = tl.sum(v, axis=0) / D
                    c = tl.where(keep, v - mean, 0.0)
                    rstd = 1.0 / tl.sqrt(tl.sum(c * c, axis=0) / D + eps)
                    y = c * rstd
                y = y * tl.load(W + cols, mask=keep, other=0.0).to(tl.float32)
                if HAS_BIAS:
                    y = y + tl.load(B + cols, mask=keep, other=0.0).to(tl.float32)
                tl.store(Y + base + cols, y.to(x.dtype), mask=keep)

        _triton = (triton, reduce_add_norm_kernel)
    return _triton


def fusable(p: torch.Tensor, x: torch.Tensor, module: nn.Module | None) -> bool:
    """Whether one kernel can do ``x + all_reduce(p)`` and ``module`` of it:
    CUDA half-precision activations, partials in that dtype or float32, at
    most ``MAX_ROWS`` contiguous rows, a LayerNorm or RMSNorm (or none)."""
    return (p.dtype in (x.dtype, torch.float32) and p.shape == x.shape
            and x.is_contiguous() and p.is_contiguous() and x.numel() // x.shape[-1] <= MAX_ROWS
            and norm_fusable(module, x) and bool(_kernel()))


class FusedReduceNorm:
    """The symmetric buffers, flags and epochs of one mesh axis (made once,
    collectively, outside CUDA graph capture) and the kernel's launch."""

    def __init__(self, group, device):
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        self.group, self.device = group, device
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self._symm = symm_mem
        flags = symm_mem.empty((self.world, MAX_ROWS), dtype=torch.int32, device=device)
        flags.zero_()
        self.flags_ptrs = self._peers(flags)
        self._flags = flags
        self.epoch = torch.zeros(MAX_ROWS, dtype=torch.int32, device=device)
        self.bufs: dict = {}  # (dtype, D) -> (buffer, its peers' addresses)
        torch.cuda.synchronize(device)
        dist.barrier(group=group)  # every rank's flags are zero before anyone signals

    def _peers(self, t: torch.Tensor) -> torch.Tensor:
        """Addresses of every rank's ``t`` (rank order), as a device int64 tensor."""
        hdl = self._symm.rendezvous(t, self.group.group_name)
        offset = t.data_ptr() - hdl.buffer_ptrs[self.rank]
        return torch.tensor([b + offset for b in hdl.buffer_ptrs], dtype=torch.int64,
                            device=self.device)

    def ready(self, dtype: torch.dtype, d: int) -> bool:
        """Make the buffer for partials of ``dtype`` and width ``d`` (every rank
        of the axis at the same call); False during CUDA graph capture when
        it does not exist yet."""
        if (dtype, d) in self.bufs:
            return True
        if torch.cuda.is_current_stream_capturing():
            return False
        buf = self._symm.empty((2, MAX_ROWS, d), dtype=dtype, device=self.device)
        self.bufs[(dtype, d)] = (buf, self._peers(buf))
        return True

    def __call__(self, p: torch.Tensor, x: torch.Tensor, module: nn.Module | None):
        triton, kernel = _kernel()
        D = x.shape[-1]
        rows = x.numel() // D
        _, bufs = self.bufs[(p.dtype, D)]
        h = torch.empty_like(x)
        y = torch.empty_like(x) if module is not None else h
        rms = isinstance(module, nn.RMSNorm)
        w = module.weight if module is not None else x
        bias = None if module is None or rms else module.bias
        eps = eps_of(module, x) if module is not None else 0.0
        block = triton.next_power_of_2(D)
        kernel[(rows,)](p, bufs, self.flags_ptrs, self.epoch, x, h, y, w,
                        bias if bias is not None else w, D, eps,
                        RANK=self.rank, WORLD=self.world, ROWS=MAX_ROWS,
                        HAS_NORM=module is not None, HAS_BIAS=bias is not None, RMS=rms,
                        BLOCK=block, num_warps=min(16, max(4, block // 512)))
        return h, (y if module is not None else None)
