"""Timing of prefill and decode steps, and the ceilings figures are judged against.

Prefill: warm-up iterations, then each timed iteration starts after a barrier
and a device synchronisation and ends at each rank's own synchronisation; the
slowest rank's time is the step's. On a GPU a step that makes no host
synchronisation on any rank is captured once in a CUDA graph and each timed
iteration replays it (:func:`prefill_graph`): the host's launches leave the
step, as they do a decode step's.
Decode: the prompt is prefilled once, then steps run at positions L, L+1, ...
When the strategy supports it and the device is CUDA, one decode step is
captured in a CUDA graph with the position held in a device tensor (the
static-shape path of the reference attention), and each timed step is one
graph replay bracketed by CUDA events: no host synchronisation inside a step.
On a GPU the timed decode steps follow ``settle_s`` seconds of untimed ones
(:func:`_settle`): right after a long prefill the GPU's power management holds
the SM clock down for tens of milliseconds, and the steps timed in it are not
the steady state a server decodes in.

The ceilings are measured here, on the device at hand, in the same run: a
large bf16 GEMM (the matmul peak) and a large device-to-device copy (HBM
bandwidth, bytes read plus bytes written).
"""
from __future__ import annotations

import os
import statistics
import time
import warnings
from dataclasses import dataclass

import torch



@dataclass
class BenchSettings:
    phase: str = "both"  # prefill | decode | both
    iters: int = 10
    warmup: int = 3
    graphs: bool = True  # CUDA graphs for decode steps and prompts where supported
    trace: str | None = None  # directory for one profiled step per phase and rank (trace_step)
    settle_s: float = 0.25  # untimed decode steps on a GPU before the timed ones (_settle)

    @property
    def decode_positions(self) -> int:
        return self.warmup + self.iters + 1


def summarize(times_s: list[float]) -> dict:
    """Median and spread (min, max, and the 10th/90th percentile) in ms, and
    every time in the order run (``times_ms``: a drift or a second mode shows
    there, where the percentiles only say that one exists)."""
    ms = sorted(1e3 * t for t in times_s)
    q = (lambda f: ms[min(len(ms) - 1, int(f * (len(ms) - 1) + 0.5))])
    return {"median_ms": statistics.median(ms), "min_ms": ms[0], "max_ms": ms[-1],
            "p10_ms": q(0.1), "p90_ms": q(0.9), "n": len(ms),
            "times_ms": [round(1e3 * t, 4) for t in times_s]}


