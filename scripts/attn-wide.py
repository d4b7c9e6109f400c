"""Wide-head attention (head_dim 256 and 512) on one GPU: shardwise's flash
kernel (model/flash.py) against every PyTorch backend, in one process.

For each head_dim and dtype, at batch 1 x (8192 / head_dim) heads x --seq,
causal, q in the layout the reference attends (the Q GEMM's [B, T, H, d]
transposed) and K/V as views of a packed KV cache ([B, S, 2, Hkv, d]):

* checks every tile configuration first on small problems against float32
  attention (grouped-query heads, a query offset, non-causal blocks with a
  ragged tail; the output poisoned with NaN before each call) and at full
  size against SDPA's memory-efficient kernel;
* times each configuration, SDPA's backends (memory-efficient, flash,
  cuDNN, its own choice) and, with --flex, compiled FlexAttention, in
  interleaved rounds (median of CUDA-event times; causal FLOPs
  4 B H d T (T + 1) / 2), then the kernels shardwise calls
  (reference.causal_attention and lse.attend_lse, default tiles);
* with --decode, one decode step (batch 8, context --seq / 2) and a chunk of
  2048 queries at the end of the context, each against the path shardwise
  takes without the kernel.

Writes JSON lines to $OUT/attn-wide.jsonl (one per variant) and prints a
table. Usage: python3 scripts/attn-wide.py [--seq 16384] [--head-dims 256 512]
[--dtypes bf16] [--sweep] [--flex 512] [--decode]
"""
import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as Fn
from torch.nn.attention import SDPBackend, sdpa_kernel

from shardwise.model import flash
from shardwise.model.reference import causal_attention
from shardwise.parallel.lse import attend_lse

