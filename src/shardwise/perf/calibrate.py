"""Measure the machine at hand and write a cluster profile for the cost model.

``shardwise calibrate --out PROFILE.json [--nproc N] [--quick]`` starts one
rank per GPU (NCCL) or N CPU ranks (gloo) through the shared launcher; every
rank runs :func:`measure` at once, so collectives span all of them. Measured:

* matmul rate over a grid of shapes (:data:`GEMM_GRID`: 16 to 16384 rows,
  inner and output widths 512 to 128k), FLOPs = 2mkn, which the cost model
  interpolates (``gemm_grid``); the median of the compute-bound ones is the
  profile's ``matmul_tflops``;
* causal attention (``scaled_dot_product_attention``) at head_dim 128 and
  512, FLOPs = 4 B H d L(L+1)/2, the count the cost model uses; and
  shardwise's flash kernel for wide heads at head_dim 256 and 512 as the
  code calls it (``wide_attention_tflops``, GPUs only);
* HBM bandwidth: a device copy, 2 x bytes (read + write) / time;
* the host side of eager work on every rank, the slowest kept
  (:mod:`.hostcost`);
* read-bound streaming (a 16-row GEMV's weight reads), FlashAttention-2
  called directly (``attend_lse``'s kernel), the GPU time of a tiny kernel,
  of the smallest GEMM and decode attention, of each kind of kernel a decode
  layer launches at widths 512 to 4096 (``decode_kernels_us``, with a whole
  layer of each width beside them; ``graph_layer_us`` a diagnostic) and of
  an 8 KB all-reduce replayed from a CUDA graph, the matmul rate after
  ~2 s of back-to-back GEMMs (the clock a long prefill runs at), and how much
  of an all-reduce beside GEMMs on another stream is hidden;
* for all-reduce, all-gather, reduce-scatter, all-to-all and point-to-point
  (a ring exchange), time against message size (8 KB .. 256 MB). The
  latency is the time at the smallest size; each larger size gives a bus
  bandwidth ``factor x S / (t - latency)`` (nccl-tests' factors), stored as
  the profile's table.

Timing uses CUDA events on GPUs and a synchronised wall clock on CPU; each
figure is the mean of timed iterations after warm-up, on rank 0 (a
collective's time already waits for the slowest rank). ``--quick`` uses
small sizes and few iterations so the whole path runs on CPU in seconds.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import statistics
import sys
import time
from typing import NoReturn

from ..spec import ShardwiseError
from ..runtime.hostprobe import device_timer
from .graphcost import graph_costs
from .hostcost import host_costs, launch_cost_us, slowest_rank

COLLECTIVE_SIZES = [2**13 * 4**k for k in range(8)] + [2**28]  # 8 KB .. 128 MB, 256 MB
QUICK_SIZES = [2**13, 2**16, 2**19]
ENV = "SHARDWISE_CALIBRATE"


# The GEMM grid calibrate times: rows from a decode step's few to a long
# prefill's, inner and output widths over the projections of models from
# 512 to 128k wide, each a power of two (of four for the widths). The cost
# model interpolates between them (Cluster.gemm_rate); no model's shapes are
# timed as such.
GEMM_GRID = {"m": (16, 64, 256, 1024, 4096, 16384),
             "k": (512, 2048, 8192, 32768, 131072),
             "n": (512, 2048, 8192, 32768, 131072)}
QUICK_GRID = {"m": (16, 64), "k": (64, 256), "n": (64, 256)}
# GEMMs whose operands would not fit a few GB are left out of the grid.
GEMM_MAX_BYTES = 3 * 2**30
# Idle time before each GEMM shape is timed (burst rates; see matmul_grid).
BURST_IDLE_S = 0.3


def matmul_grid(device, dtype, quick: bool) -> dict:
    """The achieved rate (TFLOP/s, 2mkn / time) of ``[m x k] @ [k x n]`` over
    :data:`GEMM_GRID` (:data:`QUICK_GRID` with ``quick``), each from an idle
    GPU (back to back, later shapes would run at the lower clock a sustained
    load holds, which ``sustained_matmul`` measures on its own). A shape too
    large for :data:`GEMM_MAX_BYTES` is left out (null). Returns
    ``{"m": [...], "k": [...], "n": [...], "tflops": [m][k][n]}``."""
    import torch

    grid = QUICK_GRID if quick else GEMM_GRID
    e = torch.empty((), dtype=dtype).element_size()
    table = []
    for m in grid["m"]:
        rows = []
        for k in grid["k"]:
            row = []
            for n in grid["n"]:
                if (m * k + k * n + m * n) * e > GEMM_MAX_BYTES:
                    row.append(None)
                    continue
                a = torch.randn(m, k, device=device, dtype=dtype)
                b = torch.randn(k, n, device=device, dtype=dtype)
                if device.type == "cuda" and not quick:
                    torch.cuda.synchronize(device)
                    time.sleep(BURST_IDLE_S)
                t = device_timer(device, lambda: a @ b, 3 if quick else 10, 1 if quick else 3)
                row.append(_tflops(2 * m * k * n / t / 1e12))
            rows.append(row)
        table.append(rows)
    return {**{axis: list(grid[axis]) for axis in ("m", "k", "n")}, "tflops": table}


def _tflops(rate: float) -> float:
    """A rate in TFLOP/s kept to four significant digits: a CPU's small
    GEMMs run at thousandths of one, which three decimals would make 0."""
    return float(f"{rate:.4g}")


def _headline(grid: dict) -> float:
    """The matmul rate a profile quotes: the median over the grid's shapes of
    at least 1024 rows (compute-bound)."""
    rates = [r for m, plane in zip(grid["m"], grid["tflops"]) if m >= 1024
             for row in plane for r in row if r is not None]
    rates = rates or [r for plane in grid["tflops"] for row in plane for r in row if r is not None]
    return _tflops(statistics.median(rates))


def attention_rate(device, dtype, head_dim: int, quick: bool) -> dict:
    import torch
    import torch.nn.functional as Fn

    B, L = (1, 128) if quick else (2, 4096)
    H = max(1, (256 if quick else 4096) // head_dim)
    q, k, v = (torch.randn(B, H, L, head_dim, device=device, dtype=dtype) for _ in range(3))
    t = device_timer(device, lambda: Fn.scaled_dot_product_attention(q, k, v, is_causal=True),
               3 if quick else 10, 1 if quick else 3)
    return {"batch": B, "heads": H, "seq": L, "head_dim": head_dim,
            "tflops": 4 * B * H * head_dim * L * (L + 1) / 2 / t / 1e12}


def wide_attention_rate(device, dtype, head_dim: int, quick: bool) -> float | None:
    """shardwise's flash kernel for wide heads (``model/flash.py``) as the code
    calls it, causal, at head_dim 256 or 512 (TFLOP/s, the count of
    :func:`attention_rate`): ``attend_lse`` on a block of queries, which takes
    the kernel at both widths. None where the code would not take it (CPU,
    fp32, Triton missing)."""
    import torch

    from ..model.flash import wide_ok
    from ..parallel.lse import attend_lse

    B, L = (1, 128) if quick else (1, 8192)
    H = max(1, (512 if quick else 8192) // head_dim)
    q, k, v = (torch.randn(B, H, L, head_dim, device=device, dtype=dtype) for _ in range(3))
    if not wide_ok(q, k, v):
        return None
    t = device_timer(device, lambda: attend_lse(q, k, v, causal=True), 3 if quick else 10,
               1 if quick else 3)
    return 4 * B * H * head_dim * L * (L + 1) / 2 / t / 1e12


def copy_rate(device, quick: bool) -> float:
    import torch

    n = (8 if quick else 1024) * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = device_timer(device, lambda: dst.copy_(src), 3 if quick else 20, 1 if quick else 3)
    return 2 * n / t / 1e9


def stream_rate(device, dtype, quick: bool) -> float:
    """Read-bound streaming (GB/s): a 16-row GEMV over a [4096 x 16384] weight
    (the decode step's weight reads), weight bytes / time."""
    import torch

    k, n, rows = (256, 512, 4) if quick else (4096, 16384, 16)
    w = torch.randn(n, k, device=device, dtype=dtype)
    x = torch.randn(rows, k, device=device, dtype=dtype)
    t = device_timer(device, lambda: x @ w.t(), 3 if quick else 50, 1 if quick else 5)
    return w.numel() * w.element_size() / t / 1e9


def flash_rate(device, dtype, quick: bool) -> float | None:
    """FlashAttention-2 called directly (what attend_lse and an eager decode
    step run), causal, head_dim 128; None where the kernel is unavailable."""
    import torch

    if device.type != "cuda" or dtype not in (torch.float16, torch.bfloat16):
        return None
    B, L, H, d = (1, 128, 2, 128) if quick else (2, 4096, 32, 128)
    q, k, v = (torch.randn(B, H, L, d, device=device, dtype=dtype) for _ in range(3))
    fn = lambda: torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False)
    t = device_timer(device, fn, 3 if quick else 10, 1 if quick else 3)
    return 4 * B * H * d * L * (L + 1) / 2 / t / 1e12


