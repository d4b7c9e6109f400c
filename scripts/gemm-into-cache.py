"""Can the prompt's K/V projection be one strided-batched GEMM written
straight into the token-major cache (instead of one GEMM per sequence)?
Times both on seed-helix-4l prefill shapes and checks they agree.
Usage: python scripts/gemm-into-cache.py
"""
import torch

dev = torch.device("cuda")
B, T, S, D, HD = 8, 8192, 8200, 4096, 4096
x = torch.randn(B, T, D, device=dev, dtype=torch.bfloat16)
w_kv = torch.randn(2 * HD, D, device=dev, dtype=torch.bfloat16)
cache = torch.zeros(B, S, 2 * HD, device=dev, dtype=torch.bfloat16)


def per_seq():
    for b in range(B):
        torch.mm(x[b], w_kv.t(), out=cache[b, :T])


def batched():
    torch.bmm(x, w_kv.t().expand(B, D, 2 * HD), out=cache[:, :T])


def fused_then_copy():
    cache[:, :T].view(torch.int64).copy_((x @ w_kv.t()).view(torch.int64))


def t(fn, n=10):
    for _ in range(3):
        fn()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    a.record()
    for _ in range(n):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / n


flops = 2 * B * T * D * 2 * HD
for name, fn in [("per sequence", per_seq), ("strided batched", batched), ("one GEMM + copy", fused_then_copy)]:
    try:
        cache.zero_()
        fn()
        ref = (x @ w_kv.t())
        same = torch.equal(cache[:, :T], ref)
        ms = t(fn)
        print(f"{name:16s} {ms:7.3f} ms  {flops / ms / 1e9:6.0f} TFLOP/s  equal to one GEMM: {same}  "
              f"peak mem {torch.cuda.max_memory_allocated() / 1e9:.1f} GB")
    except RuntimeError as e:
        print(f"{name:16s} failed: {str(e).splitlines()[0][:120]}")
