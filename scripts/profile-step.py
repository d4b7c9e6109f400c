"""Where the time of one prefill and one decode step goes on one GPU.

Profiles the reference model (what tp_pp:1x1 runs) on seed-helix-4l
dimensions in bf16 and prints the kernels by GPU time, then times the SDPA
backends on the prefill and decode attention shapes.
Usage: python scripts/profile-step.py [--batch 8 --seq 8192 --dbatch 16 --ctx 4096]
"""
import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile

from shardwise.model import WeightSource, build_reference, make_inputs
from shardwise.presets import get_preset

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--seq", type=int, default=8192)
ap.add_argument("--dbatch", type=int, default=16)
ap.add_argument("--ctx", type=int, default=4096)
args = ap.parse_args()
dev = torch.device("cuda")
spec = get_preset("seed-helix-4l").model.replace(dtype="bf16")
model = build_reference(WeightSource(spec, 0), torch.bfloat16, dev)


def bench(fn, iters=10):
    for _ in range(3):
        fn()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    torch.cuda.synchronize()
    return s.elapsed_time(e) / iters


with torch.inference_mode():
    x, _ = make_inputs(spec, args.batch, args.seq, 0, 0, torch.bfloat16, dev)
    print(f"prefill {args.batch}x{args.seq}: {bench(lambda: model(x), 5):.2f} ms")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(x)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))
    B, H, L, d = args.batch, spec.n_heads, args.seq, spec.head_dim
    q, k, v = (torch.randn(B, L, H, d, device=dev, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    fl = 4 * B * H * d * L * (L + 1) / 2
    for name, be in [("default", None), ("flash", SDPBackend.FLASH_ATTENTION),
                     ("cudnn", SDPBackend.CUDNN_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
        try:
            if be is None:
                t = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
            else:
                with sdpa_kernel([be]):
                    t = bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
            print(f"causal SDPA {name:9s} {t:.3f} ms  {fl / t / 1e9:.0f} TFLOP/s")
        except RuntimeError as e:
            print(f"causal SDPA {name:9s} unavailable: {str(e).splitlines()[0][:80]}")
    # decode attention over a static cache
    Bd, S = args.dbatch, args.ctx + 64
    qd = torch.randn(Bd, H, 1, d, device=dev, dtype=torch.bfloat16)
    kc, vc = (torch.randn(Bd, H, S, d, device=dev, dtype=torch.bfloat16) for _ in range(2))
    pos = torch.tensor(args.ctx, device=dev)
    mask = torch.arange(S, device=dev)[None, :] <= pos
    kv_bytes = 2 * Bd * H * args.ctx * d * 2
    for name, fn in [
        ("masked full cache", lambda: F.scaled_dot_product_attention(qd, kc, vc, attn_mask=mask)),
        ("slice [:ctx] (int)", lambda: F.scaled_dot_product_attention(qd, kc[:, :, :args.ctx], vc[:, :, :args.ctx])),
    ]:
        t = bench(fn, 50)
        print(f"decode attention {name:20s} {t * 1e3:.1f} us  {kv_bytes / t / 1e6:.0f} GB/s of KV")
    for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
        with sdpa_kernel([be]):
            try:
                t = bench(lambda: F.scaled_dot_product_attention(qd, kc[:, :, :args.ctx], vc[:, :, :args.ctx]), 50)
                print(f"decode attention slice {be.name:20s} {t * 1e3:.1f} us  {kv_bytes / t / 1e6:.0f} GB/s")
            except RuntimeError as e:
                print(be.name, "unavailable")
    caches = model.allocate_caches(Bd, S)
    xd, steps = make_inputs(spec, Bd, args.ctx, 1, 0, torch.bfloat16, dev)
    model(xd, caches, 0)
    tok = steps[0]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(tok, caches, pos)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))
