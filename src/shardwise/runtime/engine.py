"""Run one case on one rank: build the shard, prefill, decode, verify.

Every rank runs this; rank 0 also builds the single-device reference on the
same weights and compares every output (prefill and each decode step).
Timing brackets each step with a device synchronisation and a barrier, so a
step's time is that of the slowest rank.
"""
from __future__ import annotations

import math
import os
import re
import signal
import statistics
import time

import torch

from ..model.load import ShardLoader
from ..model.weights import WeightSource, make_inputs
from ..parallel.registry import validate_plan
from ..parallel.comm import Comm, gather_floats
from ..spec import Plan, torch_dtype
from ..bench import metrics
from .job import Case, Job, tolerance
from .timing import (BenchSettings, max_over_ranks, measure_ceilings, summarize, sync_device,
                     time_decode, time_prefill, timed_call, trace_step)
from .verify import step_errors


def peak_memory(device: torch.device) -> int:
    """Peak bytes of this rank: the CUDA allocator's high-water mark on a GPU;
    on CPU the process's peak resident size (the runtime included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class RankMonitor:
    """What one rank reports while it runs: its :class:`Heartbeat` (when the
    job has a watchdog) and the ``collective`` fault (tests). Installed as
    ``Comm.hook`` only when one of them is on, so a job with neither pays
    nothing per collective. Inside CUDA graph capture the heartbeat is left
    alone (a captured step replays without calling back here anyway)."""

    def __init__(self, heartbeat=None, fail_at_call: int | None = None, rank: int = 0,
                 device_type: str = "cpu"):
        self.heartbeat, self.fail_at_call, self.rank = heartbeat, fail_at_call, rank
        self.cuda = device_type == "cuda"
        self.calls = 0
        self.progress = None  # rank 0's progress.Reporter: phases for the launcher's display

    @property
    def active(self) -> bool:
        return self.heartbeat is not None or self.fail_at_call is not None

    def _quiet(self) -> bool:
        return self.heartbeat is None or (self.cuda and torch.cuda.is_current_stream_capturing())

    # -- Comm.hook ----------------------------------------------------------
    def called(self, key: str) -> None:
        self.calls += 1
        if self.calls == self.fail_at_call:
            raise RuntimeError(f"injected fault on rank {self.rank} at collective "
                               f"(call {self.calls}: {key})")

    def waiting(self, key: str) -> None:
        if not self._quiet():
            self.heartbeat.waiting(key, self.calls)

    def done(self) -> None:
        if not self._quiet():
            self.heartbeat.done()

    # -- case and phase boundaries --------------------------------------------
    def phase(self, event: str, case: int | None = None) -> None:
        if self.heartbeat is not None:
            self.heartbeat.phase(event, case)
        if self.progress is not None:
            self.progress.phase(event)

    def wait(self, what: str, fn, *args, **kwargs):
        """Run ``fn`` (a wait on peers outside Comm: mesh creation, barriers)."""
        self.waiting(what)
        try:
            return fn(*args, **kwargs)
        finally:
            self.done()


NO_MONITOR = RankMonitor()


def _inject(job: Job, rank: int, point: str, monitor: RankMonitor = NO_MONITOR,
            event: str | None = None) -> None:
    """A phase boundary: tell the heartbeat, and act out the job's fault if it is here."""
    monitor.phase(event or point)
    if job.fault_at(rank, "kill") and point == "prefill":
        os.kill(os.getpid(), signal.SIGKILL)
    if job.fault_at(rank, "hang") and point == "prefill":
        while True:
            time.sleep(1)
    if job.fault_at(rank, point):
        raise RuntimeError(f"injected fault on rank {rank} at {point}")


def weight_source(case: Case):
    """The case's weights: its checkpoint (read slice by slice) when it names
    one, else the synthetic weights of its seed."""
    if case.checkpoint is not None:
        from ..model.checkpoint import CheckpointSource

        return CheckpointSource(case.checkpoint, case.model, max_len=case.workload.max_len)
    return WeightSource(case.model, case.seed)


