"""Count what a real step does: its host calls by kind, its collectives and
the bytes its rank holds, on real tensors.

:class:`CallCounter` sees every aten op the Python code calls (a
TorchDispatchMode; inference mode, so composite ops arrive whole), every
nn.Module call, every torch.distributed call Comm makes, every Triton launch
and every device-to-host read. calibrate counts its layer probe with it on
the machine it measures. :func:`count_calls` runs cases on CPU ranks (gloo)
along the code's GPU branches (:class:`CudaPaths`) and returns, per rank and
step, the counts, Comm's bytes per collective and the weights and KV cache
held: what the recorder (:mod:`.record`) must find from the code alone, and
what the tests hold it to.
"""
from __future__ import annotations

import contextlib
import json
import sys
from typing import NoReturn

import torch

from .events import CALL_KINDS, GEMM_OPS, is_attention
from .lowering import classify_op
from .tritons import STAND_INS, TritonShim, stand_in

ENV = "SHARDWISE_COUNT"
_DIST_CALLS = {"all_reduce": "all_reduce", "all_to_all_single": "all_to_all",
               "batch_isend_irecv": "p2p", "broadcast": "broadcast", "barrier": "barrier",
               "all_gather": "all_gather", "all_gather_into_tensor": "all_gather",
               "all_gather_single": "all_gather", "reduce_scatter_tensor": "reduce_scatter",
               "reduce_scatter_single": "reduce_scatter"}
_COUNTERS: list = []  # the active CallCounter (innermost last)


def _chain_hook(wrap):
    """Install ``wrap(module, name, loaded)`` as the Triton load hook on top of
    the one in place; returns the previous hook (to restore)."""
    from ..model import kernels

    prev = kernels.LOAD_HOOK

    def hook(module, name, loaded):
        return wrap(module, name, prev(module, name, loaded) if prev else loaded)

    kernels.LOAD_HOOK = hook
    return prev


class CallCounter:
    """Counts, while active, the host calls of :data:`~.trace.CALL_KINDS` made by
    this process: aten ops (by :func:`~.trace.classify_op`), nn.Module calls,
    Triton launches and the torch.distributed calls of
    :mod:`shardwise.parallel.comm` (whose own internals are the backend's and
    not counted). ``names`` also keeps ``(kind, op or module name) -> calls``,
    for diagnosis."""

    def __init__(self, names: bool = False):
        self.counts = dict.fromkeys(CALL_KINDS, 0)
        self.names = {} if names else None
        self.paused = 0  # > 0 inside a call whose own ops are not the code's

    def note(self, kind: str, name: str) -> None:
        if self.paused:
            return
        self.counts[kind] += 1
        if self.names is not None:
            self.names[(kind, name)] = self.names.get((kind, name), 0) + 1

    def opaque(self, kind: str, name: str, fn, *args, **kwargs):
        """Count one call of ``kind`` and run ``fn`` without counting inside it."""
        self.note(kind, name)
        self.paused += 1
        try:
            return fn(*args, **kwargs)
        finally:
            self.paused -= 1

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        from ..model import kernels
        from ..parallel import comm as comm_module

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                kind = classify_op(func, args, kwargs, out)
                name = func.overloadpacket.__name__
                if kind != "skip":
                    counter.note(kind, name)
                if kind == "kernels":
                    if name in GEMM_OPS:
                        counter.note("gemms", name)
                    elif is_attention(name):
                        counter.note("attns", name)
                return out

        def wrap(fn, kind):
            return lambda *a, **k: counter.opaque(kind, kind, fn, *a, **k)

        self._saved = (comm_module.dist, comm_module._all_gather_into,
                       comm_module._reduce_scatter_into)
        real = self._saved[0]

        class Dist:  # torch.distributed as comm.py sees it, its calls counted
            def __getattr__(self, name):
                attr = getattr(real, name)
                return wrap(attr, _DIST_CALLS[name]) if name in _DIST_CALLS else attr

        comm_module.dist = Dist()
        comm_module._all_gather_into = wrap(self._saved[1], "all_gather")
        comm_module._reduce_scatter_into = wrap(self._saved[2], "reduce_scatter")
        # Triton kernels launch past the dispatcher: each launch is counted.
        self._hook = _chain_hook(lambda module, name, loaded: loaded and (
            loaded[0], _CountedKernel(loaded[1], name)))
        self._module_hook = torch.nn.modules.module.register_module_forward_pre_hook(
            lambda module, args: counter.note("modules", type(module).__name__))
        self._mode = Mode()
        self._mode.__enter__()
        _COUNTERS.append(self)
        self._kernels = kernels
        return self

    def __exit__(self, *exc):
        from ..parallel import comm as comm_module

        _COUNTERS.remove(self)
        self._mode.__exit__(*exc)
        self._module_hook.remove()
        comm_module.dist, comm_module._all_gather_into, comm_module._reduce_scatter_into = self._saved
        self._kernels.LOAD_HOOK = self._hook
        return False


