"""What kernels and collectives cost replayed from a CUDA graph, as calibrate
measures it: no host work, so each figure is the GPU's own time (a tiny
kernel, the smallest GEMM and decode attention, each kind of kernel a static
decode layer launches at several widths, one layer of the layer probe, and
each collective at 8 KB). The cost model's graph decode steps read them
(:mod:`.costs`).
"""
from __future__ import annotations

import sys

from ..runtime.hostprobe import device_timer, probe_stack


def graph_costs(device, comm, quick: bool) -> dict:
    """Inside a CUDA graph (no host work): the GPU time of one tiny dependent
    kernel (a graph of 100 in-place adds), of the smallest GEMM and decode
    attention, of one layer of the layer probe's decode step
    (``graph_layer_us``), and of an 8 KB all-reduce over all ranks (a graph
    of 20; ``graph_latency_us``) and of each other collective kind
    (``graph_collective_us``). Empty on CPU."""
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
        return 1e6 * device_timer(device, g.replay, 3 if quick else 20, 1 if quick else 3) / n

    out["kernel_us"] = round(replay_us(lambda: [x.add_(1) for _ in range(100)], 100), 3)
    # The smallest GEMM and decode attention a small model's step runs (16
    # tokens of width 512; 8 heads of 64 over 128 keys): their kernels take
    # longer than a tiny add however little they compute.
    from ..model.reference import causal_attention

    a = torch.randn(16, 512, device=device, dtype=torch.bfloat16)
    w = torch.randn(512, 512, device=device, dtype=torch.bfloat16)
    y = torch.empty(16, 512, device=device, dtype=torch.bfloat16)
    q = torch.randn(4, 8, 1, 64, device=device, dtype=torch.bfloat16)
    kv = torch.randn(4, 8, 128, 64, device=device, dtype=torch.bfloat16)
    out["gemm_kernel_us"] = round(replay_us(lambda: [torch.mm(a, w, out=y) for _ in range(20)],
                                            20), 3)
    out["attn_kernel_us"] = round(replay_us(
        lambda: [causal_attention(q, kv, kv, 127) for _ in range(20)], 20), 3)
    # A whole decode layer in a graph: the layer probe's static step, whose
    # kernels (norms, GEMMs, the KV write, attention) follow one another as
    # in a model's step, unlike the repeated single kernels above. A
    # diagnostic the cost model does not read: on 2x H200 it came out below
    # the sum of the single-kernel figures (18.2 us against 21.6), while a
    # 512-wide layer's kernels take longer than they (docs/costmodel.md).
    try:
        step, layers = probe_stack(device, static=True)
        out["graph_layer_us"] = round(replay_us(step, layers), 3)
    except RuntimeError as e:  # an optional figure: the profile goes on without it
        print(f"calibrate: graph layer probe skipped ({str(e).splitlines()[0]})", file=sys.stderr)
    try:
        out["decode_kernels_us"] = decode_kernel_costs(device, replay_us)
    except RuntimeError as e:  # an optional figure: the profile goes on without it
        print(f"calibrate: decode kernel probes skipped ({str(e).splitlines()[0]})",
              file=sys.stderr)
    if comm.topo.world_size > 1:
        comm.barrier()
        out["graph_latency_us"] = round(
            replay_us(lambda: [comm.all_reduce(x, "world") for _ in range(20)], 20), 3)
        # The other collectives a graph holds (helix's reduce-scatter and
        # all-gather, ring's all-gather, ep's static exchange), 8 KB each.
        calls = {"reduce_scatter": lambda: comm.reduce_scatter(x, "world"),
                 "all_gather": lambda: comm.all_gather(x, "world"),
                 "all_to_all": lambda: comm.all_to_all(x, "world")}
        out["graph_collective_us"] = {"all_reduce": out["graph_latency_us"]}
        for op, call in calls.items():
            comm.barrier()
            out["graph_collective_us"][op] = round(
                replay_us(lambda: [call() for _ in range(20)], 20), 3)
    return out


