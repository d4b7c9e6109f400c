"""The host side of eager work, as calibrate measures it: per call of each
kind (:func:`host_costs`), and an eager decode step of the layer probe
(:mod:`shardwise.runtime.hostprobe`: :func:`launch_cost_us`, timed back to
back and as ``shardwise bench`` times a step), each rank's figures gathered
and the slowest kept (:func:`slowest_rank`).
"""
from __future__ import annotations

import statistics
import time

from ..runtime.hostprobe import device_timer, host_timer, probe_stack


def launch_cost_us(device, comm=None, quick: bool = False) -> dict:
    """An eager decode step of a small reference stack (8 tiny layers, so small
    that the device finishes each kernel before the host issues the next one),
    timed two ways:

    * back to back (``hot``): steps in a row, as the per-call figures are;
    * the way ``shardwise bench`` times a step (``cold``): a barrier and a
      device synchronisation, then the step and a synchronisation, less the
      same bracket around nothing; the host starts each step from a wait.

    The two alternate, 20 steps each in 10 rounds (the host's speed drifts),
    and each figure is the median over the rounds.

    Returns the hot step's time per layer (``layer_probe_us``) and per call
    of every kind alike (``launch_us``, what profiles without the per-kind
    figures use), cold over hot (``step_host_ratio``), and the calls of one
    layer as :class:`CallCounter` counts them."""
    import torch

    from .counting import CallCounter

    with torch.inference_mode():
        step, layers = probe_stack(device)
        device_timer(device, step, 5 if quick else 20, 0)  # warm-up
        with CallCounter() as c8:
            step()
        one, _ = probe_stack(device, 1)
        with CallCounter() as c1:
            one()

        def bracketed(fn) -> float:
            if comm is not None:
                comm.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - t0

        # The host's speed drifts over seconds (by half on 2x H200), so hot and
        # cold are timed in alternating rounds and compared round by round.
        rounds, n = (2, 10) if quick else (10, 20)
        hots, ratios = [], []
        for _ in range(rounds):
            hot = device_timer(device, step, n, 0)
            cold = statistics.median(bracketed(step) for _ in range(n))
            empty = statistics.median(bracketed(lambda: None) for _ in range(n))
            hots.append(hot)
            ratios.append((cold - empty) / hot if hot > 0 else 1.0)
    per_layer = {k: (c8.counts[k] - c1.counts[k]) / (layers - 1) for k in c8.counts}
    calls = per_layer["kernels"] + per_layer["metas"] + per_layer["modules"]
    hot_layer = statistics.median(hots) / layers
    return {"layer_probe_us": 1e6 * hot_layer, "launch_us": 1e6 * hot_layer / max(calls, 1),
            "step_host_ratio": max(1.0, statistics.median(ratios)), "calls": per_layer}