# Tile configurations tried with --sweep (block_m, block_n, dv, warps, stages);
# those that do not fit the GPU's shared memory fail to compile and are skipped.
SWEEP = {
    512: [(64, 32, 512, 8, 2), (64, 64, 512, 8, 1), (128, 64, 256, 8, 1),
          (128, 32, 256, 8, 2), (64, 32, 256, 4, 2)],
    256: [(128, 64, 256, 8, 2), (128, 32, 256, 8, 3), (64, 64, 256, 8, 2),
          (64, 64, 256, 4, 3), (128, 64, 128, 8, 2)],
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# CUDA; on a CPU only under TRITON_INTERPRET=1 at tiny sizes (fp16), to try the script.
dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def kv_cache(B, S, Hkv, d, dtype, extra=0):
    kv = torch.randn(B, S + extra, 2, Hkv, d, device=dev, dtype=dtype)
    return kv[:, :S, 0].transpose(1, 2), kv[:, :S, 1].transpose(1, 2)  # [B, Hkv, S, d] views


def queries(B, T, H, d, dtype):
    return torch.randn(B, T, H, d, device=dev, dtype=dtype).transpose(1, 2)  # [B, H, T, d]


def reference(q, k, v, q_start, causal):
    """float32 attention and its lse, head by head (scores of one head at a time)."""
    B, H, T, d = q.shape
    G = H // k.shape[1]
    o = torch.empty(B, H, T, d, device=dev)
    lse = torch.empty(B, H, T, device=dev)
    pos = q_start + torch.arange(T, device=dev)[:, None]
    for b in range(B):
        for h in range(H):
            s = (q[b, h].float() @ k[b, h // G].float().t()) / math.sqrt(d)
            if causal:
                s = s.masked_fill(torch.arange(k.shape[2], device=dev)[None, :] > pos, -math.inf)
            lse[b, h] = torch.logsumexp(s, -1)
            o[b, h] = torch.softmax(s, -1) @ v[b, h // G].float()
    return o, lse


def poisoned(fn, *shapes):
    """``fn()`` after blocks of the outputs' sizes (``(shape, dtype)``) were
    filled with NaN and freed: the allocator hands the same blocks out next,
    so an output element the kernel does not write shows up as NaN."""
    junk = [torch.full(s, float("nan"), dtype=t, device=dev) for s, t in shapes]
    del junk
    return fn()


def check(cfg, d, dtype):
    """Worst relative output error and lse error over the small problems (the
    non-causal one, a compilation of its own, for the default tiles only)."""
    worst_o = worst_l = 0.0
    cases = [(2, 4, 2, 300, 300, 0, True), (1, 4, 1, 100, 500, 400, True),
             (1, 8, 2, 1, 257, 256, True)]
    if cfg == flash.CONFIGS[d]:
        cases.append((2, 4, 2, 64, 333, 0, False))
    for B, H, Hkv, T, S, q_start, causal in cases:
        q = queries(B, T, H, d, dtype)
        k, v = kv_cache(B, S, Hkv, d, dtype, extra=5)
        o, lse = poisoned(lambda: flash.attend(q, k, v, q_start, causal, config=cfg),
                          ((B, H, T, d), dtype), ((B, H, T), torch.float32))
        ro, rl = reference(q, k, v, q_start, causal)
        worst_o = max(worst_o, ((o.float() - ro).norm() / ro.norm()).item())
        worst_l = max(worst_l, (lse - rl).abs().max().item())
        if torch.isnan(o).any() or torch.isnan(lse).any():
            worst_o = float("nan")
    return worst_o, worst_l


def timed(variants, rounds, warmup=2):
    """Median ms of each variant over interleaved rounds (CUDA events)."""
    for f in variants.values():
        for _ in range(warmup):
            f()
    sync()
    times = {n: [] for n in variants}
    for _ in range(rounds):
        for n, f in variants.items():
            if dev.type != "cuda":
                t0 = time.perf_counter()
                f()
                times[n].append(1e3 * (time.perf_counter() - t0))
                continue
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            f()
            e1.record()
            sync()
            times[n].append(e0.elapsed_time(e1))
    return {n: (statistics.median(t), min(t)) for n, t in times.items()}


def sync():
    if dev.type == "cuda":
        torch.cuda.synchronize()


def sdpa(backend, q, k, v, **kw):
    def f():
        if backend is None:
            return Fn.scaled_dot_product_attention(q, k, v, **kw)
        with sdpa_kernel([backend]):
            return Fn.scaled_dot_product_attention(q, k, v, **kw)
    return f


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=16384)
    ap.add_argument("--head-dims", type=int, nargs="+", default=[256, 512])
    ap.add_argument("--dtypes", nargs="+", default=["bf16"], choices=list(DTYPES))
    ap.add_argument("--sweep", action="store_true", help="time every tile configuration of SWEEP")
    ap.add_argument("--flex", type=int, nargs="*", default=[], metavar="HEAD_DIM",
                    help="also time compiled FlexAttention at these head dims")
    ap.add_argument("--decode", action="store_true", help="also a decode step and a prefix chunk")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--width", type=int, default=8192, help="heads x head_dim (seed-ring-4l's d_model)")
    args = ap.parse_args()
    out = os.environ.get("OUT", ".")
    rev = os.environ.get("SHARDWISE_GIT_REV") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    import triton
    meta = {"command": "python3 scripts/attn-wide.py " + " ".join(sys.argv[1:]), "git_rev": rev,
            "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "torch": torch.__version__,
            "triton": triton.__version__}
    rows = []
    fh = open(os.path.join(out, "attn-wide.jsonl"), "a")

    def record(**r):
        r = {**meta, **r}
        rows.append(r)
        fh.write(json.dumps(r) + "\n")
        fh.flush()
        print(json.dumps(r), flush=True)

    torch.manual_seed(0)
    for dname in args.dtypes:
        dtype = DTYPES[dname]
        for d in args.head_dims:
            B, H, T = 1, args.width // d, args.seq
            flops = 4 * B * H * d * T * (T + 1) / 2
            shape = {"head_dim": d, "dtype": dname, "batch": B, "heads": H, "seq": T, "causal": True}
            cfgs = [flash.Config(*c) for c in SWEEP[d]] if args.sweep else [flash.CONFIGS[d]]
            if flash.CONFIGS[d] not in cfgs:
                cfgs.insert(0, flash.CONFIGS[d])
            variants, errs = {}, {}
            q = queries(B, T, H, d, dtype)
            k, v = kv_cache(B, T, H, d, dtype)
            want = sdpa(SDPBackend.EFFICIENT_ATTENTION if dev.type == "cuda" else None,
                        q, k, v, is_causal=True)()
            for c in cfgs:
                name = f"flash m{c.block_m} n{c.block_n} dv{c.dv} w{c.warps} s{c.stages}"
                t0 = time.time()
                try:
                    err_o, err_l = check(c, d, dtype)
                    got = flash.attend(q, k, v, 0, True, config=c)[0]
                except Exception as e:  # noqa: BLE001 - a configuration that does not compile
                    record(variant=name, **shape, error=str(e)[:300])
                    continue
                full = ((got.float() - want.float()).norm() / want.float().norm()).item()
                errs[name] = {"check_rel_err": err_o, "check_lse_err": err_l,
                              "rel_diff_vs_efficient": full, "compile_check_s": time.time() - t0}
                variants[name] = (lambda c=c: flash.attend(q, k, v, 0, True, config=c))
            variants["shardwise causal_attention"] = lambda: causal_attention(q, k, v, 0)
            variants["shardwise attend_lse"] = lambda: attend_lse(q, k, v, causal=True)
            for name, be in [("sdpa efficient", SDPBackend.EFFICIENT_ATTENTION),
                             ("sdpa flash", SDPBackend.FLASH_ATTENTION),
                             ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa default", None)]:
                f = sdpa(be, q, k, v, is_causal=True)
                try:
                    got = f()
                    sync()
                except RuntimeError as e:
                    record(variant=name, **shape, error=str(e)[:300])
                    continue
                errs[name] = {"rel_diff_vs_efficient":
                              ((got.float() - want.float()).norm() / want.float().norm()).item()}
                variants[name] = f
            if d in args.flex:
                from torch.nn.attention.flex_attention import create_block_mask, flex_attention
                mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, T, T, device=dev)
                fx = torch.compile(flex_attention, dynamic=False)
                t0 = time.time()
                try:
                    got = fx(q, k, v, block_mask=mask)
                    sync()
                    errs["flex"] = {"rel_diff_vs_efficient": ((got.float() - want.float()).norm()
                                                              / want.float().norm()).item(),
                                    "compile_check_s": time.time() - t0}
                    variants["flex"] = lambda: fx(q, k, v, block_mask=mask)
                except Exception as e:  # noqa: BLE001
                    record(variant="flex", **shape, error=str(e)[:300])
            for name, (med, best) in timed(variants, args.rounds).items():
                record(variant=name, **shape, median_ms=med, min_ms=best,
                       tflops=flops / med / 1e9, **errs.get(name, {}))
            del q, k, v, want
            if args.decode:
                decode(d, dtype, dname, args.seq, args.width // d, args.rounds, record)
            if dev.type == "cuda":
                torch.cuda.empty_cache()

    print("\n%-40s %5s %5s %8s %9s %10s" % ("variant", "d", "dtype", "seq", "ms", "TFLOP/s"))
    for r in rows:
        if "median_ms" in r:
            print("%-40s %5d %5s %8s %9.3f %10.1f" % (r["variant"], r["head_dim"], r["dtype"],
                                                   r.get("seq", ""), r["median_ms"],
                                                   r.get("tflops", float("nan"))))
    for d in args.head_dims:
        for dname in args.dtypes:
            sel = [r for r in rows if r["head_dim"] == d and r["dtype"] == dname
                   and "tflops" in r and r.get("causal") and r.get("seq") == args.seq]
            ours = max((r for r in sel if r["variant"].startswith("flash")), key=lambda r: r["tflops"],
                       default=None)
            torch_best = max((r for r in sel if r["variant"].startswith(("sdpa", "flex"))),
                             key=lambda r: r["tflops"], default=None)
            if ours and torch_best:
                print(f"head_dim {d} {dname}: best flash {ours['variant']} {ours['tflops']:.0f} "
                      f"TFLOP/s, best PyTorch {torch_best['variant']} {torch_best['tflops']:.0f}: "
                      f"{ours['tflops'] / torch_best['tflops']:.2f}x")


def decode(d, dtype, dname, seq, H, rounds, record):
    """A decode step and a chunk at the end of the context: flash against the
    path causal_attention takes without it (SDPA's flash/efficient kernels for
    one query, a boolean mask for a chunk)."""
    for B, T, S in [(8, 1, seq // 2), (1, min(2048, seq // 2), seq)]:
        q = queries(B, T, H, d, dtype)
        k, v = kv_cache(B, S, H, d, dtype)
        q_start = S - T
        shape = {"head_dim": d, "dtype": dname, "batch": B, "heads": H, "queries": T,
                 "seq": S, "q_start": q_start}
        pos = torch.arange(q_start, S, device=dev)[:, None]
        mask = torch.arange(S, device=dev)[None, :] <= pos
        if T == 1:
            def present():
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                    return Fn.scaled_dot_product_attention(q, k, v)
        else:
            def present():
                return Fn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        got = flash.attend(q, k, v, q_start, True)[0]
        want = present()
        err = ((got.float() - want.float()).norm() / want.float().norm()).item()
        flops = 4 * B * H * d * T * (S - (T - 1) / 2)
        kv_bytes = 2 * B * H * S * d * q.element_size()
        res = timed({"flash": lambda: flash.attend(q, k, v, q_start, True), "sdpa (present path)": present},
                    rounds)
        for name, (med, best) in res.items():
            record(variant=f"{'decode' if T == 1 else 'chunk'} {name}", **shape, median_ms=med,
                   min_ms=best, tflops=flops / med / 1e9, kv_gbps=kv_bytes / med / 1e6,
                   rel_diff_vs_present=err)


if __name__ == "__main__":
    main()