def overlap_efficiency(device, comm, dtype, quick: bool) -> float | None:
    """How much of an all-reduce running beside compute is hidden: a GEMM loop
    alone (t_c), the all-reduces alone (t_a, one after another), then both at
    once, the all-reduces on a side stream (t_b). The overlap hides
    t_c + t_a - t_b of the t_a, so efficiency = (t_c + t_a - t_b) / t_a,
    clamped to [0, 1] (1: the collective costs the compute nothing; less:
    its kernels take SMs and memory bandwidth the GEMMs wanted). None on CPU
    or one rank."""
    import torch

    if device.type != "cuda" or comm.topo.world_size < 2:
        return None
    m, k, n = (256, 256, 256) if quick else (8192, 4096, 4096)
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    x = torch.ones((64 if quick else 128) * 2**20 // 2, device=device, dtype=dtype)
    reps = 3 if quick else 20
    side = torch.cuda.Stream(device)

    def gemms():
        for _ in range(reps):
            a @ b

    def reduces():
        for _ in range(max(1, reps // 4)):
            comm.all_reduce(x, "world")

    def both():
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            reduces()
        gemms()
        torch.cuda.current_stream(device).wait_stream(side)

    comm.barrier()
    t_c = device_timer(device, gemms, 3, 1)
    comm.barrier()
    t_a = device_timer(device, reduces, 3, 1)
    comm.barrier()
    t_b = device_timer(device, both, 3, 1)
    if t_a <= 0:
        return None
    return min(1.0, max(0.0, (t_c + t_a - t_b) / t_a))


def sustained_matmul(device, dtype, quick: bool) -> float:
    """Matmul rate (TFLOP/s) after the GPU has run GEMMs back to back for ~2 s:
    under its power cap a GPU's clock falls during long runs, which the short
    bursts of :func:`matmul_grid` do not see."""
    import time as _time

    import torch

    m, k, n = (64, 128, 512) if quick else (8192, 4096, 16384)
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    end = _time.perf_counter() + (0.05 if quick else 2.0)
    while _time.perf_counter() < end:
        for _ in range(20):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    t = device_timer(device, lambda: a @ b, 3 if quick else 500, 0)
    return 2 * m * k * n / t / 1e12


def collective_times(comm, device, dtype, sizes: list[int], quick: bool) -> dict[str, list]:
    """Seconds per call against payload bytes (as Comm counts them)."""
    import torch

    n, rank = comm.topo.world_size, comm.topo.rank
    e = torch.empty((), dtype=dtype).element_size()
    out: dict[str, list] = {}
    for S in sizes:
        elems = max(n, S // e // n * n)  # divisible by n for the split collectives
        x = torch.ones(elems, device=device, dtype=dtype)
        part = torch.ones(elems // n, device=device, dtype=dtype)
        recv = torch.empty_like(x)
        nxt, prv = (rank + 1) % n, (rank - 1) % n

        def p2p():
            for req in comm.exchange([(x, nxt)], [(recv, prv)], "world"):
                req.wait()

        ops = {
            "all_reduce": lambda: comm.all_reduce(x, "world"),
            "all_gather": lambda: comm.all_gather(part, "world"),
            "reduce_scatter": lambda: comm.reduce_scatter(x, "world"),
            "all_to_all": lambda: comm.all_to_all(x, "world"),
            "p2p": p2p,
        }
        iters = 3 if quick else (20 if S <= 2**24 else 5)
        for name, fn in ops.items():
            t = device_timer(device, fn, iters, 1 if quick else 3, before=comm.barrier)
            out.setdefault(name, []).append([elems * e, t])
    return out


def link_profile(op: str, points: list, n: int) -> dict:
    """Latency (the smallest message's time) and bus bandwidth per size."""
    from .links import bus_factor

    factor = bus_factor(op, n)
    latency = min(t for _, t in points)
    table = []
    for S, t in points:
        if t > 1.25 * latency:  # past the latency-bound sizes
            table.append([S, round(factor * S / (t - latency) / 1e9, 4)])
    if not table:  # latency-bound throughout: the apparent bandwidth at the largest size
        S, t = max(points)
        table = [[S, round(factor * S / t / 1e9, 4)]]
    return {"latency_us": round(latency * 1e6, 3), "table": table}


# -- one rank -------------------------------------------------------------------------

# The steps of measure() (its progress: one event per step, from rank 0).
MEASUREMENTS = 10


def _steps(rank: int, total: int):
    """``step(what)``: the next of ``total`` steps begins (runtime/progress.py)."""
    from ..runtime.progress import Reporter

    progress, counter = Reporter(rank), iter(range(total))
    return lambda what: progress.step(next(counter, total - 1), total, what)


def measure(job, settings: dict) -> dict | None:
    """Run on every rank; returns the profile on rank 0."""
    import torch

    from ..parallel.comm import Comm
    from ..parallel.topology import Topology
    from ..runtime.worker import init_distributed
    from ..spec import torch_dtype

    rank, world, device = init_distributed(job)
    quick = settings.get("quick", False)
    topo = Topology(("world",), (world,), rank=rank, device_type=device.type).build()
    comm = Comm(topo)
    dtypes = settings.get("dtypes") or (["bf16", "fp16"] if device.type == "cuda" else ["fp32"])
    step = _steps(rank, MEASUREMENTS)
    with torch.inference_mode():
        step("matmul rates (" + ", ".join(dtypes) + ")")
        grids = {d: matmul_grid(device, torch_dtype(d), quick) for d in dtypes}
        first = torch_dtype(dtypes[0])
        step("attention")
        attn = [attention_rate(device, first, hd, quick) for hd in (128, 512)]
        wide = {hd: wide_attention_rate(device, first, hd, quick) for hd in (256, 512)}
        step("device copy and streaming")
        hbm = copy_rate(device, quick)
        stream = stream_rate(device, first, quick)
        step("flash attention")
        flash = flash_rate(device, first, quick)
        step("sustained matmul")
        sustained = sustained_matmul(device, first, quick)
        comm.barrier()
        step("host cost of a layer")
        probe = launch_cost_us(device, comm, quick)
        comm.barrier()
        step("host cost of each call kind")
        host = host_costs(device, comm, quick)
        host.update(launch_us=probe["launch_us"], layer_probe_us=probe["layer_probe_us"],
                    step_host_ratio=probe["step_host_ratio"])

        host, host_per_rank = slowest_rank(host, device)
        comm.barrier()
        step("CUDA graph costs")
        graph = graph_costs(device, comm, quick)
        comm.barrier()
        step("overlap of compute and communication")
        overlap = overlap_efficiency(device, comm, first, quick)
        comm.barrier()
        step("collectives")
        colls = (collective_times(comm, device, first, QUICK_SIZES if quick else COLLECTIVE_SIZES,
                                  quick) if world > 1 else {})
    if rank != 0:
        return None
    from ..bench.records import git_rev

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, mem, l2 = props.name, props.total_memory, props.L2_cache_size
    else:
        name = f"cpu ({os.cpu_count()} cores)"
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // world
        l2 = 0
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return {
        "name": settings.get("name") or f"calibrated-{slug}-x{world}",
        "device": name,
        "gpus_per_node": world,
        "nodes": 1,
        "matmul_tflops": {d: _headline(g) for d, g in grids.items()},
        "gemm_grid": grids,
        "attention_tflops": {"dtype": dtypes[0],
                             "head_dim<=256": _tflops(attn[0]["tflops"]),
                             "head_dim>256": _tflops(attn[1]["tflops"])},
        "hbm_gbps": round(hbm, 2),
        "hbm_bytes": int(mem),
        "l2_bytes": int(l2),
        "launch_us": round(host["launch_us"], 3),
        "op_us": round(host["op_us"], 3),
        "view_us": round(host["view_us"], 3),
        "module_us": round(host["module_us"], 3),
        "sync_us": round(host["sync_us"], 3),
        "gemm_us": round(host["gemm_us"], 3),
        "norm_us": round(host["norm_us"], 3),
        "attn_us": {"prefill": round(host["attn_prefill_us"], 3),
                    "decode": round(host["attn_decode_us"], 3)},
        "step_host_ratio": round(host["step_host_ratio"], 3),
        **({"collective_us": {k: round(v, 3) for k, v in host["collective_us"].items()}}
           if host["collective_us"] else {}),
        "stream_gbps": round(stream, 2),
        **({"flash_tflops": _tflops(flash)} if flash else {}),
        **({"wide_attention_tflops": {"dtype": dtypes[0], **{str(hd): _tflops(r)
                                                              for hd, r in wide.items() if r}}}
           if any(wide.values()) else {}),
        **graph,
        **({"overlap_efficiency": round(overlap, 3)} if overlap is not None else {}),
        "sustained_matmul_tflops": _tflops(sustained),
        "links": ({"nvlink": {op: link_profile(op, pts, world) for op, pts in colls.items()}}
                  if colls else {}),
        "source": {
            "summary": f"calibrated on {name} x{world} by shardwise calibrate, {date}, "
                       f"{git_rev()}" + (" (--quick: small sizes, not for predictions)" if quick else ""),
            "torch": torch.__version__,
            "backend": comm.backend,
        },
        "measurements": {"attention": attn,
                         "collectives_seconds": colls,
                         # Host figures of every rank (the profile keeps the largest), and
                         # the eager layer probe: its time and its calls by kind.
                         "host_per_rank": host_per_rank,
                         "layer_probe": {"us": round(host["layer_probe_us"], 3),
                                         "calls": probe["calls"]}},
    }


def main(argv: list[str]) -> NoReturn:
    """Entry point of one rank: ``python -m shardwise.perf.calibrate JOB.json``
    (the launcher's worker protocol: result on rank 0, traceback on failure)."""
    from ..runtime.worker import rank_main

    def body(job, save):
        import torch.distributed as dist

        settings = json.loads(os.environ.get(ENV, "{}"))
        profile = measure(job, settings)
        out = None if profile is None else [profile]
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
        return out

    rank_main(argv, body)


# -- the command ----------------------------------------------------------------------

def calibrate(out: str, nproc: int | None = None, device: str = "auto", quick: bool = False,
              name: str | None = None, dtypes: list[str] | None = None,
              deadline_s: float | None = 1800, on_progress=None) -> dict:
    """Launch the calibration on ``nproc`` ranks, write the profile to ``out``
    and return it (``on_progress``: each step as it begins, see
    runtime/progress.py). Raises ShardwiseError if the profile does not load."""
    import torch

    from ..runtime.job import Job
    from ..runtime.launcher import launch
    from ..runtime.worker import write_atomic
    from .clusters import Cluster

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ShardwiseError("--device cuda but no CUDA GPU is visible; use --device cpu")
    if nproc is None:
        nproc = torch.cuda.device_count() if device == "cuda" else 2
    if nproc < 1 or (device == "cuda" and nproc > torch.cuda.device_count()):
        raise ShardwiseError(f"--nproc {nproc}: give 1 .. {torch.cuda.device_count()} on this machine"
                             if device == "cuda" else f"--nproc must be >= 1 (got {nproc})")
    settings = {"quick": quick, "name": name, "dtypes": dtypes}
    job = Job([], nproc, device, env={ENV: json.dumps(settings)})
    results = launch(job, deadline_s=deadline_s, module="shardwise.perf.calibrate",
                     on_progress=on_progress)
    if not results:
        raise ShardwiseError("calibration returned no profile")
    profile = results[0]
    Cluster.from_dict(profile)  # the cost model must be able to load what we write
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_atomic(out, json.dumps(profile, indent=2) + "\n")
    return profile


def calibrate_command(out: str, nproc: int | None = None, device: str = "auto",
                      quick: bool = False, name: str | None = None, on_progress=None) -> str:
    """``shardwise calibrate --out FILE [--nproc N] [--device cpu|cuda] [--quick] [--name NAME]``."""
    p = calibrate(out, nproc, device, quick, name, on_progress=on_progress)
    lines = [f"wrote profile {p['name']} to {out}: {p['source']['summary']}",
             "matmul TFLOP/s: " + ", ".join(f"{d} {v:g}" for d, v in p["matmul_tflops"].items()),
             f"attention TFLOP/s: head_dim 128 {p['attention_tflops']['head_dim<=256']:g}, "
             f"head_dim 512 {p['attention_tflops']['head_dim>256']:g}"
             + "".join(f"; shardwise's flash kernel, head_dim {hd} {v:g}"
                       for hd, v in p.get("wide_attention_tflops", {}).items() if hd != "dtype"),
             f"device copy {p['hbm_gbps']:g} GB/s",
             f"host per call (slowest rank): op {p['op_us']:g} us, view {p['view_us']:g} us, "
             f"module {p['module_us']:g} us, device-to-host read {p['sync_us']:g} us"
             + "".join(f", {op} {v:g} us" for op, v in p.get("collective_us", {}).items())
             + f"; GEMM {p['gemm_us']:g} us, add + norm {p['norm_us']:g} us, "
             f"attention {p['attn_us']['prefill']:g} us "
             f"(prefill), {p['attn_us']['decode']:g} us (decode)"]
    for op, c in p["links"].get("nvlink", {}).items():
        lines.append(f"{op}: latency {c['latency_us']:g} us, bus bandwidth "
                     + ", ".join(f"{s / 2**20:g} MiB {b:g} GB/s" for s, b in c["table"]))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(sys.argv[1:])