class _CountedKernel:
    """A Triton kernel whose launches the innermost :class:`CallCounter`
    counts as one Triton launch."""

    def __init__(self, kernel, name: str):
        self.kernel, self.name = kernel, name

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def counted(*args, **kwargs):
            if not _COUNTERS:
                return launch(*args, **kwargs)
            return _COUNTERS[-1].opaque("tritons", self.name, launch, *args, **kwargs)

        return counted


class _OnCpu:
    """A Triton kernel computed on CPU by its stand-in's PyTorch form."""

    def __init__(self, name: str):
        self.stand_in = stand_in(name)

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.stand_in.run(grid, *args, **kwargs)


class CudaPaths:
    """Run the code's GPU branches on CPU tensors, so that the calls counted
    are those a GPU run makes: ``Tensor.is_cuda`` answers True (the code
    chooses its fused kernels by it), the kernels that exist only on CUDA are
    computed by their CPU counterparts (FlashAttention and cuDNN's attention
    by the CPU flash kernel, a matmul with a float32 output by a float32
    matmul, shardwise's Triton kernels by their PyTorch forms in
    :mod:`.tritons`), one call each, as on the GPU. A Triton kernel without a
    CPU form is reported absent (the code takes its PyTorch path). Numerics
    match the CPU path's to rounding."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        aten = torch.ops.aten

        def grouped(q, k, v):
            """k, v repeated to q's heads: the CUDA kernels take grouped-query
            attention as it is, the CPU flash kernel does not."""
            g = q.shape[1] // k.shape[1]
            return (k, v) if g == 1 else (k.repeat_interleave(g, 1), v.repeat_interleave(g, 1))

        def flash(q, k, v, dropout_p=0.0, is_causal=False, *rest, scale=None, **kw):
            k, v = grouped(q, k, v)
            o, lse = aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, dropout_p, is_causal, scale=scale)
            none = torch.empty(0)
            return o, lse, none, none, q.shape[2], k.shape[2], none, none, none

        def efficient(q, k, v, bias, want_lse, dropout_p=0.0, is_causal=False, *, scale=None):
            o, lse = aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, dropout_p, is_causal, scale=scale)
            pad = -lse.shape[-1] % 32  # the CUDA kernel pads the lse to 32 queries
            lse = torch.nn.functional.pad(lse, (0, pad))
            return o, lse, torch.empty(0), torch.empty(0)

        def cudnn(q, k, v, bias, want_lse, dropout_p=0.0, is_causal=False, debug=False, *,
                  scale=None):
            k, v = grouped(q, k, v)
            o, lse = aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, dropout_p, is_causal, scale=scale)
            none = torch.empty(0)
            return o, lse[..., None], none, none, q.shape[2], k.shape[2], none, none, none

        def mm_dtype(a, b, out_dtype):
            return torch.mm(a.to(out_dtype), b.to(out_dtype))

        stand_ins = {aten._scaled_dot_product_flash_attention.default: flash,
                     aten._scaled_dot_product_efficient_attention.default: efficient,
                     aten._scaled_dot_product_cudnn_attention.default: cudnn,
                     aten.mm.dtype: mm_dtype}

        def as_on_gpu(func, args, kwargs, out):
            """The attention's outputs laid out as the CUDA kernel lays them out
            (its meta kernel says how), so that what follows copies where a
            GPU run copies."""
            to_meta = lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t  # noqa: E731
            likes = func(*[to_meta(a) for a in args], **{k: to_meta(v) for k, v in kwargs.items()})

            def laid_out(t, like):
                if not (isinstance(t, torch.Tensor) and isinstance(like, torch.Tensor)
                        and t.shape == like.shape):
                    return t
                return torch.empty_strided(like.shape, like.stride(), dtype=t.dtype).copy_(t)

            return tuple(laid_out(t, like) for t, like in zip(out, likes))

        class StandIn(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                impl = stand_ins.get(func)
                if impl is None:
                    return func(*args, **kwargs)
                out = impl(*args, **kwargs)
                return out if func is aten.mm.dtype else as_on_gpu(func, args, kwargs, out)

        from ..model import kernels

        self._kernels = kernels
        self._had = "is_cuda" in torch.Tensor.__dict__
        self._saved = torch.Tensor.__dict__.get("is_cuda")
        torch.Tensor.is_cuda = property(lambda self: True)
        self._hook = kernels.LOAD_HOOK
        kernels.LOAD_HOOK = lambda module, name, loaded: (
            (TritonShim, _OnCpu(name)) if name in STAND_INS else False)
        self._mode = StandIn()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        self._kernels.LOAD_HOOK = self._hook
        if self._had:
            torch.Tensor.is_cuda = self._saved
        else:
            del torch.Tensor.is_cuda
        return False


# The steps count_case counts: a prefill, an eager decode step, and the
# static-shape decode step a CUDA graph replays (position in a device tensor;
# absent where the strategy has none).
COUNT_PHASES = ("prefill", "decode", "static")


def count_case(case, rank: int, world: int, device, cuda_paths: bool = True) -> dict:
    """What one rank of ``case`` does in each of :data:`COUNT_PHASES` (after a
    warm-up of each, so one-time work is not counted), along the code's GPU
    branches (:class:`CudaPaths`) unless ``cuda_paths`` is False:
    ``{phase: {"calls": {kind: n}, "comm": Comm.snapshot()}, "weights": bytes,
    "kv": bytes}``."""
    from ..model.weights import make_inputs
    from ..runtime.engine import build

    with torch.inference_mode():
        _, comm, model, _, dtype = build(case, rank, world, device)
        wl = case.workload
        # The prompt as a timed run hands it over (and the recorder does).
        prompt, steps = make_inputs(case.model, wl.batch, wl.seq_len, 1, case.seed, dtype, device,
                                    block=model.input_rows())
        out = {"weights": sum(p.nbytes for p in model.parameters()),
               "kv": sum(c.nbytes() for c in getattr(model, "caches", []))}
        static = [("static", steps[0], torch.tensor(wl.seq_len, device=device))]
        with CudaPaths() if cuda_paths else contextlib.nullcontext():
            for phase, x, pos in ([("prefill", prompt, 0), ("decode", steps[0], wl.seq_len)]
                                  + static * bool(model.supports_graphs)):
                model.step(x, pos)  # warm-up: lazily created groups, caches
                comm.barrier()
                comm.reset()
                with CallCounter() as c:
                    model.step(x, pos)
                snapshot = comm.snapshot()
                comm.barrier()
                out[phase] = {"calls": dict(c.counts), "comm": snapshot}
        del model
    return out


def count_calls(cases, nproc: int, deadline_s: float | None = 300) -> list[list[dict]]:
    """:func:`count_case` of every case on ``nproc`` CPU ranks (gloo): per
    case, every rank's counts in rank order."""
    from ..runtime.job import Job
    from ..runtime.launcher import launch

    job = Job(list(cases), nproc, "cpu", env={ENV: "1"})
    return launch(job, deadline_s=deadline_s, module="shardwise.perf.counting")


def _count_job(job) -> list | None:
    import torch.distributed as dist

    from ..runtime.worker import init_distributed

    rank, world, device = init_distributed(job)
    results = []
    for case in job.cases:
        mine = count_case(case, rank, world, device)
        every = [None] * world
        dist.all_gather_object(every, json.dumps(mine))
        results.append([json.loads(r) for r in every])
    return results if rank == 0 else None


def main(argv: list[str]) -> NoReturn:
    """One rank of :func:`count_calls` (the launcher's worker protocol)."""
    from ..runtime.worker import rank_main

    def body(job, save):
        import torch.distributed as dist

        out = _count_job(job)
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
        return out

    rank_main(argv, body)


if __name__ == "__main__":
    main(sys.argv[1:])