def build(case: Case, rank: int, world: int, device: torch.device,
          monitor: RankMonitor = NO_MONITOR):
    """Validate the plan, build the mesh and this rank's shard."""
    spec, wl = case.model, case.workload
    plan = Plan.parse(case.plan)
    cls, topo = validate_plan(spec, wl, plan, world)
    topo.rank, topo.device_type = rank, device.type
    monitor.wait("device mesh", topo.build)
    comm = Comm(topo)
    if monitor.active:
        comm.hook = monitor
    monitor.phase("build shard")
    dtype = torch_dtype(spec.dtype)
    source = weight_source(case)
    model = cls(spec, wl, plan, topo, comm, ShardLoader(source, dtype, device))
    return plan, comm, model, source, dtype


def run_case(job: Job, case: Case, rank: int, world: int, device: torch.device,
             log=print, monitor: RankMonitor = NO_MONITOR) -> list[dict]:
    """Run one case; rank 0 returns its records (others an empty list)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _inject(job, rank, "startup", monitor)
    with torch.inference_mode():
        plan, comm, model, source, dtype = build(case, rank, world, device, monitor)
        if case.bench is not None:
            return bench_case(case, plan, comm, model, rank, device, monitor)
        if case.generate is not None:
            from .generate import generate_case

            monitor.phase("generate")
            return generate_case(case, comm, model, source, dtype, rank, device, log)
        return _verified_run(job, case, plan, comm, model, source, dtype, rank, device, log,
                             monitor)


def _verified_run(job, case, plan, comm, model, source, dtype, rank, device, log,
                  monitor: RankMonitor = NO_MONITOR) -> list[dict]:
    spec, wl = case.model, case.workload
    world = comm.topo.world_size
    param_bytes = sum(p.nbytes for p in model.parameters())
    kv_bytes = sum(c.nbytes() for c in getattr(model, "caches", []))
    prompt, steps = make_inputs(spec, wl.batch, wl.seq_len, wl.decode_steps, case.seed,
                                dtype, device)
    L = wl.seq_len
    monitor.phase("warmup")
    for _ in range(job.warmup):
        model.step(prompt, 0)
        if steps:
            model.step(steps[0], L)
    monitor.wait("device sync", sync_device, device)
    _inject(job, rank, "prefill", monitor)
    comm.reset()
    # Timed as a run takes it (the last position's output, where the strategy
    # streams), then again, untimed, keeping every position to verify each:
    # the same arithmetic, so its last position must be the timed output.
    out, prefill_s = timed_call(lambda: model.step(prompt, 0), device, comm)
    prefill_comm = comm.snapshot()
    last = model.collect(out)
    outputs = [model.collect(model.step(prompt, 0, every_position=True))]
    decode_s, decode_comm = [], []
    static = job.static_decode and bool(model.supports_graphs)
    for t, x in enumerate(steps):
        _inject(job, rank, "decode", monitor, event=f"decode {t}")
        comm.reset()
        pos = torch.tensor(L + t, device=device) if static else L + t
        out, dt = timed_call(lambda: model.step(x, pos), device, comm)
        decode_s.append(dt)
        decode_comm.append(comm.total_bytes())
        outputs.append(model.collect(out))
    monitor.phase("report")
    report = model.report()
    peak = peak_memory(device)
    per_rank = monitor.wait("gather metrics", gather_floats,
        [param_bytes, kv_bytes, peak, sum(v["bytes"] for v in prefill_comm.values()),
         statistics.mean(decode_comm) if decode_comm else 0.0],
        device,
    )
    del model
    if rank != 0:
        return []

    result = {
        "preset": case.preset, "model": spec.name, "model_source": case.source,
        "model_spec": spec.to_dict(), "plan": str(plan), "world_size": world,
        "device_type": device.type, "dtype": spec.dtype, "batch": wl.batch,
        "seq_len": wl.seq_len, "decode_steps": wl.decode_steps,
        "static_decode": static,
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
        monitor.phase("verify (reference model)")
        log(f"  verifying {plan} against the single-device reference ...")
        errs, ties = step_errors(case, source, dtype, device, prompt, steps, outputs)
        tol = tolerance(spec.dtype)
        # MoE: a token whose routing is tied within the model's rounding may take
        # other experts under any other GEMM shapes (the reference's own split
        # run shows it); such flips are reported and the verdict is the error
        # over the other tokens. Every other token counts, flipped or not.
        judged = errs if ties is None else ties["rel_err_without_flips"]
        # What the timed prefill kept: the verified output's last position, bit for bit.
        kept = outputs[0][:, -last.shape[1]:]
        same = bool(last.shape == kept.shape and torch.equal(last, kept))
        result.update(
            prefill_rel_err=errs[0], decode_rel_err=errs[1:], max_rel_err=max(errs),
            prefill_kept_positions=last.shape[1], prefill_kept_matches=same,
            tolerance=tol, ok=bool(max(judged) <= tol and all(math.isfinite(e) for e in errs)
                                   and same),
        )
        if ties is not None:
            result.update(moe_near_tie_tokens=ties["near_tie_tokens"],
                          max_determinate_rel_err=max(ties["determinate_rel_err"]),
                          determinate_rel_err=ties["determinate_rel_err"],
                          routing_flips=ties["routing_flips"],
                          rel_err_without_flips=ties["rel_err_without_flips"],
                          max_rel_err_without_flips=max(ties["rel_err_without_flips"]),
                          reference_split_rel_err=ties["reference_split_rel_err"],
                          reference_split_flips=ties["reference_split_flips"])
    return [result]


_CEILINGS: dict = {}


def bench_case(case, plan, comm, model, rank, device,
               monitor: RankMonitor = NO_MONITOR) -> list[dict]:
    """Timed prefill and/or decode of one plan; one record per phase (rank 0)."""
    spec, wl = case.model, case.workload
    s = BenchSettings(**case.bench)
    world = comm.topo.world_size
    monitor.phase("measure ceilings")
    if str(device) not in _CEILINGS:
        _CEILINGS[str(device)] = measure_ceilings(device)
    ceil = _CEILINGS[str(device)]
    dtype = torch_dtype(spec.dtype)
    prompt, steps = make_inputs(spec, wl.batch, wl.seq_len, 1, case.seed, dtype, device,
                                block=model.input_rows())
    records = []
    common = {
        "preset": case.preset, "model": spec.name, "model_source": case.source,
        "model_spec": spec.to_dict(), "n_layers": spec.n_layers, "plan": str(plan),
        "n_devices": world, "dtype": spec.dtype, "batch": wl.batch, "seq_len": wl.seq_len,
        **ceil,
    }
    peak_flops = ceil["matmul_peak_tflops"] * 1e12 * world if ceil["matmul_peak_tflops"] else None
    if s.phase in ("prefill", "both"):
        monitor.phase("bench prefill")
        probes: list[float] = []
        times, replay, why = time_prefill(model, prompt, s, device, comm,
                                          between=_probing(probes, device))
        host = _host_probe(comm, device, probes)
        comm_bytes, comm_share = _comm_profile(lambda: model.step(prompt, 0), device, comm)
        med = statistics.median(times)
        flops = metrics.prefill_flops(spec, wl.batch, wl.seq_len)
        records.append({**common, "phase": "prefill", "tps": wl.batch * wl.seq_len / med,
                        "tpot_ms": None, "ms_per_token": None,
                        "mfu": flops / med / peak_flops if peak_flops else None,
                        "hbm_gbps": None, "cuda_graphs": replay is not None,
                        **({"eager_because": why} if why else {}),
                        "comm_bytes": comm_bytes, "comm_share": comm_share,
                        "host_probe_us": host,
                        **summarize(times),
                        **_trace(s, case, plan, "prefill",
                                 replay or (lambda: model.step(prompt, 0)), device, comm)})
        del replay  # the graph's memory goes back before the decode steps
    if s.phase in ("decode", "both"):
        monitor.phase("bench decode")
        probes = []
        times, replay = time_decode(model, prompt, steps[0], wl.seq_len, s, device, comm,
                                    between=_probing(probes, device))
        host = _host_probe(comm, device, probes)
        comm_bytes, comm_share = _comm_profile(lambda: model.step(steps[0], wl.seq_len),
                                               device, comm)
        med = statistics.median(times)
        ctx = wl.seq_len + s.warmup + s.iters // 2
        nbytes = metrics.decode_bytes(spec, wl.batch, ctx)
        floor_s = nbytes / world / (ceil["hbm_peak_gbps"] * 1e9) if ceil["hbm_peak_gbps"] else None
        flops = metrics.decode_flops(spec, wl.batch, ctx)
        records.append({**common, "phase": "decode", "tps": wl.batch / med,
                        "tpot_ms": 1e3 * med, "ms_per_token": 1e3 * med / wl.batch,
                        "mfu": flops / med / peak_flops if peak_flops else None,
                        "hbm_gbps": nbytes / world / med / 1e9, "hbm_floor_ms":
                        1e3 * floor_s if floor_s else None,
                        "floor_ratio": med / floor_s if floor_s else None, "floor_ctx": ctx,
                        "cuda_graphs": replay is not None,
                        "settle_s": s.settle_s if device.type == "cuda" else 0.0,
                        "comm_bytes": comm_bytes,
                        "comm_share": comm_share,
                        "host_probe_us": host,
                        **summarize(times),
                        **_trace(s, case, plan, "decode",
                                 replay or (lambda: model.step(steps[0], wl.seq_len)),
                                 device, comm)})
    peak = peak_memory(device)
    monitor.phase("report")
    peak = max_over_ranks(peak, device, comm)
    report = model.report()  # after the runs: some strategies report what the last one did
    for r in records:
        r["peak_mem_gb"] = peak / 1e9
        r["report"] = report
    return records if rank == 0 else []


def _probing(probes: list, device):
    """A callback that times one step of calibrate's layer probe into ``probes``."""
    from .hostprobe import host_probe_step_us

    return lambda: probes.append(host_probe_step_us(device))


