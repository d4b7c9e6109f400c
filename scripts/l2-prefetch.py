"""Can a decode step hide its all-reduces by reading the next weight matrix
into L2 meanwhile? seed-helix-4l shapes on 2 GPUs (tp=2, batch 16, bf16),
inside a CUDA graph: the o-projection, a one-shot all-reduce, add+norm, the
up- and down-projections, a second all-reduce, add+norm, the next QKV; with
and without a side-stream read of the first P MB of the next weight during
each all-reduce.
Usage: python -m torch.distributed.run --nproc-per-node 2 scripts/l2-prefetch.py
"""
import json
import os

import torch
import torch.distributed as dist
import torch.distributed._symmetric_memory as symm_mem
import torch.nn.functional as F

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dev = torch.device("cuda", rank)
torch.cuda.set_device(dev)
dist.init_process_group("nccl", device_id=dev)
g = dist.group.WORLD.group_name
B, D, Fl, Hd = 16, 4096, 8192, 2048
bf = torch.bfloat16
L = 4
W = [{"qkv": torch.randn(3 * Hd, D, device=dev, dtype=bf) * 0.02,
      "o": torch.randn(D, Hd, device=dev, dtype=bf) * 0.02,
      "up": torch.randn(Fl, D, device=dev, dtype=bf) * 0.02,
      "down": torch.randn(D, Fl, device=dev, dtype=bf) * 0.02} for _ in range(L)]
x = torch.randn(B, D, device=dev, dtype=bf)
att = torch.randn(B, Hd, device=dev, dtype=bf)
buf = symm_mem.empty((B, D), dtype=bf, device=dev)
symm_mem.rendezvous(buf, g)
side = torch.cuda.Stream(dev)
sink = torch.empty(64, device=dev, dtype=torch.float32)


def ar(t, prefetch=None):
    out = torch.empty_like(t)
    if prefetch is not None:
        ev = torch.cuda.Event()
        ev.record()
        side.wait_event(ev)
        with torch.cuda.stream(side):
            torch.sum(prefetch, 0, True, dtype=torch.float32, out=sink[:1])
    torch.ops.symm_mem.one_shot_all_reduce_copy_out(buf, t, "sum", g, out)
    if prefetch is not None:
        torch.cuda.current_stream().wait_stream(side)
    return out


def step(mb):
    n = mb * (1 << 20) // 2
    h = x
    for i in range(L):
        w = W[i]
        q = F.linear(F.layer_norm(h, (D,)), w["qkv"])
        a = ar(F.linear(att + q[:, :Hd], w["o"]), w["up"].view(-1)[:n] if n else None)
        h = h + a
        u = F.gelu(F.linear(F.layer_norm(h, (D,)), w["up"]), approximate="tanh")
        nxt = W[(i + 1) % L]["qkv"].view(-1)[:n] if n else None
        m = ar(F.linear(u, w["down"]), nxt)
        h = h + m
    return h


def graph_ms(mb, iters=50):
    s = torch.cuda.Stream(dev)
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            step(mb)
    torch.cuda.current_stream().wait_stream(s)
    gr = torch.cuda.CUDAGraph()
    with torch.cuda.graph(gr):
        step(mb)
    for _ in range(5):
        gr.replay()
    torch.cuda.synchronize()
    dist.barrier()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(iters):
        gr.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) / iters


res = {"command": "python -m torch.distributed.run --nproc-per-node 2 scripts/l2-prefetch.py",
       "device": torch.cuda.get_device_name(dev), "n_devices": world, "torch": torch.__version__,
       "git_rev": os.environ.get("SHARDWISE_GIT_REV", "")}
for mb in (0, 8, 16, 24, 32, 0):
    res[f"prefetch {mb} MB (ms)"] = graph_ms(mb)
if rank == 0:
    print(json.dumps(res))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "l2-prefetch.json"), "w") as f:
            json.dump(res, f)
dist.destroy_process_group()
