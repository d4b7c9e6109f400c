"""Prefill of the reference model on one GPU under variants that keep its
arithmetic (or say where they change it), to find what moves MFU.

Usage: python scripts/prefill-variants.py [--batch 8 --seq 8192]
"""
import argparse
import time

import torch
import torch.nn.functional as F

from shardwise.bench import metrics
from shardwise.model import WeightSource, build_reference, make_inputs
from shardwise.presets import get_preset

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--seq", type=int, default=8192)
ap.add_argument("--compile", action="store_true")
args = ap.parse_args()
dev = torch.device("cuda")
spec = get_preset("seed-helix-4l").model.replace(dtype="bf16")
flops = metrics.prefill_flops(spec, args.batch, args.seq)


def events(fn, iters):
    s = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    e = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        s[i].record()
        fn()
        e[i].record()
    torch.cuda.synchronize()
    return sorted(a.elapsed_time(b) for a, b in zip(s, e))


n = 8192
a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
for label, iters in (("burst (10)", 10), ("sustained (300)", 300)):
    events(lambda: a @ b, 3)
    t = events(lambda: a @ b, iters)
    print(f"matmul 8192^3 {label}: median {2 * n**3 / (t[len(t) // 2] / 1e3) / 1e12:.0f} TFLOP/s, "
          f"last-10 {2 * n**3 / (sum(t[-10:]) / 10 / 1e3) / 1e12:.0f}")
del a, b

model = build_reference(WeightSource(spec, 0), torch.bfloat16, dev)
with torch.inference_mode():
    x, _ = make_inputs(spec, args.batch, args.seq, 0, 0, torch.bfloat16, dev)

    def report(label, fn, iters=8):
        for _ in range(2):
            fn()
        t = events(fn, iters)
        med = t[len(t) // 2]
        print(f"{label:40s} {med:8.2f} ms  MFU@799 {flops / (med / 1e3) / 799e12:.3f}")

    report("eager reference", lambda: model(x))
    # Per-op timing inside one forward: where do the ms go?
    blk = model.layers[0]
    h = blk.attn_norm(x)
    report("  layer0 attn_norm", lambda: blk.attn_norm(x), 5)
    report("  layer0 attn", lambda: blk.attn(h, None, 0), 5)
    report("  layer0 mlp", lambda: blk.mlp(h), 5)
    report("  layer0 whole block", lambda: blk(x, None, 0), 5)
    w_in, w_down = blk.mlp.w_in.weight, blk.mlp.w_down.weight
    zero = torch.zeros(w_in.shape[0], device=dev, dtype=torch.bfloat16)
    x2 = h.view(-1, h.shape[-1])
    report("  mlp: w_in only", lambda: x2 @ w_in.t(), 5)
    report("  mlp: gelu (exact) only", lambda: F.gelu(x2 @ w_in.t()), 5)
    report("  mlp: addmm+gelu(tanh) epilogue", lambda: torch._addmm_activation(zero, x2, w_in.t(), use_gelu=True), 5)
    if args.compile:
        t0 = time.time()
        cmodel = torch.compile(model, dynamic=False)
        cmodel(x)
        print(f"compile: {time.time() - t0:.0f} s")
        report("torch.compile(model)", lambda: cmodel(x))
        ref = model(x)
        got = cmodel(x)
        print("compiled rel err", float((got.float() - ref.float()).norm() / ref.float().norm()))
