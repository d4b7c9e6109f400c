"""A prompt's MoE expert products on one GPU, at Mixtral-8x7b's widths (8
experts, top-2, d_model 4096, d_ff 14336, bf16): the up-projection with its
SwiGLU and the down-projection of every routed (token, pick) row, sorted by
expert, as

* ``grouped_mm``: ``torch._grouped_mm`` (CUTLASS's grouped GEMM on Hopper;
  the up-projection followed by the SwiGLU kernel),
* ``grouped_kernel``: shardwise's Triton kernel (``kernels.grouped_linear``;
  the SwiGLU in its epilogue), at the launch ``grouped_launch`` picks and,
  with ``--sweep``, at others (at the first token count),
* ``grouped_mm_nmajor``: the same with the weights stored ``[E, K, O]``
  (the other operand layout CUTLASS is built for),
* ``loop``: one cuBLAS GEMM per expert on its rows (the group sizes known
  on the host beforehand: what the sizes cost to read is not in it), each
  product copied into place (and the up-projection's SwiGLU per expert),
* ``loop_into``: the same GEMMs written in place (``out=``), the
  up-projection's SwiGLU once over all rows,
* ``dense``: one cuBLAS GEMM of all the rows by one expert's matrix, the
  same FLOPs with no grouping (a ceiling),

each timed in CUDA graphs (``runtime.timing.graphed_us``), its rate against
the bf16 GEMM peak measured in the same process.

Usage: python scripts/moe-grouped.py [--tokens 2048 24000] [--sweep] [--out FILE.jsonl]
"""
import argparse
import itertools
import json

import torch
import torch.nn.functional as Fn

from shardwise.bench.records import append_records, provenance
from shardwise.model import kernels
from shardwise.runtime.timing import graphed_us, measure_ceilings


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 24000])
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--out")
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    peak = measure_ceilings(dev)
    recs = []

    def emit(rec):
        rec = {**rec, "plan": "none (one layer's expert products)",
               "matmul_peak_tflops": round(peak["matmul_peak_tflops"], 1),
               "matmul_sustained_tflops": round(peak["matmul_sustained_tflops"], 1)}
        recs.append(rec)
        print(json.dumps(rec), flush=True)

    try:
        sweep(args, emit, peak["matmul_peak_tflops"], dev, dt)
    except KeyboardInterrupt:  # a time limit (timeout -s INT): keep what was measured
        print("interrupted: writing the records measured so far", flush=True)
    if args.out:
        meta = provenance("cuda", 1, "python scripts/moe-grouped.py")
        append_records(args.out, [{**meta, **r} for r in recs])


def sweep(args, emit, peak, dev, dt) -> None:
    E, D, F, k = 8, 4096, 14336, 2
    g = torch.Generator(device=dev).manual_seed(0)
    w_in = torch.randn(E, 2 * F, D, device=dev, dtype=dt, generator=g) * 0.02
    w_down = torch.randn(E, D, F, device=dev, dtype=dt, generator=g) * 0.02
    for N in args.tokens:
        x = torch.randn(N, D, device=dev, dtype=dt, generator=g)
        experts = torch.randn(N, E, device=dev, generator=g).topk(k, -1).indices
        key = experts.reshape(-1)
        order = torch.argsort(key, stable=True)
        ends = torch.searchsorted(key[order], torch.arange(E, device=dev), right=True)
        ends = ends.to(torch.int32)
        rows = x.index_select(0, order // k)  # [N k, D]
        sizes = torch.diff(ends, prepend=ends.new_zeros(1)).tolist()
        R = N * k
        act = torch.randn(R, F, device=dev, dtype=dt, generator=g)
        flops = {"up": 2.0 * R * D * 2 * F, "down": 2.0 * R * F * D}
        want = {"up": kernels.swiglu(torch._grouped_mm(rows, w_in.transpose(1, 2), offs=ends)),
                "down": torch._grouped_mm(act, w_down.transpose(1, 2), offs=ends)}

        def record(proj, probe, fn, **cfg):
            try:
                err = ((fn().float() - want[proj].float()).abs().max()
                       / want[proj].float().abs().max()).item()
                us = graphed_us(fn, reps=2, iters=10)
            except Exception as e:  # a launch past the SM's resources (or a failure): its line
                emit({"tokens": N, "proj": proj, "probe": probe, **cfg,
                      "error": f"{type(e).__name__}: {str(e)[:200]}"})
                return float("inf")
            emit({"tokens": N, "rows": R, "sizes": sizes, "proj": proj, "probe": probe, **cfg,
                  "us": round(us, 1), "tflops": round(flops[proj] / us / 1e6, 1),
                  "of_peak": round(flops[proj] / us / 1e6 / peak, 3), "max_rel_err": err})
            return us

        record("up", "grouped_mm", lambda: kernels.swiglu(
            torch._grouped_mm(rows, w_in.transpose(1, 2), offs=ends)))
        record("down", "grouped_mm", lambda: torch._grouped_mm(act, w_down.transpose(1, 2),
                                                                offs=ends))

        w_in_n, w_down_n = (w.transpose(1, 2).contiguous() for w in (w_in, w_down))
        record("up", "grouped_mm_nmajor", lambda: kernels.swiglu(
            torch._grouped_mm(rows, w_in_n, offs=ends)))
        record("down", "grouped_mm_nmajor", lambda: torch._grouped_mm(act, w_down_n, offs=ends))

        def loop_into(x_, w, gated):
            h = x_.new_empty(R, w.shape[1])
            start = 0
            for e, n in enumerate(sizes):
                torch.mm(x_[start:start + n], w[e].t(), out=h[start:start + n])
                start += n
            return kernels.swiglu(h) if gated else h

        record("up", "loop_into", lambda: loop_into(rows, w_in, True))
        record("down", "loop_into", lambda: loop_into(act, w_down, False))

        def loop(x_, w, gated):
            out = x_.new_empty(R, w.shape[1] // (1 + gated))
            start = 0
            for e, n in enumerate(sizes):
                h = Fn.linear(x_[start:start + n], w[e])
                out[start:start + n] = kernels.swiglu(h) if gated else h
                start += n
            return out

        record("up", "loop", lambda: loop(rows, w_in, True))
        record("down", "loop", lambda: loop(act, w_down, False))
        record("up", "dense", lambda: kernels.swiglu(Fn.linear(rows, w_in[0]))
               [: want["up"].shape[0]])
        record("down", "dense", lambda: Fn.linear(act, w_down[0]))
        for proj, x_, w, gated in (("up", rows, w_in, True), ("down", act, w_down, False)):
            chosen = kernels.grouped_launch(gated)
            record(proj, "grouped_kernel", lambda: kernels.grouped_linear(x_, w, ends, gated),
                   **chosen, chosen=True)
            if not args.sweep or N != args.tokens[0]:
                continue
            blocks = ((128, 128), (64, 128), (128, 64)) if gated else ((128, 256), (128, 128),
                                                                        (64, 256))
            for (bm, bn), warps, stages in itertools.product(blocks, (4, 8), (3, 4)):
                cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, num_warps=warps,
                           num_stages=stages)
                if cfg != chosen:
                    record(proj, "grouped_kernel",
                           lambda: kernels.grouped_linear(x_, w, ends, gated, **cfg), **cfg)


if __name__ == "__main__":
    main()
