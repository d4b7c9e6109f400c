"""Decode-step GEMMs (16 rows) on one GPU: cuBLAS against a Triton kernel
that spreads the weight stream over more blocks, on seed-helix-4l's shapes
at TP=1 and TP=2; and, for prefill (65536 rows), the residual add in the
GEMM's epilogue (in-place addmm) against a GEMM then a separate add.
Each decode GEMM cycles through enough weight copies that none is in L2.
Usage: python scripts/skinny-gemm.py   (prints one JSON line)
"""
import json
import os
import statistics

import torch
import triton
import triton.language as tl

dev = torch.device("cuda")
dt = torch.bfloat16


@triton.autotune(
    configs=[triton.Config({"BN": bn, "BK": bk, "SPLIT": sp}, num_warps=w, num_stages=s)
             for bn in (16, 32, 64) for bk in (128, 256) for sp in (1, 2, 4)
             for w in (4,) for s in (3, 5)],
    key=["M", "N", "K"], reset_to_zero=["Y32"])
@triton.jit
def skinny_kernel(X, W, Y32, M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                  SPLIT: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    k_per = tl.cdiv(K, SPLIT * BK) * BK
    k0 = pid_k * k_per
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(k0, k0 + k_per, BK):
        rk = k + tl.arange(0, BK)
        x = tl.load(X + rm[:, None] * K + rk[None, :], mask=(rm[:, None] < M) & (rk[None, :] < K),
                    other=0.0)
        w = tl.load(W + rn[:, None] * K + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < K),
                    other=0.0)
        acc += tl.dot(x, tl.trans(w))
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT == 1:
        tl.store(Y32 + rm[:, None] * N + rn[None, :], acc, mask=mask)
    else:
        tl.atomic_add(Y32 + rm[:, None] * N + rn[None, :], acc, mask=mask)


def skinny(x, w, y32):
    M, K = x.shape
    N = w.shape[0]
    grid = lambda meta: (triton.cdiv(N, meta["BN"]), meta["SPLIT"])
    skinny_kernel[grid](x, w, y32, M, N, K, BM=16)
    return y32


def timed(fn, iters=50, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = []
    for _ in range(5):
        s.record()
        for _ in range(iters):
            fn()
        e.record()
        torch.cuda.synchronize()
        out.append(s.elapsed_time(e) * 1e3 / iters)
    return statistics.median(out)


res = {"command": "python scripts/skinny-gemm.py", "device": torch.cuda.get_device_name(dev),
       "torch": torch.__version__, "triton": triton.__version__,
       "git_rev": os.environ.get("SHARDWISE_GIT_REV", ""), "decode": [], "prefill": []}
M = 16
shapes = {"tp1": {"qkv": (12288, 4096), "wo": (4096, 4096), "up": (16384, 4096), "down": (4096, 16384)},
          "tp2": {"qkv": (6144, 4096), "wo": (4096, 2048), "up": (8192, 4096), "down": (4096, 8192)}}
for tp, d in shapes.items():
    for name, (N, K) in d.items():
        copies = max(2, int(8 * 2**30 // (N * K * 2) // 16))  # >= 512 MB of weights
        ws = [torch.randn(N, K, device=dev, dtype=dt) / K**0.5 for _ in range(copies)]
        x = torch.randn(M, K, device=dev, dtype=dt)
        y32 = torch.zeros(M, N, device=dev, dtype=torch.float32)
        it = iter(range(10**9))
        ref = (x.float() @ ws[0].float().t())
        err = ((skinny(x, ws[0], y32.zero_()) - ref).norm() / ref.norm()).item()
        t_cublas = timed(lambda: x @ ws[next(it) % copies].t())
        t_triton = timed(lambda: skinny(x, ws[next(it) % copies], y32))
        cfg = skinny_kernel.best_config
        gb = N * K * 2 / 1e9
        res["decode"].append({"tp": tp, "gemm": name, "N": N, "K": K, "cublas_us": t_cublas,
                              "triton_us": t_triton, "cublas_TBps": gb / t_cublas * 1e3,
                              "triton_TBps": gb / t_triton * 1e3, "rel_err": err,
                              "config": str(cfg)})
        print(json.dumps(res["decode"][-1]), flush=True)
        del ws
# Prefill: the residual in the GEMM's epilogue against mm + add (65536 rows).
T = 65536
for name, (N, K) in {"wo": (4096, 4096), "down": (4096, 16384), "wo_tp2": (4096, 2048),
                     "down_tp2": (4096, 8192)}.items():
    a = torch.randn(T, K, device=dev, dtype=dt)
    w = torch.randn(N, K, device=dev, dtype=dt) / K**0.5
    r = torch.randn(T, N, device=dev, dtype=dt)
    h = r.clone()
    t_mm = timed(lambda: a @ w.t(), 10, 2)
    t_mm_add = timed(lambda: torch.add(r, a @ w.t()), 10, 2)
    t_addmm_ = timed(lambda: h.addmm_(a, w.t()), 10, 2)
    t_addmm = timed(lambda: torch.addmm(r, a, w.t()), 10, 2)
    res["prefill"].append({"gemm": name, "N": N, "K": K, "mm_us": t_mm, "mm_then_add_us": t_mm_add,
                           "addmm_inplace_us": t_addmm_, "addmm_us": t_addmm})
    print(json.dumps(res["prefill"][-1]), flush=True)
out = os.environ.get("OUT")
if out:
    with open(os.path.join(out, "skinny-gemm.json"), "w") as f:
        json.dump(res, f)
