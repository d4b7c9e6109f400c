"""The only module that talks to ``torch.distributed``.

Every collective goes through :class:`Comm`, which counts calls and bytes per
(operation, mesh axis) so that runs can report the communication they do.
It works on gloo and NCCL and on the torch releases that renamed the
tensor collectives (``all_gather_into_tensor`` -> ``all_gather_single``).
Operations on an axis of size 1 return at once and count nothing.

An all-reduce may span several axes (a tuple: one group of all their
ranks, counted as ``world`` when it is the whole mesh), and an all-reduce
of an empty tensor (a micro-batch without sequences, which every rank of
the group then has) returns at once.

Bytes are counted as the payload of this rank's call: the buffer for
all-reduce, the gathered output for all-gather, the input for reduce-scatter
and all-to-all, the tensor for point-to-point.

``Comm.hook`` (None unless the job's watchdog or a collective fault is on) is
told of every collective call (``called(key)``) and of every wait on peers
(``waiting(key)`` ... ``done()``); with no hook the only cost is one test.
"""
from __future__ import annotations

import os
import time
from collections import defaultdict
from typing import Sequence

import torch
import torch.distributed as dist

from ..model.kernels import add_norm
from . import reduce_norm
from .topology import Topology

_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_into = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


# Largest all-reduce sent through symmetric memory (one-shot); larger ones
# are bandwidth-bound and go to NCCL.
ONE_SHOT_MAX_BYTES = 512 * 1024


