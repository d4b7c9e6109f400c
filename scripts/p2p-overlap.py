"""Does a copy-engine pull from a peer's symmetric buffer slow a GEMM running
beside it, and how does that compare with an NCCL all-reduce beside it?
Prefill shapes of seed-helix-4l on 2 GPUs (32768 tokens a rank, bf16).
Usage: python -m torch.distributed.run --nproc-per-node 2 scripts/p2p-overlap.py
"""
import json
import os

import torch
import torch.distributed as dist
import torch.distributed._symmetric_memory as symm_mem

rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dev = torch.device("cuda", rank)
torch.cuda.set_device(dev)
dist.init_process_group("nccl", device_id=dev)
group = dist.group.WORLD
M, D, N = 32768, 4096, 6144
a = torch.randn(M, D, device=dev, dtype=torch.bfloat16)
w = torch.randn(N, D, device=dev, dtype=torch.bfloat16)
side = torch.cuda.Stream(dev)
res = {"command": "python -m torch.distributed.run --nproc-per-node 2 scripts/p2p-overlap.py",
       "device": torch.cuda.get_device_name(dev), "n_devices": world, "torch": torch.__version__,
       "git_rev": os.environ.get("SHARDWISE_GIT_REV", "")}


def timed(fn, iters=10):
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / iters


res["gemm_ms"] = timed(lambda: a @ w.t())
buf = symm_mem.empty((2, M, D), dtype=torch.bfloat16, device=dev)
hdl = symm_mem.rendezvous(buf, group.group_name)
buf.fill_(rank + 1)
peer = 1 - rank
remote = hdl.get_buffer(peer, (M, D), torch.bfloat16, 0)
dst = torch.empty(M, D, device=dev, dtype=torch.bfloat16)
hdl.barrier(channel=0)
dst.copy_(remote)
torch.cuda.synchronize()
res["pull_ok"] = bool((dst == peer + 1).all())
res["barrier_us"] = 1e3 * timed(lambda: hdl.barrier(channel=0), 50)
res["pull_ms"] = timed(lambda: dst.copy_(remote))
res["pull_GBps"] = dst.nbytes / res["pull_ms"] / 1e6
big = torch.randn(M, D, device=dev, dtype=torch.bfloat16)
res["allreduce_ms"] = timed(lambda: dist.all_reduce(big))


def gemm_with(other):
    def fn():
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            other()
        for _ in range(3):
            a @ w.t()
        torch.cuda.current_stream().wait_stream(side)
    return fn


res["3gemm_ms"] = timed(lambda: [a @ w.t() for _ in range(3)])
res["3gemm_with_pull_ms"] = timed(gemm_with(lambda: dst.copy_(remote)))
res["3gemm_with_allreduce_ms"] = timed(gemm_with(lambda: dist.all_reduce(big)))
if rank == 0:
    print(json.dumps(res))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "p2p-overlap.json"), "w") as f:
            json.dump(res, f)
dist.destroy_process_group()
