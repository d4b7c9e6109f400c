"""Decode-step GEMMs (16 rows) of seed-helix-4l: bandwidth of the weight
read for each layout and BLAS library, against the copy bandwidth.
Usage: python scripts/gemv-layouts.py
"""
import torch

dev = torch.device("cuda")
M = 16
shapes = {"qkv": (4096, 12288), "wo": (4096, 4096), "up": (4096, 16384), "down": (16384, 4096)}


def t(fn, iters=200):
    for _ in range(10):
        fn()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(20):
            fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters // 20):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters * 1e3  # us


src = torch.empty(2**29, device=dev, dtype=torch.bfloat16)
dst = torch.empty_like(src)
cp = t(lambda: dst.copy_(src), 20)
print(f"copy: {2 * src.nbytes / cp / 1e3:.0f} GB/s")
for lib in ("cublas", "cublaslt"):
    torch.backends.cuda.preferred_blas_library(lib)
    for name, (K, N) in shapes.items():
        x = torch.randn(M, K, device=dev, dtype=torch.bfloat16)
        w = torch.randn(N, K, device=dev, dtype=torch.bfloat16)  # nn.Linear layout
        wt = w.t().contiguous()  # [K, N]
        tn = t(lambda: x @ w.t())
        nn_ = t(lambda: x @ wt)
        print(f"{lib:8s} {name:5s} [{M}x{K}]x[{K}x{N}]: weight [N,K] {tn:6.1f} us "
              f"{w.nbytes / tn / 1e3:5.0f} GB/s | weight [K,N] {nn_:6.1f} us {w.nbytes / nn_ / 1e3:5.0f} GB/s")
torch.backends.cuda.preferred_blas_library("cublas")