class Comm:
    def __init__(self, topo: Topology):
        self.topo = topo
        self.backend = dist.get_backend() if dist.is_initialized() else "none"
        self.stats: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # key -> [calls, bytes]
        self.time_blocking, self.blocking_s = False, 0.0
        self.hook = None  # see the module docstring
        self.one_shot = (self.backend == "nccl" and os.environ.get("SHARDWISE_ONE_SHOT", "1") != "0"
                         and hasattr(torch.ops, "symm_mem")
                         and hasattr(torch.ops.symm_mem, "one_shot_all_reduce_copy_out"))
        self._symm: dict = {}  # (axis, shape, dtype) -> symmetric buffer
        self._fused: dict = {}  # axis -> FusedReduceNorm

    def _watch(self, work, key: str):
        """``work`` (a request), reporting its ``wait()`` to the hook when there is one."""
        return work if self.hook is None else _Watched(work, self.hook, key)

    # -- accounting -------------------------------------------------------
    def _count(self, op: str, axis: str | tuple[str, ...], nbytes: int) -> str:
        key = f"{op}/{self.topo.axis_key(axis)}"
        s = self.stats[key]
        s[0] += 1
        s[1] += int(nbytes)
        if self.hook is not None:
            self.hook.called(key)
        return key

    def reset(self) -> None:
        self.stats.clear()
        self.blocking_s = 0.0

    def _blocking(self, key: str, fn, *args, **kwargs):
        """Run a blocking collective; with ``self.time_blocking`` set, bracket it
        with device synchronisations and add its wall time to ``blocking_s``
        (used once per benchmark, on an extra untimed step, for comm_share)."""
        if self.hook is not None:
            self.hook.waiting(key)
            try:
                return self._timed(fn, *args, **kwargs)
            finally:
                self.hook.done()
        return self._timed(fn, *args, **kwargs)

    def _timed(self, fn, *args, **kwargs):
        if not self.time_blocking:
            return fn(*args, **kwargs)
        sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
        sync()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        sync()
        self.blocking_s += time.perf_counter() - t0
        return out

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {k: {"calls": c, "bytes": b} for k, (c, b) in sorted(self.stats.items())}

    def total_bytes(self) -> int:
        return sum(b for _, b in self.stats.values())

    # -- collectives along a mesh axis -----------------------------------
    def all_reduce(self, t: torch.Tensor, axis: str | tuple[str, ...]) -> torch.Tensor:
        """Sum ``t`` over ``axis`` (or over a tuple of axes) in place.

        Small tensors on GPUs (a decode step's activations) go through a
        one-shot all-reduce on symmetric memory when ``torch.distributed``
        has it: every rank copies its tensor into a buffer its peers can
        read over NVLink, and one kernel sums all the buffers. It is latency
        the step pays (one kernel and a barrier instead of NCCL's protocol);
        the sum has the same terms. ``SHARDWISE_ONE_SHOT=0`` turns it off."""
        if isinstance(axis, tuple) and self.topo.covers_world(axis):
            return self.all_reduce_world(t)
        if self.topo.size(axis) > 1 and t.numel():
            key = self._count("all_reduce", axis, t.nbytes)
            buf = self._one_shot_buffer(t, axis)
            if buf is not None:
                self._blocking(key, self._one_shot, buf, t, axis)
            else:
                self._blocking(key, self._reduce, t, self.topo.group(axis))
        return t

    def _one_shot_buffer(self, t: torch.Tensor, axis: str) -> torch.Tensor | None:
        """The symmetric buffer for a one-shot all-reduce of ``t``, or None
        (not a small contiguous CUDA tensor, off, or unavailable). A buffer is
        made (a collective over the axis) the first time a shape is seen,
        which every rank of the axis does at the same call; never during CUDA
        graph capture, where such a call falls back to NCCL."""
        if (not self.one_shot or not t.is_cuda or t.nbytes > ONE_SHOT_MAX_BYTES
                or not t.is_contiguous()):
            return None
        key = (axis, tuple(t.shape), t.dtype)
        buf = self._symm.get(key)
        if buf is None and not torch.cuda.is_current_stream_capturing():
            buf = self._symm[key] = self._symmetric_buffer(t, axis)
        return buf

    def all_reduce_add_norm(self, p: torch.Tensor, x: torch.Tensor, module, axis: str):
        """``h = x + sum of p over axis`` and ``module(h)`` (``module`` a norm,
        or None): returns ``(h, norm(h) or None)``.

        The sum is rounded to ``x``'s dtype before the add, as
        :meth:`all_reduce` followed by :func:`~shardwise.model.kernels.add_norm`
        would round it. A decode step's few rows on GPUs take one kernel for
        all of it (:class:`~shardwise.parallel.reduce_norm.FusedReduceNorm`,
        with the one-shot all-reduce's switch); anything else takes those
        two calls."""
        if self.topo.size(axis) > 1 and p.numel():
            fused = self._fused_reduce_norm(p, x, module, axis)
            if fused is not None:
                key = self._count("all_reduce", axis, p.nbytes)
                return self._blocking(key, fused, p, x, module)
            p = self.all_reduce(p, axis)
        a = p if p.dtype == x.dtype else p.to(x.dtype)
        if module is None:
            return x + a, None
        return add_norm(module, x, a)

    def _fused_reduce_norm(self, p, x, module, axis: str):
        if not (self.one_shot and p.is_cuda and p.nbytes <= ONE_SHOT_MAX_BYTES
                and reduce_norm.fusable(p, x, module)):
            return None
        fused = self._fused.get(axis)
        if fused is None:
            if torch.cuda.is_current_stream_capturing():
                return None
            fused = self._fused[axis] = self._reduce_norm_kernel(axis, x.device)
        return fused if fused.ready(p.dtype, x.shape[-1]) else None

    def all_gather(self, t: torch.Tensor, axis: str, dim: int = 0) -> torch.Tensor:
        """Concatenate every rank's ``t`` along ``dim`` in axis order."""
        n = self.topo.size(axis)
        if n == 1:
            return t
        t = t.movedim(dim, 0).contiguous()
        out = torch.empty((n * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        key = self._count("all_gather", axis, out.nbytes)
        self._blocking(key, self._gather, out, t, self.topo.group(axis))
        return out.movedim(0, dim)

    def reduce_scatter(self, t: torch.Tensor, axis: str, dim: int = 0) -> torch.Tensor:
        """Sum ``t`` over ``axis`` and keep this rank's 1/n slice along ``dim``."""
        n = self.topo.size(axis)
        if n == 1:
            return t
        t = t.movedim(dim, 0).contiguous()
        out = torch.empty((t.shape[0] // n, *t.shape[1:]), dtype=t.dtype, device=t.device)
        key = self._count("reduce_scatter", axis, t.nbytes)
        self._blocking(key, self._scatter, out, t, self.topo.group(axis))
        return out.movedim(0, dim)

    def all_to_all(self, t: torch.Tensor, axis: str, in_splits: Sequence[int] | None = None,
                   out_splits: Sequence[int] | None = None) -> torch.Tensor:
        """Exchange slices of dim 0: slice i of ``t`` goes to the i-th rank of
        the group; the result holds what each rank sent here, in rank order.
        Equal splits when ``in_splits``/``out_splits`` are None."""
        n = self.topo.size(axis)
        if n == 1:
            return t
        t = t.contiguous()
        rows = sum(out_splits) if out_splits is not None else t.shape[0]
        out = torch.empty((rows, *t.shape[1:]), dtype=t.dtype, device=t.device)
        key = self._count("all_to_all", axis, t.nbytes)
        self._blocking(key, self._swap, out, t, out_splits, in_splits, self.topo.group(axis))
        return out

    # -- point-to-point (global ranks) -----------------------------------
    # Single sends and receives go through batch_isend_irecv too: NCCL runs
    # unbatched point-to-point ops serialised with every other op of the group.
    def isend(self, t: torch.Tensor, dst: int, axis: str):
        key = self._count("send", axis, t.nbytes)
        return self._watch(self._p2p([(t.contiguous(), dst)], [])[0], key)

    def irecv(self, t: torch.Tensor, src: int, axis: str):
        if self.hook is not None:
            self.hook.called(f"recv/{axis}")
        return self._watch(self._p2p([], [(t, src)])[0], f"recv/{axis}")

    def send(self, t: torch.Tensor, dst: int, axis: str) -> None:
        self.isend(t, dst, axis).wait()

    def recv(self, t: torch.Tensor, src: int, axis: str) -> torch.Tensor:
        self.irecv(t, src, axis).wait()
        return t

    def exchange(self, sends: Sequence[tuple[torch.Tensor, int]],
                 recvs: Sequence[tuple[torch.Tensor, int]], axis: str):
        """Post sends and receives together (one batch, no ordering deadlock);
        returns the requests to wait on."""
        sends = [(t.contiguous(), peer) for t, peer in sends]
        for t, _ in sends:
            self._count("send", axis, t.nbytes)
        if self.hook is not None and recvs:
            self.hook.called(f"recv/{axis}")
        works = self._p2p(sends, list(recvs)) if sends or recvs else []
        return works if self.hook is None else [self._watch(w, f"exchange/{axis}") for w in works]

    def barrier(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            if self.hook is None:
                self._barrier()
            else:
                self._blocking("barrier", self._barrier)

    def all_reduce_world(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over every rank of the mesh in one call (counted on axis
        ``world``): the flat reduction that hierarchical schemes are compared with."""
        if self.topo.world_size > 1:
            key = self._count("all_reduce", "world", t.nbytes)
            self._blocking(key, self._reduce, t, None)
        return t

    def all_reduce_start(self, t: torch.Tensor, axis: str):
        """Start the in-place sum of ``t`` over ``axis`` and return at once with
        ``wait``, a function that returns ``t`` once the sum has landed, so the
        caller can compute something else meanwhile. On NCCL ``wait()`` only
        orders the current stream after the reduction (no host synchronisation)."""
        if self.topo.size(axis) == 1 or not t.numel():
            return lambda: t
        key = self._count("all_reduce", axis, t.nbytes)
        work = self._watch(self._reduce(t, self.topo.group(axis), async_op=True), key)

        def wait() -> torch.Tensor:
            work.wait()
            return t

        return wait

    def all_to_all_start(self, t: torch.Tensor, axis: str, in_splits: Sequence[int],
                         out_splits: Sequence[int]):
        """Start :meth:`all_to_all` (explicit splits) and return at once with
        ``wait``, a function that returns the result once it has arrived, so
        computation can overlap the exchange. ``t`` must not be changed before
        then. On NCCL ``wait()`` only orders the current stream after the
        exchange (no host synchronisation)."""
        if self.topo.size(axis) == 1:
            return lambda: t
        t = t.contiguous()
        out = torch.empty((sum(out_splits), *t.shape[1:]), dtype=t.dtype, device=t.device)
        key = self._count("all_to_all", axis, t.nbytes)
        work = self._watch(self._swap(out, t, out_splits, in_splits, self.topo.group(axis),
                                      async_op=True), key)

        def wait() -> torch.Tensor:
            work.wait()
            return out

        return wait

    def gather_floats(self, values: list[float], device) -> list[list[float]]:
        """:func:`gather_floats`, told to the hook as a wait on peers (not
        counted: it is the run's bookkeeping, not the model's traffic)."""
        if self.hook is None:
            return gather_floats(values, device)
        self.hook.waiting("gather")
        try:
            return gather_floats(values, device)
        finally:
            self.hook.done()

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrite ``t`` on every rank with global rank ``src``'s ``t``, in
        place (counted on axis ``world``): e.g. the token rank 0 chose."""
        if self.topo.world_size > 1:
            key = self._count("broadcast", "world", t.nbytes)
            self._blocking(key, self._broadcast, t, src)
        return t

    # -- the transport: torch.distributed's calls, in one place --------------
    # A recorder of what a step does (shardwise.perf.record) overrides these
    # and the two buffer lookups above; everything else is shared.
    def _reduce(self, t, group, async_op: bool = False):
        return dist.all_reduce(t, group=group, async_op=async_op)

    def _symmetric_buffer(self, t, axis: str):
        """A buffer like ``t`` that the axis' peers read (collective)."""
        import torch.distributed._symmetric_memory as symm_mem

        buf = symm_mem.empty(t.shape, dtype=t.dtype, device=t.device)
        symm_mem.rendezvous(buf, self.topo.group(axis).group_name)
        return buf

    def _reduce_norm_kernel(self, axis: str, device):
        return reduce_norm.FusedReduceNorm(self.topo.group(axis), device)

    def _one_shot(self, buf, t, axis: str):
        torch.ops.symm_mem.one_shot_all_reduce_copy_out(buf, t, "sum",
                                                        self.topo.group(axis).group_name, t)

    def _gather(self, out, t, group):
        return _all_gather_into(out, t, group=group)

    def _scatter(self, out, t, group):
        return _reduce_scatter_into(out, t, group=group)

    def _swap(self, out, t, out_splits, in_splits, group, async_op: bool = False):
        """all_to_all_single (None splits: equal)."""
        return dist.all_to_all_single(
            out, t, output_split_sizes=None if out_splits is None else list(out_splits),
            input_split_sizes=None if in_splits is None else list(in_splits), group=group,
            async_op=async_op)

    def _p2p(self, sends, recvs) -> list:
        """One batch of point-to-point ops; a request per op."""
        ops = [dist.P2POp(dist.isend, t, peer) for t, peer in sends]
        ops += [dist.P2POp(dist.irecv, t, peer) for t, peer in recvs]
        return dist.batch_isend_irecv(ops)

    def _broadcast(self, t, src: int):
        return dist.broadcast(t, src)

    def _barrier(self):
        return dist.barrier()


def gather_floats(values: list[float], device) -> list[list[float]]:
    """Every rank's small vector of numbers, in rank order, over the whole job
    (metrics for the run's report; not counted as the model's traffic)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [values]
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


class _Watched:
    """A request whose ``wait()`` is reported to a hook as a wait on peers."""

    __slots__ = ("work", "hook", "key")

    def __init__(self, work, hook, key: str):
        self.work, self.hook, self.key = work, hook, key

    def wait(self, *args, **kwargs):
        self.hook.waiting(self.key)
        try:
            return self.work.wait(*args, **kwargs)
        finally:
            self.hook.done()

    def __getattr__(self, name):  # is_completed, get_future, ...
        return getattr(self.work, name)
