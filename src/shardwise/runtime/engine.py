"""Run one case on one rank: build the shard, prefill, decode, verify.

Every rank runs this; rank 0 also builds the single-device reference on the
same weights and compares every output (prefill and each decode step).
Timing brackets each step with a device synchronisation and a barrier, so a
step's time is that of the slowest rank.
"""
from __future__ import annotations

import math
import os
import signal
import statistics
import time

import torch
import torch.distributed as dist

from ..model.load import ShardLoader, build_reference
from ..model.weights import WeightSource, make_inputs
from ..parallel.base import validate_plan
from ..parallel.comm import Comm
from ..spec import Plan, torch_dtype
from .job import Case, Job, tolerance


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| (Frobenius, computed in float64)."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inject(job: Job, rank: int, point: str) -> None:
    if job.fault_at(rank, "kill") and point == "prefill":
        os.kill(os.getpid(), signal.SIGKILL)
    if job.fault_at(rank, "hang") and point == "prefill":
        while True:
            time.sleep(1)
    if job.fault_at(rank, point):
        raise RuntimeError(f"injected fault on rank {rank} at {point}")


def _gather_floats(values: list[float], device) -> list[list[float]]:
    """Every rank's small vector of numbers (metrics only; not counted as traffic)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [values]
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


def _timed(fn, device, comm: Comm):
    comm.barrier()
    _sync(device)
    t0 = time.perf_counter()
    out = fn()
    _sync(device)
    comm.barrier()
    return out, time.perf_counter() - t0


def run_case(job: Job, case: Case, rank: int, world: int, device: torch.device,
             log=print) -> dict | None:
    spec, wl = case.model, case.workload
    plan = Plan.parse(case.plan)
    cls, topo = validate_plan(spec, wl, plan, world)
    topo.rank, topo.device_type = rank, device.type
    topo.build()
    comm = Comm(topo)
    dtype = torch_dtype(spec.dtype)
    source = WeightSource(spec, case.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _inject(job, rank, "startup")
    with torch.inference_mode():
        model = cls(spec, wl, plan, topo, comm, ShardLoader(source, dtype, device))
        param_bytes = sum(p.nbytes for p in model.parameters())
        kv_bytes = sum(c.nbytes() for c in getattr(model, "caches", []))
        prompt, steps = make_inputs(spec, wl.batch, wl.seq_len, wl.decode_steps, case.seed,
                                    dtype, device)
        L = wl.seq_len
        for _ in range(job.warmup):
            model.step(prompt, 0)
            if steps:
                model.step(steps[0], L)
        _sync(device)
        _inject(job, rank, "prefill")
        comm.reset()
        out, prefill_s = _timed(lambda: model.step(prompt, 0), device, comm)
        prefill_comm = comm.snapshot()
        outputs = [model.collect(out)]
        decode_s, decode_comm = [], []
        for t, x in enumerate(steps):
            _inject(job, rank, "decode")
            comm.reset()
            out, dt = _timed(lambda: model.step(x, L + t), device, comm)
            decode_s.append(dt)
            decode_comm.append(comm.total_bytes())
            outputs.append(model.collect(out))
        report = model.report()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    per_rank = _gather_floats(
        [param_bytes, kv_bytes, peak, sum(v["bytes"] for v in prefill_comm.values()),
         statistics.mean(decode_comm) if decode_comm else 0.0],
        device,
    )
    del model
    if rank != 0:
        return None

    result = {
        "preset": case.preset, "model": spec.name, "plan": str(plan), "world_size": world,
        "device_type": device.type, "dtype": spec.dtype, "batch": wl.batch,
        "seq_len": wl.seq_len, "decode_steps": wl.decode_steps,
        "prefill_s": prefill_s,
        "prefill_tokens_per_s": wl.batch * L / prefill_s,
        "decode_step_ms": [1e3 * s for s in decode_s],
        "tpot_ms": 1e3 * statistics.median(decode_s) if decode_s else None,
        "param_bytes_per_rank": [r[0] for r in per_rank],
        "kv_bytes_per_rank": [r[1] for r in per_rank],
        "peak_mem_bytes_per_rank": [r[2] for r in per_rank],
        "comm_bytes_prefill_per_rank": [r[3] for r in per_rank],
        "comm_bytes_decode_step_per_rank": [r[4] for r in per_rank],
        "comm_prefill_rank0": prefill_comm,
        "report": report,
    }
    if case.verify:
        log(f"  verifying {plan} against the single-device reference ...")
        errs = _verify(case, source, dtype, device, prompt, steps, outputs)
        tol = tolerance(spec.dtype)
        result.update(
            prefill_rel_err=errs[0], decode_rel_err=errs[1:], max_rel_err=max(errs),
            tolerance=tol, ok=bool(max(errs) <= tol and all(math.isfinite(e) for e in errs)),
        )
    return result


def _verify(case: Case, source, dtype, device, prompt, steps, outputs) -> list[float]:
    wl = case.workload
    with torch.inference_mode():
        ref = build_reference(source, dtype, device)
        caches = ref.allocate_caches(wl.batch, wl.max_len)
        errs = [rel_err(outputs[0], ref(prompt, caches, 0))]
        for t, x in enumerate(steps):
            errs.append(rel_err(outputs[t + 1], ref(x, caches, wl.seq_len + t)))
    del ref, caches
    return errs
