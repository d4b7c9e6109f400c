"""Causal prefill attention at seed-helix-4l's shape (8 x 32 heads x 8192 x
128, bf16) under each SDPA backend, and the down projection with and
without the residual add in the GEMM's epilogue (addmm, beta=1).

Calls are interleaved (A, B, C, A, B, C, ...) so every variant sees the same
clocks; prints one JSON line per variant: median ms and TFLOP/s (causal
FLOPs: 4 * B * H * d * T * (T + 1) / 2)."""
import json
import os
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as Fn
from torch.nn.attention import SDPBackend, sdpa_kernel

dev = torch.device("cuda")
B, H, T, d, D, F = 8, 32, 8192, 128, 4096, 16384
torch.manual_seed(0)
x = torch.randn(B, T, H, d, device=dev, dtype=torch.bfloat16)  # the layout after the Q GEMM
q = x.transpose(1, 2)
qc = q.contiguous()
k = torch.randn(B, H, T, d, device=dev, dtype=torch.bfloat16)
v = torch.randn(B, H, T, d, device=dev, dtype=torch.bfloat16)
flops_attn = 4 * B * H * d * T * (T + 1) / 2


def attn(backend, qq):
    def f():
        with sdpa_kernel([backend]):
            return Fn.scaled_dot_product_attention(qq, k, v, is_causal=True)
    return f


a = torch.randn(B * T, F, device=dev, dtype=torch.bfloat16) * 0.01
w = torch.randn(D, F, device=dev, dtype=torch.bfloat16) * 0.01
res = torch.randn(B * T, D, device=dev, dtype=torch.bfloat16)
flops_down = 2 * B * T * F * D
variants = {
    "sdpa cudnn (q strided)": (attn(SDPBackend.CUDNN_ATTENTION, q), flops_attn),
    "sdpa cudnn (q contiguous)": (attn(SDPBackend.CUDNN_ATTENTION, qc), flops_attn),
    "sdpa flash (q strided)": (attn(SDPBackend.FLASH_ATTENTION, q), flops_attn),
    "sdpa efficient (q strided)": (attn(SDPBackend.EFFICIENT_ATTENTION, q), flops_attn),
    "down mm": (lambda: torch.mm(a, w.t()), flops_down),
    "down addmm (residual in epilogue)": (lambda: torch.addmm(res, a, w.t()), flops_down),
    "down mm + add": (lambda: torch.mm(a, w.t()).add_(res), flops_down),
}
ok = {}
for name, (f, _) in variants.items():
    try:
        f()
        ok[name] = variants[name]
    except RuntimeError as e:
        print(json.dumps({"variant": name, "error": str(e)[:200]}))
ref = variants["sdpa cudnn (q strided)"][0]()
for name in [n for n in ok if n.startswith("sdpa")]:
    err = ((ok[name][0]() - ref).float().norm() / ref.float().norm()).item()
    print(json.dumps({"variant": name, "rel_diff_vs_cudnn": err}))
times = {n: [] for n in ok}
ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in ok]
for rnd in range(23):
    for (n, (f, _)), (e0, e1) in zip(ok.items(), ev):
        e0.record()
        f()
        e1.record()
        torch.cuda.synchronize()
        if rnd >= 3:
            times[n].append(e0.elapsed_time(e1))
out = os.environ.get("OUT", ".")
rev = os.environ.get("SHARDWISE_GIT_REV") or subprocess.run(
    ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
with open(os.path.join(out, "attn-backends.jsonl"), "w") as fh:
    for n, (f, fl) in ok.items():
        med = statistics.median(times[n])
        line = json.dumps({"command": "python3 scripts/attn-backends.py", "git_rev": rev,
                           "variant": n, "median_ms": med, "min_ms": min(times[n]),
                           "tflops": fl / med / 1e9, "device": torch.cuda.get_device_name(),
                           "torch": torch.__version__})
        print(line)
        fh.write(line + "\n")
