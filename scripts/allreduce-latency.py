"""Latency of a small all-reduce (a decode step's, 16 x 4096 bf16) inside a
CUDA graph: NCCL against symmetric-memory one-shot all-reduce.
Usage: python -m torch.distributed.run --nproc-per-node 2 scripts/allreduce-latency.py
"""
import os

import torch
import torch.distributed as dist
import torch.distributed._symmetric_memory as symm_mem

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dev = torch.device("cuda", rank)
torch.cuda.set_device(dev)
dist.init_process_group("nccl", device_id=dev)
group = dist.group.WORLD
x = torch.full((16, 4096), float(rank + 1), device=dev, dtype=torch.bfloat16)
results = {}


def graph_time(fn, reps=20, iters=50):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    for _ in range(3):
        g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    dist.barrier()
    a.record()
    for _ in range(iters):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / iters / reps


def nccl():
    y = x.clone()
    dist.all_reduce(y, group=group)
    return y


results["nccl in graph (us)"] = graph_time(nccl)
try:
    buf = symm_mem.empty(x.shape, dtype=torch.bfloat16, device=dev)  # the op wants input's size
    symm_mem.rendezvous(buf, group.group_name)
    y = torch.ops.symm_mem.one_shot_all_reduce_copy(buf, x, "sum", group.group_name)
    results["one_shot result ok"] = bool((y == 3).all()) and tuple(y.shape) == tuple(x.shape)
    results["one_shot in graph (us)"] = graph_time(
        lambda: torch.ops.symm_mem.one_shot_all_reduce_copy(buf, x, "sum", group.group_name))
    out = torch.empty_like(x)
    results["one_shot_out in graph (us)"] = graph_time(
        lambda: torch.ops.symm_mem.one_shot_all_reduce_copy_out(buf, x, "sum", group.group_name, out))
    results["one_shot_out ok"] = bool((out == 3).all())
except Exception as e:  # report, do not hide
    results["symm_mem error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
if rank == 0:
    for k, v in results.items():
        print(f"{k}: {v:.2f}" if isinstance(v, float) else f"{k}: {v}")
dist.destroy_process_group()