def sync_device(device) -> None:
    """Wait for the work queued on ``device`` (a GPU); nothing on a CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_ceilings(device, dtype=torch.bfloat16) -> dict:
    """Matmul peak (TFLOP/s, 8192^3 GEMM on random data) and copy bandwidth
    (GB/s, read + write of a 2 GiB buffer), medians of several runs."""
    if device.type != "cuda":
        return {"matmul_peak_tflops": None, "matmul_sustained_tflops": None, "hbm_peak_gbps": None}
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    mm = _event_times(lambda: a @ b, 10, 3)
    # The same GEMM for ~0.5 s: clocks settle lower under sustained load, as
    # in a long prefill. Recorded beside the peak (MFU stays against the peak).
    sustained = _event_times(lambda: a @ b, 300, 0)[-100:]
    src = torch.empty(2**30 // 2, device=device, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    cp = _event_times(lambda: dst.copy_(src), 10, 3)
    out = {"matmul_peak_tflops": 2 * n**3 / statistics.median(mm) / 1e12,
           "matmul_sustained_tflops": 2 * n**3 / statistics.median(sustained) / 1e12,
           "hbm_peak_gbps": 2 * src.nbytes / statistics.median(cp) / 1e9}
    del a, b, src, dst
    torch.cuda.empty_cache()
    return out


def _event_times(fn, iters: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]


def graphed_us(fn, reps: int = 10, iters: int = 30) -> float:
    """Device time of one ``fn()`` in microseconds, with no host in it:
    ``reps`` calls captured in one CUDA graph (after a call outside the
    capture, which compiles Triton kernels and builds cuDNN's plans), the
    median of ``iters`` replays over ``reps``. A kernel of tens of
    microseconds launched from Python is otherwise timed with its launch
    when the host is the slower (the kernel probes' case)."""
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    times = _event_times(graph.replay, iters, warmup=3)
    return 1e6 * statistics.median(times) / reps


def timed_call(fn, device, comm):
    """Run ``fn`` after a barrier and a device sync; (result, seconds of the
    slowest rank). Each rank's clock stops at its own device sync, so neither
    a closing barrier nor the exchange of the times is inside the window."""
    comm.barrier()
    sync_device(device)
    t0 = time.perf_counter()
    out = fn()
    sync_device(device)
    dt = time.perf_counter() - t0
    return out, max_over_ranks(dt, device, comm)


def max_over_ranks(value: float, device, comm) -> float:
    """The largest of every rank's ``value`` (each rank learns it)."""
    return max(v[0] for v in comm.gather_floats([float(value)], device))


def trace_step(fn, device, comm, path: str) -> dict:
    """Run ``fn`` once more under ``torch.profiler`` (host ops and device
    kernels), write a Chrome trace to ``path`` (open it in Perfetto or
    chrome://tracing) and a table of the costliest host ops beside it, and
    return where the step's time went on this rank: wall time, time the
    device was busy (union of kernel intervals), kernels launched and
    host ops run. A step whose busy share is low is bound by the host."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    # The first profiled step pays the profiler's own start-up (tens of ms
    # on GPUs): one step warms it up, the second is recorded.
    for _ in range(2):
        with profile(activities=acts) as prof:
            comm.barrier()
            sync_device(device)
            t0 = time.perf_counter()
            fn()
            sync_device(device)
            wall = time.perf_counter() - t0
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    prof.export_chrome_trace(path)
    events = prof.events()
    kernels = sorted((e.time_range.start, e.time_range.end) for e in events
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, float("-inf")  # union of [start, end) intervals, us
    for a, b in kernels:
        if b > end:
            busy += b - max(a, end)
            end = b
    averages = prof.key_averages()
    tables = [averages.table(sort_by="self_cpu_time_total", row_limit=15)]
    if kernels:
        tables.append(averages.table(sort_by="self_device_time_total", row_limit=15))
    with open(os.path.splitext(path)[0] + ".txt", "w") as f:
        f.write("\n\n".join(tables))
    host_ops = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CPU)
    return {"path": path, "wall_ms": 1e3 * wall, "device_busy_ms": busy / 1e3,
            "kernels": len(kernels), "host_ops": host_ops}


def _timed_steps(step_at, iters: int, device, comm, between=None) -> list[float]:
    """Seconds of ``step_at(i)`` for i < iters, each timed on its own; ``between``
    (untimed) after each."""
    times = []
    for i in range(iters):
        times.append(timed_call(lambda: step_at(i), device, comm)[1])
        if between is not None:
            between()
    return times


def _settle(step, seconds: float, device, comm) -> int:
    """Run ``step`` untimed for about ``seconds`` on a GPU, the same number
    of times on every rank (from the slowest rank's first step); returns how
    many. After a prefill of 16 x 4096 tokens on one H100, nvidia-smi showed
    the SM clock held at 1.44-1.59 GHz (reason: software power cap) against
    1.98, and the first ~50 ms of decode steps ran 14% slower, the plain
    PyTorch peer's as much (results/real/README.md, 1f88207)."""
    if device.type != "cuda" or seconds <= 0:
        return 0
    _, once = timed_call(step, device, comm)
    n = min(int(seconds / max(once, 1e-6)), 10_000)
    for _ in range(n):
        step()
    sync_device(device)
    return n + 1


def time_prefill(model, prompt, s: BenchSettings, device, comm, between=None):
    """Prefill step times (seconds), a replay of the CUDA graph they ran
    from (None where they ran eagerly) and why not one (:func:`prefill_graph`);
    ``between`` runs untimed after each step. Each timed step is one call
    as the eager path times it (a barrier and a device sync first, the
    host's clock stopped at the device sync after it), so the two paths'
    times compare: from the host asking for the prompt's step to its last
    kernel's end. The graph takes the host's launches out of the step,
    which a short prompt waits on: each of Mixtral-8x7b's layers launches
    dozens of kernels of a few microseconds at 1 x 2048 tokens, and the GPU
    idled 0.4 to 0.9 ms of a 6.8 to 7.4 ms eager step on an H100
    (results/real/README.md)."""
    replay, why = prefill_graph(model, prompt, s, device, comm)
    step = replay or (lambda: model.step(prompt, 0))
    if replay is None:
        for _ in range(s.warmup):
            step()
    return _timed_steps(lambda i: step(), s.iters, device, comm, between), replay, why


_SYNC_WARNING = "synchronizing CUDA operation"  # what torch.cuda's sync debug mode warns


def prefill_graph(model, prompt, s: BenchSettings, device, comm):
    """``(replay, "")``: a replay of one prefill step captured in a CUDA
    graph; or ``(None, why)`` where it cannot be: no graphs asked for, not
    a GPU, a step that waits on the device from the host on any rank (a
    prompt's MoE layer that reads its group sizes to the host, say: ``why``
    names the line), or a capture that failed. The first warm-up step runs
    under PyTorch's sync debug mode, which warns at every host
    synchronisation a step makes; the ranks agree before any captures (a
    rank whose capture failed midway would leave the others' collectives
    without a partner), and again after, keeping the graphs only if every
    rank's capture succeeded. The step's inputs and position (0) are the
    ones every replay runs on. A step before the checked one builds what
    the code makes once (a longer prompt's rotary table, copied from the
    host), which no later step does."""
    if not s.graphs:
        return None, "graphs off"
    if device.type != "cuda":
        return None, "not a GPU"
    model.step(prompt, 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            model.step(prompt, 0)
        finally:
            torch.cuda.set_sync_debug_mode(mode)
    waits = [f"{os.path.basename(w.filename)}:{w.lineno}" for w in caught
             if _SYNC_WARNING in str(w.message)]
    if not _everywhere(not waits, device, comm):
        return None, ("the step waits on the device at " + ", ".join(dict.fromkeys(waits))
                      if waits else "another rank's step waits on the device")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm up (allocations, kernels) off the capture
        for _ in range(max(s.warmup - 2, 0)):
            model.step(prompt, 0)
    torch.cuda.current_stream(device).wait_stream(side)
    # The graph's tensors come from a pool of its own: the blocks the eager
    # steps cached go back first, so that a prompt near the memory's limit
    # is not held twice (a capture that still runs out fails, and runs eagerly).
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    comm.barrier()
    graph, failed = torch.cuda.CUDAGraph(), ""
    try:
        with torch.cuda.graph(graph):
            model.step(prompt, 0)
    except RuntimeError as e:
        failed = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    torch.cuda.synchronize(device)
    if not _everywhere(not failed, device, comm):
        return None, f"capture failed: {failed}" if failed else "another rank's capture failed"
    return graph.replay, ""


def _everywhere(ok: bool, device, comm) -> bool:
    """Whether ``ok`` holds on every rank (each rank learns every rank's)."""
    return max_over_ranks(not ok, device, comm) == 0


def time_decode(model, prompt, token, seq_len: int, s: BenchSettings, device, comm,
                between=None):
    """Decode step times (seconds) at positions seq_len + warmup + i; returns
    (times, a replay of the CUDA graph the steps ran from, at the last timed
    position, or None when they ran eagerly). The replay holds the graph's
    input tensors: freed, their memory would be handed to other tensors
    while the graph still reads it. ``between`` runs untimed after each
    eager step (graph replays are timed back to back)."""
    model.step(prompt, 0)
    use_graphs = s.graphs and device.type == "cuda" and model.supports_graphs
    if not use_graphs:
        for i in range(s.warmup):
            model.step(token, seq_len + i)
        # The first timed position, which the first timed step writes again.
        _settle(lambda: model.step(token, seq_len + s.warmup), s.settle_s, device, comm)
        return _timed_steps(lambda i: model.step(token, seq_len + s.warmup + i), s.iters,
                            device, comm, between), None
    pos = torch.tensor(seq_len, device=device)
    static_in = token.clone()
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # warm up (allocations, kernels) off the capture
        for i in range(s.warmup):
            pos.fill_(seq_len + i)
            model.step(static_in, pos)
    torch.cuda.current_stream(device).wait_stream(side)
    comm.barrier()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model.step(static_in, pos)
    first = seq_len + s.warmup  # the first timed position, written again by its step
    pos.fill_(first)

    def again():  # a step that keeps a position counter of its own is moved back each time
        model.seek(first)
        graph.replay()

    _settle(again, s.settle_s, device, comm)
    model.seek(first)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(s.iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(s.iters)]
    comm.barrier()
    for i in range(s.iters):
        pos.fill_(seq_len + s.warmup + i)
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize(device)
    comm.barrier()
    last = seq_len + s.warmup + s.iters - 1

    def replay():
        pos.fill_(last)
        static_in.copy_(token)
        graph.replay()

    return [a.elapsed_time(b) / 1e3 for a, b in zip(starts, ends)], replay
