"""Measure the machine at hand and write a cluster profile for the cost model.

``shardwise calibrate --out PROFILE.json [--nproc N] [--quick]`` starts one
rank per GPU (NCCL) or N CPU ranks (gloo) through the shared launcher; every
rank runs :func:`measure` at once, so collectives span all of them. Measured:

* matmul rate over the shapes the seed models use (``[tokens x 4096] x
  [4096 x 12288]`` QKV, ``x [4096 x 4096]`` W_o, ``x [4096 x 16384]`` and
  ``[16384 x 4096]`` MLP), FLOPs = 2mkn; the profile keeps the median;
* causal attention (``scaled_dot_product_attention``) at head_dim 128 and
  512, FLOPs = 4 B H d L(L+1)/2, the count the cost model uses;
* HBM bandwidth: a device copy, 2 x bytes (read + write) / time;
* eager launch cost: a one-element op's host time;
* read-bound streaming (a 16-row GEMV's weight reads), FlashAttention-2
  called directly (``attend_lse``'s kernel), the GPU time of a tiny kernel and
  of an 8 KB all-reduce replayed from a CUDA graph, and the matmul rate after
  ~2 s of back-to-back GEMMs (the clock a long prefill runs at);
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

from ..spec import ShardwiseError

COLLECTIVE_SIZES = [2**13 * 4**k for k in range(8)] + [2**28]  # 8 KB .. 128 MB, 256 MB
QUICK_SIZES = [2**13, 2**16, 2**19]
ENV = "SHARDWISE_CALIBRATE"


# -- timing --------------------------------------------------------------------------

def _timer(device, fn, iters: int, warmup: int, before=None) -> float:
    """Mean seconds of ``fn()`` over ``iters`` calls after ``warmup``."""
    import torch

    for _ in range(warmup):
        fn()
    if before is not None:
        before()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def matmul_rates(device, dtype, quick: bool) -> list[dict]:
    import torch

    if quick:
        shapes = [(64, 128, 384), (64, 128, 512), (64, 512, 128)]
    else:
        shapes = [(8192, 4096, 12288), (8192, 4096, 4096), (8192, 4096, 16384),
                  (8192, 16384, 4096)]
    out = []
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        t = _timer(device, lambda: a @ b, 3 if quick else 20, 1 if quick else 5)
        out.append({"m": m, "k": k, "n": n, "tflops": 2 * m * k * n / t / 1e12})
    return out


def attention_rate(device, dtype, head_dim: int, quick: bool) -> dict:
    import torch
    import torch.nn.functional as Fn

    B, L = (1, 128) if quick else (2, 4096)
    H = max(1, (256 if quick else 4096) // head_dim)
    q, k, v = (torch.randn(B, H, L, head_dim, device=device, dtype=dtype) for _ in range(3))
    t = _timer(device, lambda: Fn.scaled_dot_product_attention(q, k, v, is_causal=True),
               3 if quick else 10, 1 if quick else 3)
    return {"batch": B, "heads": H, "seq": L, "head_dim": head_dim,
            "tflops": 4 * B * H * head_dim * L * (L + 1) / 2 / t / 1e12}


def copy_rate(device, quick: bool) -> float:
    import torch

    n = (8 if quick else 1024) * 2**20
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = _timer(device, lambda: dst.copy_(src), 3 if quick else 20, 1 if quick else 3)
    return 2 * n / t / 1e9


def stream_rate(device, dtype, quick: bool) -> float:
    """Read-bound streaming (GB/s): a 16-row GEMV over a [4096 x 16384] weight
    (the decode step's weight reads), weight bytes / time."""
    import torch

    k, n, rows = (256, 512, 4) if quick else (4096, 16384, 16)
    w = torch.randn(n, k, device=device, dtype=dtype)
    x = torch.randn(rows, k, device=device, dtype=dtype)
    t = _timer(device, lambda: x @ w.t(), 3 if quick else 50, 1 if quick else 5)
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
    t = _timer(device, fn, 3 if quick else 10, 1 if quick else 3)
    return 4 * B * H * d * L * (L + 1) / 2 / t / 1e12


def graph_costs(device, comm, quick: bool) -> dict:
    """Inside a CUDA graph (no host work): the GPU time of one tiny dependent
    kernel (a graph of 100 in-place adds), and of an 8 KB all-reduce over all
    ranks (a graph of 20). Empty on CPU."""
    import torch

    if device.type != "cuda":
        return {}
    x = torch.zeros(2048, device=device)
    out = {}

    def replay_us(body, n: int) -> float:
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            body()
        torch.cuda.current_stream(device).wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            body()
        return 1e6 * _timer(device, g.replay, 3 if quick else 20, 1 if quick else 3) / n

    out["kernel_us"] = round(replay_us(lambda: [x.add_(1) for _ in range(100)], 100), 3)
    if comm.topo.world_size > 1:
        comm.barrier()
        out["graph_latency_us"] = round(
            replay_us(lambda: [comm.all_reduce(x, "world") for _ in range(20)], 20), 3)
    return out


def sustained_matmul(device, dtype, quick: bool) -> float:
    """Matmul rate (TFLOP/s) after the GPU has run GEMMs back to back for ~2 s:
    under its power cap a GPU's clock falls during long runs, which the short
    bursts of :func:`matmul_rates` do not see."""
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
    t = _timer(device, lambda: a @ b, 3 if quick else 500, 0)
    return 2 * m * k * n / t / 1e12


def launch_cost_us(device) -> float:
    """Host time per eager call, as the cost model counts calls: an eager
    decode step of one tiny reference layer (so small that the GPU finishes
    each kernel before the host issues the next one) over the number of host
    calls the cost model counts for it (module calls, views and ops alike)."""
    import torch

    from ..model.reference import KVCache, make_block
    from ..spec import ModelSpec
    from .costmodel import BLOCK_HOST_OPS

    spec = ModelSpec(name="launch-probe", n_layers=1, d_model=64, n_heads=4, head_dim=16,
                     d_ff=128, dtype="fp32")
    with torch.inference_mode():
        block = make_block(spec).to(device)
        cache = KVCache.allocate(1, 4, 16, 16, torch.float32, device)
        x = torch.zeros(1, 1, 64, device=device)
        per_step = _timer(device, lambda: block(x, cache, 8), 200, 20)
    # An eager decode step also enters the cuDNN-free SDPA context: one call more.
    return 1e6 * per_step / (BLOCK_HOST_OPS + 1)


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
            t = _timer(device, fn, iters, 1 if quick else 3, before=comm.barrier)
            out.setdefault(name, []).append([elems * e, t])
    return out


def link_profile(op: str, points: list, n: int) -> dict:
    """Latency (the smallest message's time) and bus bandwidth per size."""
    from .clusters import bus_factor

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
    with torch.inference_mode():
        matmuls = {d: matmul_rates(device, torch_dtype(d), quick) for d in dtypes}
        first = torch_dtype(dtypes[0])
        attn = [attention_rate(device, first, hd, quick) for hd in (128, 512)]
        hbm = copy_rate(device, quick)
        stream = stream_rate(device, first, quick)
        flash = flash_rate(device, first, quick)
        sustained = sustained_matmul(device, first, quick)
        launch_us = launch_cost_us(device)
        comm.barrier()
        graph = graph_costs(device, comm, quick)
        comm.barrier()
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
        "matmul_tflops": {d: round(statistics.median(r["tflops"] for r in rs), 3)
                          for d, rs in matmuls.items()},
        "attention_tflops": {"dtype": dtypes[0],
                             "head_dim<=256": round(attn[0]["tflops"], 3),
                             "head_dim>256": round(attn[1]["tflops"], 3)},
        "hbm_gbps": round(hbm, 2),
        "hbm_bytes": int(mem),
        "l2_bytes": int(l2),
        "launch_us": round(launch_us, 3),
        "stream_gbps": round(stream, 2),
        **({"flash_tflops": round(flash, 3)} if flash else {}),
        **graph,
        "sustained_matmul_tflops": round(sustained, 3),
        "links": ({"nvlink": {op: link_profile(op, pts, world) for op, pts in colls.items()}}
                  if colls else {}),
        "source": {
            "summary": f"calibrated on {name} x{world} by shardwise calibrate, {date}, "
                       f"{git_rev()}" + (" (--quick: small sizes, not for predictions)" if quick else ""),
            "torch": torch.__version__,
            "backend": comm.backend,
        },
        "measurements": {"matmul": matmuls, "attention": attn,
                         "collectives_seconds": colls},
    }