def host_costs(device, comm, quick: bool) -> dict:
    """The host side of eager work on this rank, in us per call (the cost
    model's ``op_us``, ``view_us``, ``module_us``, ``sync_us`` and
    ``collective_us``), each timed back to back on tiny tensors:

    * op_us: ops that launch a kernel, called from Python through the
      dispatcher (add, linear, layer_norm, gelu, copy_, cat: the mean);
    * view_us: ops that launch none (view, transpose, slice, reshape of a
      contiguous tensor, empty_like: the mean);
    * module_us: an nn.Module call beyond its forward (nn.Identity called,
      less the bare function);
    * sync_us: a device-to-host read (``.item()``) with the device idle;
    * collective_us: one call of each collective through Comm (as the
      strategies call them) on a tiny tensor, every rank calling at once;
      ``p2p``: one batched send/receive (an exchange with the ring neighbours).
    """
    import torch
    import torch.nn.functional as Fn

    iters, warm = (50, 5) if quick else (2000, 200)
    x = torch.randn(8, 64, device=device)
    w = torch.randn(64, 64, device=device)
    y = torch.empty_like(x)
    launching = [lambda: torch.add(x, x), lambda: Fn.linear(x, w),
                 lambda: Fn.layer_norm(x, (64,)), lambda: Fn.gelu(x), lambda: y.copy_(x),
                 lambda: torch.cat([x, x])]
    metas = [lambda: x.view(-1), lambda: x.transpose(0, 1), lambda: x[1:],
             lambda: x.reshape(4, 128), lambda: torch.empty_like(x)]
    op = statistics.mean(host_timer(device, f, iters, warm) for f in launching)
    # The kinds whose calls cost the host more (cuBLASLt's heuristics and
    # workspace, SDPA's backend choice and cuDNN's plan cache), in the
    # precision a GPU runs (bf16; fp32 on CPU), as the reference calls them.
    from ..model.reference import causal_attention

    half = torch.bfloat16 if device.type == "cuda" else torch.float32
    xh, wh = x.to(half), w.to(half)
    q, kv = torch.randn(1, 4, 16, 16, device=device, dtype=half), torch.randn(
        1, 4, 17, 16, device=device, dtype=half)
    gemm = host_timer(device, lambda: Fn.linear(xh, wh), iters, warm)
    from ..model.kernels import add_norm

    ln = torch.nn.LayerNorm(64, device=device, dtype=half)
    norm = host_timer(device, lambda: add_norm(ln, xh, xh), iters, warm)
    attn_prefill = host_timer(device, lambda: causal_attention(q, q, q, 0), iters, warm)
    attn_decode = host_timer(device, lambda: causal_attention(q[:, :, :1], kv, kv, 16),
                              iters, warm)
    view = statistics.mean(host_timer(device, f, iters, warm) for f in metas)
    ident = torch.nn.Identity()
    bare = lambda t: t  # noqa: E731
    module = max(0.0, host_timer(device, lambda: ident(x), iters, warm)
                 - host_timer(device, lambda: bare(x), iters, warm))
    t = torch.zeros((), device=device)
    sync = _timer_each(device, t.item, iters // 10 or 5)
    out = {"op_us": op, "view_us": view, "module_us": module, "sync_us": sync,
           "gemm_us": gemm, "attn_prefill_us": attn_prefill, "attn_decode_us": attn_decode,
           "norm_us": norm}
    colls = {}
    n = comm.topo.world_size
    if n > 1:
        rank = comm.topo.rank
        small = torch.ones(8 * n, device=device)
        part = torch.ones(8, device=device)
        recv = torch.empty_like(small)
        nxt, prv = (rank + 1) % n, (rank - 1) % n

        def p2p():
            for req in comm.exchange([(small, nxt)], [(recv, prv)], "world"):
                req.wait()

        ops = {"all_reduce": lambda: comm.all_reduce(small, "world"),
               "all_gather": lambda: comm.all_gather(part, "world"),
               "reduce_scatter": lambda: comm.reduce_scatter(small, "world"),
               "all_to_all": lambda: comm.all_to_all(small, "world"), "p2p": p2p}
        c_iters = 20 if quick else 200
        for name, fn in ops.items():
            comm.barrier()
            colls[name] = 1e6 * host_timer(device, fn, c_iters, 5)
    return {**{k: 1e6 * v for k, v in out.items()}, "collective_us": colls}


def _timer_each(device, fn, iters: int) -> float:
    """Mean seconds of ``fn()`` called ``iters`` times, the device idle at each."""
    import torch

    fn()
    total = 0.0
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        total += time.perf_counter() - t0
    return total / iters


def slowest_rank(values: dict, device) -> tuple[dict, dict]:
    """Every rank's host figures -> (the largest of each, all ranks' values):
    a step waits for its slowest rank."""
    from ..parallel.comm import gather_floats

    keys = ["op_us", "view_us", "module_us", "sync_us", "launch_us", "layer_probe_us",
            "step_host_ratio", "gemm_us", "attn_prefill_us", "attn_decode_us", "norm_us"]
    ckeys = sorted(values.get("collective_us", {}))
    mine = [float(values[k]) for k in keys] + [float(values["collective_us"][k]) for k in ckeys]
    rows = gather_floats(mine, device)
    worst = {k: max(r[i] for r in rows) for i, k in enumerate(keys)}
    worst["collective_us"] = {k: max(r[len(keys) + i] for r in rows) for i, k in enumerate(ckeys)}
    per_rank = {k: [round(r[i], 3) for r in rows] for i, k in enumerate(keys)}
    per_rank["collective_us"] = {k: [round(r[len(keys) + i], 3) for r in rows]
                                 for i, k in enumerate(ckeys)}
    return worst, per_rank


