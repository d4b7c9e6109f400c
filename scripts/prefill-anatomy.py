"""Where the wall time of one prefill step goes on one GPU: kernel time by
kind, and the GPU's idle time inside the step (gaps between kernels).

Profiles the reference model (what tp_pp:1x1 runs) on seed-helix-4l
dimensions in bf16, with its static KV cache, after warm-up.
Usage: python scripts/prefill-anatomy.py [--batch 8 --seq 8192]
"""
import argparse
import statistics

import torch
from torch.profiler import ProfilerActivity, profile

from shardwise.model import WeightSource, build_reference, make_inputs
from shardwise.presets import get_preset

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--seq", type=int, default=8192)
args = ap.parse_args()
dev = torch.device("cuda")
spec = get_preset("seed-helix-4l").model.replace(dtype="bf16")
model = build_reference(WeightSource(spec, 0), torch.bfloat16, dev)
flops = None


def kind(name: str) -> str:
    n = name.lower()
    for key, label in [("gemm", "gemm"), ("cutlass", "gemm"), ("sm90", "gemm"), ("nvjet", "gemm"),
                       ("attn", "attention"), ("fmha", "attention"), ("flash", "attention"),
                       ("layer_norm", "layernorm"), ("gelu", "gelu"), ("copy", "copy"),
                       ("add", "add"), ("fill", "fill")]:
        if key in n:
            return label
    return "other"


with torch.inference_mode():
    x, _ = make_inputs(spec, args.batch, args.seq, 0, 0, torch.bfloat16, dev)
    caches = model.allocate_caches(args.batch, args.seq)
    for _ in range(3):
        model(x, caches, 0)
    torch.cuda.synchronize()
    for label, fn in [("with KV cache", lambda: model(x, caches, 0)), ("no KV cache", lambda: model(x))]:
        times = []
        for _ in range(5):
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e))
        print(f"prefill {args.batch}x{args.seq} {label}: median {statistics.median(times):.2f} ms "
              f"(min {min(times):.2f})")
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        model(x, caches, 0)
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type.name == "CUDA"),
                     key=lambda e: e.time_range.start)
    t0, t1 = kernels[0].time_range.start, max(k.time_range.end for k in kernels)
    busy, gaps, end = 0.0, [], t0
    by_kind: dict = {}
    for k in kernels:
        a, b = k.time_range.start, k.time_range.end
        by_kind[kind(k.name)] = by_kind.get(kind(k.name), 0.0) + (b - a)
        if a > end:
            gaps.append((a - end, k.name))
        busy += max(0, b - max(a, end))
        end = max(end, b)
    span = (t1 - t0) / 1e3
    print(f"profiled step: first to last kernel {span:.2f} ms, GPU busy {busy / 1e3:.2f} ms, "
          f"idle {span - busy / 1e3:.2f} ms in {len(gaps)} gaps, {len(kernels)} kernels")
    for name, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {name:10s} {us / 1e3:8.2f} ms")
    print("largest gaps (us, next kernel):")
    for g, name in sorted(gaps, reverse=True)[:8]:
        print(f"  {g:8.1f}  {name[:90]}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
