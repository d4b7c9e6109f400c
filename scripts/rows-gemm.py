"""A decode step's products of a few rows (``model.kernels.linear`` and
``linear_swiglu`` at 2 to 16 rows) on one GPU: ``rows_kernel``'s launches
against cuBLAS (``Fn.linear``; for the gated up-projection ``Fn.linear`` then
``swiglu``'s kernel), at llama-3.1-8b's widths at TP=1 and TP=2 and
mixtral-8x7b's LM head (at one row also the GEMV that ``linear`` takes). Each call reads a different copy of the weights
(at least 256 MB of them, so none is in L2), ten calls captured in a CUDA
graph; the rate is the weight bytes over the device time, beside the device
copy rate measured in the same process (bytes read and written).

Usage: python scripts/rows-gemm.py [--out FILE.jsonl] [--rows 16 ...] [--sweep]
                                  [--prefetch N ...]
  --sweep: every launch of the grid (block_o 32-128, block_i 64-256, split
  1 or 2, the weights the dot's left or right operand, at 4 warps and 4
  stages; then the best three of each shape at 4 or 8 warps and 3 to 6
  stages); without it, the launch ``rows_launch`` picks.
  --prefetch: that launch again with each program asking L2 for its first N
  steps of weights before its dependent launch's wait (``rows_kernel``'s
  PREFETCH; ``kernels.PREFETCH_STEPS``), where the GPU has dependent launches.
"""
import argparse
import itertools
import json

import torch
import torch.nn.functional as Fn

from shardwise.bench.records import append_records, provenance
from shardwise.model import kernels
from shardwise.runtime.timing import graphed_us, measure_ceilings

# (name, outputs, inputs, gated): O is the gate's outputs for gated products.
SHAPES = [("qkv", 6144, 4096, False), ("gate_up", 14336, 4096, True),
          ("down", 4096, 14336, False), ("wo", 4096, 4096, False),
          ("lm_head", 128256, 4096, False),
          ("qkv_tp2", 3072, 4096, False), ("wo_tp2", 4096, 2048, False),
          ("gate_up_tp2", 7168, 4096, True), ("down_tp2", 4096, 7168, False),
          ("lm_head_mixtral", 32000, 4096, False)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--rows", type=int, nargs="+", default=[16])
    ap.add_argument("--shapes", nargs="+", default=[s[0] for s in SHAPES])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--prefetch", type=int, nargs="+", default=[])
    args = ap.parse_args()
    dev = torch.device("cuda")
    copy = measure_ceilings(dev)["hbm_peak_gbps"] / 1e3  # TB/s, read + write
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    recs = []

    def emit(rec):
        rec = {**rec, "plan": "none (one kernel)", "copy_TBps": round(copy, 3), "sms": sms}
        recs.append(rec)
        print(json.dumps(rec), flush=True)

    try:
        sweep(args, emit, sms)
    except KeyboardInterrupt:  # a time limit (timeout -s INT): keep what was measured
        print("interrupted: writing the records measured so far", flush=True)
    if args.out:
        meta = provenance("cuda", 1, "python scripts/rows-gemm.py")
        append_records(args.out, [{**meta, **r} for r in recs])


def sweep(args, emit, sms) -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    for name, O, I, gated in (s for s in SHAPES if s[0] in args.shapes):
        size = (1 + gated) * O * I * 2
        n = max(2, -(-256 * 2**20 // size))
        ws = [torch.randn((1 + gated) * O, I, device=dev, dtype=dt) / I**0.5 for _ in range(n)]
        for M in args.rows:
            x = torch.randn(M, I, device=dev, dtype=dt)
            exact = x.double() @ ws[0].double().t()
            if gated:
                exact = kernels.swiglu(exact.to(dt)).double()
            base = dict(shape=name, rows=M, outs=O, width=I, gated=gated)

            def rate(us):
                return round(size / us / 1e6, 3)

            def timed(fn):
                it = itertools.count()
                return graphed_us(lambda: fn(ws[next(it) % n]))

            def cublas(w):
                return kernels.swiglu(Fn.linear(x, w)) if gated else Fn.linear(x, w)

            us = timed(cublas)
            emit({**base, "probe": "cublas", "us": round(us, 2), "weights_TBps": rate(us)})
            if M == 1 and not gated:  # the GEMV kernels.linear takes for one row
                us = timed(lambda w: kernels.linear(x, w))
                emit({**base, "probe": "gemv", "us": round(us, 2), "weights_TBps": rate(us)})
            chosen = kernels.rows_launch(gated)

            def run(cfg):
                try:
                    return launch(cfg)
                except Exception as e:  # a launch past the SM's shared memory: its line says so
                    if "OutOfResources" not in type(e).__name__:
                        raise
                    emit({**base, "probe": "rows_kernel", **cfg, "error": str(e)[:80]})
                    return float("inf")

            def launch(cfg):
                def fn(w):
                    return kernels._rows_launch(x, w, gated, **cfg)
                err = ((fn(ws[0]).double() - exact).abs().max() / exact.abs().max()).item()
                us = timed(fn)
                emit({**base, "probe": "rows_kernel", **cfg, "us": round(us, 2),
                      "weights_TBps": rate(us), "max_rel_err": err,
                      "chosen": cfg == chosen})
                return us

            run(chosen)
            for steps in args.prefetch:
                run({**chosen, "PREFETCH": steps})
            if not args.sweep:
                continue
            first = {}
            for bo, bi, split, left in itertools.product((32, 64, 128), (64, 128, 256), (1, 2),
                                                         (False, True)):
                cfg = dict(block_o=bo, block_i=bi, split=split, num_warps=4, num_stages=4,
                           W_LEFT=left)
                if cfg != chosen:
                    first[(bo, bi, split, left)] = run(cfg)
            for bo, bi, split, left in sorted(first, key=first.get)[:3]:
                for warps, stages in itertools.product((4, 8), (3, 5, 6)):
                    cfg = dict(block_o=bo, block_i=bi, split=split, num_warps=warps,
                               num_stages=stages, W_LEFT=left)
                    if cfg != chosen:
                        run(cfg)
        ws.clear()  # this shape's copies freed before the next


if __name__ == "__main__":
    main()
