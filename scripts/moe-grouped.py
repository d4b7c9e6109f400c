"""A prompt's MoE expert products on one GPU, at Mixtral-8x7b's widths (8
experts, top-2, d_model 4096, d_ff 14336, bf16): the up-projection with its
SwiGLU and the down-projection of every routed (token, pick) row, sorted by
expert, as

* ``grouped_mm``: ``torch._grouped_mm`` (CUTLASS's grouped GEMM on Hopper;
  the up-projection followed by the SwiGLU kernel),
* ``grouped_tma``: shardwise's Triton kernel for Hopper (``kernels.grouped_linear``,
  ``grouped_tma_kernel``: TMA descriptors, one program per SM, the SwiGLU in
  its epilogue), at the launch ``grouped_launch`` picks and, with ``--sweep
  tma``, at :data:`TMA_SWEEP`'s (at the first token count): blocks, warps,
  stages, an expert's short last row block at half height or not
  (``TAIL``), the gate and up tiles in one dot or two (``GATE_CAT``), the
  tile loop flattened (``FLATTEN``) or warp-specialized (``WARP_SPEC``),
* ``grouped_kernel``: its pointer-load kernel for the GPUs without TMA, at
  the launch ``grouped_launch`` picks and, with ``--sweep pointer``, at
  others (at the first token count),
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
the bf16 GEMM peak measured in the same process, its largest difference from
``grouped_mm``'s result as a fraction of that result's largest magnitude
(``max_rel_err``). A launch that fails (a compile error, more shared memory
than an SM has) records its error and the sweep goes on. One JSON line a
measurement; interrupted (``timeout -s INT``), the lines measured so far are
written. The sweep starts no launch ``--sweep-seconds`` after the peak is
measured (default 150: the whole run within ~4 minutes on an H100). The
swept token count is measured last, so a launch that faults the GPU loses
only the sweep's remainder.

Usage: python scripts/moe-grouped.py [--tokens 2048 24000] [--sweep [tma] [pointer]]
                                     [--sweep-seconds 150] [--out FILE.jsonl]
e.g. timeout -s INT 300 python scripts/moe-grouped.py --sweep tma --out FILE.jsonl
"""
import argparse
import itertools
import json
import time

import torch
import torch.nn.functional as Fn

from shardwise.bench.records import append_records, provenance
from shardwise.model import kernels
from shardwise.runtime.timing import graphed_us, measure_ceilings

# grouped_tma_kernel's launches for --sweep tma, each over grouped_launch's
# (gated: up; ungated: down), the likeliest first (a time limit keeps them).
# The compiler's riskier options (FLATTEN, WARP_SPEC) last: a launch that
# faults the GPU ends the run.
TMA_SWEEP = {
    True: [dict(num_stages=3), dict(TAIL=False), dict(GATE_CAT=True),
           dict(GATE_CAT=True, num_stages=3), dict(BLOCK_N=64, GATE_CAT=True),
           dict(BLOCK_M=64, num_warps=4), dict(BLOCK_M=64, num_warps=8),
           dict(num_stages=5, BLOCK_K=32), dict(programs=66),
           dict(TAIL=False, FLATTEN=True), dict(WARP_SPEC=True),
           dict(TAIL=False, WARP_SPEC=True)],
    False: [dict(num_stages=4), dict(TAIL=False), dict(BLOCK_N=128, num_stages=4),
            dict(BLOCK_N=128, num_stages=5), dict(BLOCK_M=64, num_warps=4),
            dict(BLOCK_M=64, num_warps=8), dict(BLOCK_K=128, num_stages=2),
            dict(TAIL=False, FLATTEN=True), dict(BLOCK_N=128, TAIL=False, FLATTEN=True),
            dict(WARP_SPEC=True), dict(TAIL=False, WARP_SPEC=True),
            dict(BLOCK_N=128, WARP_SPEC=True)],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[2048, 24000])
    ap.add_argument("--sweep", nargs="*", choices=("tma", "pointer"),
                    help="the kernels whose launches to sweep (bare: tma)")
    ap.add_argument("--sweep-seconds", type=float, default=150.0)
    ap.add_argument("--out")
    args = ap.parse_args()
    args.sweep = ["tma"] if args.sweep == [] else args.sweep or []
    dev, dt = torch.device("cuda"), torch.bfloat16
    peak = measure_ceilings(dev)
    recs = []

    def emit(rec):
        rec = {**rec, "plan": "none (one layer's expert products)",
               "matmul_peak_tflops": round(peak["matmul_peak_tflops"], 1),
               "matmul_sustained_tflops": round(peak["matmul_sustained_tflops"], 1)}
        recs.append(rec)
        print(json.dumps(rec), flush=True)

    args.deadline = time.monotonic() + args.sweep_seconds
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
    for N in args.tokens[1:] + args.tokens[:1]:  # the swept count last: a fault ends the run
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
        products = (("up", rows, w_in, True), ("down", act, w_down, False))
        for tma, probe in ((True, "grouped_tma"), (False, "grouped_kernel")):
            for proj, x_, w, gated in products:
                record(proj, probe, lambda: kernels.grouped_linear(x_, w, ends, gated, tma=tma),
                       **kernels.grouped_launch(gated, tma), chosen=True)
        if N != args.tokens[0]:
            continue
        for proj, x_, w, gated in products if "tma" in args.sweep else ():
            chosen = kernels.grouped_launch(gated, tma=True)
            for change in TMA_SWEEP[gated]:
                if time.monotonic() > args.deadline:
                    break
                cfg = {**chosen, **change}
                record(proj, "grouped_tma", lambda: kernels.grouped_linear(
                    x_, w, ends, gated, tma=True, **cfg), **cfg)
        for proj, x_, w, gated in products if "pointer" in args.sweep else ():
            chosen = kernels.grouped_launch(gated)
            blocks = ((128, 128), (64, 128), (128, 64)) if gated else ((128, 256), (128, 128),
                                                                        (64, 256))
            for (bm, bn), warps, stages in itertools.product(blocks, (4, 8), (3, 4)):
                cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=64, num_warps=warps,
                           num_stages=stages)
                if cfg != chosen and time.monotonic() <= args.deadline:
                    record(proj, "grouped_kernel", lambda: kernels.grouped_linear(
                        x_, w, ends, gated, tma=False, **cfg), **cfg)


if __name__ == "__main__":
    main()