def main(argv: list[str]) -> int:
    """Entry point of one rank: ``python -m shardwise.perf.calibrate JOB.json``
    (the launcher's worker protocol: result on rank 0, traceback on failure)."""
    from ..runtime.worker import rank_main

    def body(job, save):
        import torch.distributed as dist

        profile = measure(job, json.loads(os.environ.get(ENV, "{}")))
        dist.destroy_process_group()
        return None if profile is None else [profile]

    return rank_main(argv, body)


# -- the command ----------------------------------------------------------------------

def calibrate(out: str, nproc: int | None = None, device: str = "auto", quick: bool = False,
              name: str | None = None, dtypes: list[str] | None = None,
              deadline_s: float | None = 1800) -> dict:
    """Launch the calibration on ``nproc`` ranks, write the profile to ``out``
    and return it. Raises ShardwiseError if the profile does not load."""
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
    results = launch(job, deadline_s=deadline_s, module="shardwise.perf.calibrate")
    if not results:
        raise ShardwiseError("calibration returned no profile")
    profile = results[0]
    Cluster.from_dict(profile)  # the cost model must be able to load what we write
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_atomic(out, json.dumps(profile, indent=2) + "\n")
    return profile


def calibrate_command(out: str, nproc: int | None = None, device: str = "auto",
                      quick: bool = False, name: str | None = None) -> str:
    """``shardwise calibrate --out FILE [--nproc N] [--device cpu|cuda] [--quick] [--name NAME]``."""
    p = calibrate(out, nproc, device, quick, name)
    lines = [f"wrote profile {p['name']} to {out}: {p['source']['summary']}",
             "matmul TFLOP/s: " + ", ".join(f"{d} {v:g}" for d, v in p["matmul_tflops"].items()),
             f"attention TFLOP/s: head_dim 128 {p['attention_tflops']['head_dim<=256']:g}, "
             f"head_dim 512 {p['attention_tflops']['head_dim>256']:g}",
             f"device copy {p['hbm_gbps']:g} GB/s, eager launch {p['launch_us']:g} us"]
    for op, c in p["links"].get("nvlink", {}).items():
        lines.append(f"{op}: latency {c['latency_us']:g} us, bus bandwidth "
                     + ", ".join(f"{s / 2**20:g} MiB {b:g} GB/s" for s, b in c["table"]))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