def _host_probe(comm, device, probes: list) -> float:
    """The host's speed during a measurement, as the slowest rank found it:
    the per-layer time of calibrate's layer probe (us), the median of the
    probe steps run between the timed eager steps (the host's speed drifts
    within seconds: a probe before the steps missed slow stretches), or, for
    steps replayed from a CUDA graph, the probe timed now. Recorded beside
    each measurement."""
    from .hostprobe import host_probe_us

    mine = statistics.median(probes) if probes else host_probe_us(device)
    return max_over_ranks(mine, device, comm)


def _trace(s: BenchSettings, case, plan, phase: str, step, device, comm) -> dict:
    """With ``--trace DIR``: one more step as the timed ones ran (a step timed
    from a CUDA graph is one more replay of it, a decode step's at the last
    timed position: the kernels the graph holds, with the gaps between them),
    profiled on every rank (:func:`~shardwise.runtime.timing.trace_step`);
    the record gets every rank's summary under ``trace``."""
    if not s.trace:
        return {}
    rank = comm.topo.rank
    name = re.sub(r"[^A-Za-z0-9.-]+", "_", f"{case.preset or case.model.name}-{plan}")
    path = os.path.join(s.trace, f"{name}-{phase}-rank{rank}.json")
    summary = trace_step(step, device, comm, path)
    keys = ("wall_ms", "host_ops") + (("device_busy_ms", "kernels") if device.type == "cuda" else ())
    rows = comm.gather_floats([float(summary[k]) for k in keys], device)
    return {"trace": {"dir": s.trace, "file": os.path.basename(path).replace(f"rank{rank}", "rank{r}"),
                      "ranks": [dict(zip(keys, r)) for r in rows]}}


def _comm_profile(step, device, comm) -> tuple[float, float]:
    """Bytes sent (busiest rank) and the share of a step spent inside blocking
    collectives, from one extra untimed step with a device sync around every
    collective (so overlap is not credited: an upper bound on exposed comm)."""
    comm.reset()
    comm.time_blocking = True
    try:
        _, step_s = timed_call(step, device, comm)
    finally:
        comm.time_blocking = False
    nbytes = max_over_ranks(comm.total_bytes(), device, comm)
    share = max_over_ranks(comm.blocking_s / step_s, device, comm)
    comm.reset()
    return nbytes, share
