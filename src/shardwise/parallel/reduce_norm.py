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

from ..model.kernels import eps_of, norm_fusable, triton_kernel

# Rows one call may hold (a decode step's tokens on this rank).
MAX_ROWS = 128


def _kernel():
    """``(triton, reduce_add_norm_kernel)`` (:mod:`.triton_reduce_norm`), or
    False without Triton."""
    return triton_kernel(f"{__package__}.triton_reduce_norm", "reduce_add_norm_kernel")


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