# Widths of the decode kernel probes: a small model's (small-l2's 512) and
# wider ones, up to seed-helix-4l's 4096.
DECODE_PROBE_WIDTHS = (512, 1024, 2048, 4096)


def decode_kernel_costs(device, replay_us) -> dict:
    """GPU time (us) of each kind of kernel a static decode layer launches,
    replayed in a CUDA graph 20 times over with the operands a layer gives
    it, at each of :data:`DECODE_PROBE_WIDTHS` (16 rows, bf16): the fused
    add + norm (``norm``), the packed KV cache write at a device-tensor
    position inside one step, as a layer makes it (``cache_write``: D / 64
    heads of 64, 256 positions; the cache slots are built once a step), and
    GEMMs of the layer's shapes (``gemm``: D x 3D, D x D, D x 4D, 4D x D) with
    20 weights in turn, so that each reads its own. The cost model's graph
    decode reads them (Cluster.decode_gemm_s and the others): a 512-wide
    layer's kernels take 0.5 to 3 us longer than ``kernel_us`` and
    ``gemm_kernel_us`` say. ``layer``: one layer of a static decode step of
    a reference stack of that width (16 sequences, the tanh GELU), from
    stacks of 2 and 4 layers, a check on the sum of the kernels."""
    import torch
    from torch import nn

    from ..model import kernels
    from ..model.reference import KVCache, one_step

    bf16, out = torch.bfloat16, {"norm": {}, "cache_write": {}, "gemm": {}, "layer": {}}
    pos = torch.tensor(100, device=device)

    for D in DECODE_PROBE_WIDTHS:
        x = torch.randn(16, D, device=device, dtype=bf16)
        a = torch.randn(16, D, device=device, dtype=bf16)
        norm = nn.LayerNorm(D).to(device, bf16)
        out["norm"][D] = round(replay_us(
            lambda: [kernels.add_norm(norm, x, a) for _ in range(20)], 20), 3)
        heads = D // 64
        cache = KVCache.allocate(16, heads, 256, 64, bf16, device)
        kv = torch.randn(16, 1, 2 * heads * 64, device=device, dtype=bf16)
        with one_step(pos):  # the cache slots made once, outside the graph, as a step does
            cache.write_packed(pos, kv)
            out["cache_write"][D] = round(replay_us(
                lambda: [cache.write_packed(pos, kv) for _ in range(20)], 20), 3)
        for k, n in ((D, 3 * D), (D, D), (D, 4 * D), (4 * D, D)):
            ws = [torch.randn(k, n, device=device, dtype=bf16) for _ in range(20)]
            xs = torch.randn(16, k, device=device, dtype=bf16)
            ys = torch.empty(16, n, device=device, dtype=bf16)
            out["gemm"][f"{k}x{n}"] = round(replay_us(
                lambda: [torch.mm(xs, w, out=ys) for w in ws], 20), 3)
            del ws
        steps = {n: _decode_stack(device, D, n) for n in (2, 4)}
        out["layer"][D] = round((replay_us(steps[4], 1) - replay_us(steps[2], 1)) / 2, 3)
        del steps
    return out


def _decode_stack(device, width: int, layers: int):
    """One static decode step (16 sequences at a device-tensor position over
    a cache of 256) of a reference stack of ``layers`` layers of ``width``
    (heads of 64, d_ff 4 x width, the tanh GELU, bf16)."""
    import torch

    from ..model.reference import Transformer, one_step
    from ..spec import ModelSpec

    spec = ModelSpec(name="decode-probe", n_layers=layers, d_model=width, n_heads=width // 64,
                     head_dim=64, d_ff=4 * width, dtype="bf16", activation="gelu_tanh")
    model = Transformer(spec).to(device, torch.bfloat16)
    caches = model.allocate_caches(16, 256)
    x = torch.zeros(16, 1, width, device=device, dtype=torch.bfloat16)
    pos = torch.tensor(100, device=device)

    def step():
        with one_step(pos):
            model(x, caches, pos)

    return step
