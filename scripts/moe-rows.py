"""The routed-expert GEMV of a MoE decode step (``model.kernels.expert_rows``)
on one GPU, at Mixtral-8x7b's widths: each block of outputs a program may take
(8 to 64, the other options as ``expert_rows_launch`` picks them) and the
launch ``expert_rows_launch`` picks, for the up-projection
([gate; up], 28672 x 4096) and the down-projection (4096 x 14336), at 1, 2 and
4 tokens of 2 picks, and the same product as one grouped GEMM
(``torch._grouped_mm`` over the rows sorted by expert); the rate is the routed
experts' weight bytes over the
device time (CUDA graphs of ten calls: no launch in it), beside the device
copy rate measured in the same process (bytes read and written).

Usage: python scripts/moe-rows.py [--out FILE.jsonl]
"""
import argparse
import json

import torch

from shardwise.bench.records import append_records, provenance
from shardwise.runtime.timing import graphed_us, measure_ceilings
from shardwise.model import kernels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--sweep", action="store_true",
                    help="also each launch at 1 token: 8 to 32 outputs a program, 256 to 1024 "
                         "inputs a step, 4 or 8 warps, partial sums kept per thread or summed "
                         "every step (STEP_SUM); and the product on the tensor cores (DOT): "
                         "16 to 64 outputs, 64 to 256 inputs, 3 or 4 stages")
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    # The copy rate as bench measures it (a copy timed in a CUDA graph read 2.45
    # TB/s on an H100 where bench's read 3.04).
    copy = measure_ceilings(dev)["hbm_peak_gbps"] / 1e3  # TB/s, read + write
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    E, D, F, k = 8, 4096, 14336, 2
    w_in = torch.randn(E, 2 * F, D, device=dev, dtype=dt) * 0.02
    w_down = torch.randn(E, D, F, device=dev, dtype=dt) * 0.02
    recs = []
    for tokens in (1, 2, 4):
        g = torch.Generator(device=dev).manual_seed(tokens)
        experts = torch.stack([torch.randperm(E, device=dev, generator=g)[:k]
                               for _ in range(tokens)])  # [N, k] distinct picks
        routed = experts.unique().numel()
        for name, w, per, rows_in in (("up", w_in, k, tokens), ("down", w_down, 1, tokens * k)):
            x = torch.randn(rows_in, w.shape[2], device=dev, dtype=dt)
            R, O = tokens * k, w.shape[1]
            auto = kernels.expert_rows_launch(R, O, sms)["block_o"]
            ref = kernels.expert_rows(x, w, experts, 0, per)
            for block in (8, 16, 32, 64):
                fn = lambda: kernels._expert_rows_launch(x, w, experts, 0, per, block_o=block)
                same = torch.equal(fn(), ref) if block == auto else None
                us = graphed_us(fn)
                weight_bytes = routed * w.shape[1] * w.shape[2] * w.element_size()
                rec = {"probe": "expert_rows", "matrix": name, "tokens": tokens, "rows": R,
                       "routed_experts": routed, "block_o": block, "chosen": block == auto,
                       "us": round(us, 2), "weights_TBps": round(weight_bytes / us / 1e6, 3),
                       "copy_TBps": round(copy, 3), "sms": sms}
                if same is not None:
                    rec["equal_to_default_launch"] = same
                recs.append(rec)
                print(json.dumps(rec), flush=True)
            # The same product as one grouped GEMM over the rows sorted by
            # expert (the prompt's path, MoE._grouped): empty groups read nothing.
            key = experts.reshape(-1)
            order = torch.argsort(key, stable=True)
            ends = torch.searchsorted(key[order], torch.arange(E, device=dev),
                                      right=True).to(torch.int32)
            src_rows = order // per if per > 1 else order

            def grouped():
                return torch._grouped_mm(x[src_rows], w.transpose(1, 2), offs=ends)

            close = torch.allclose(grouped().float(), ref[order].float(), rtol=2e-2, atol=1e-2)
            us = graphed_us(grouped)
            weight_bytes = routed * w.shape[1] * w.shape[2] * w.element_size()
            rec = {"probe": "grouped_mm", "matrix": name, "tokens": tokens, "rows": R,
                   "routed_experts": routed, "us": round(us, 2), "close_to_default": close,
                   "weights_TBps": round(weight_bytes / us / 1e6, 3), "copy_TBps": round(copy, 3)}
            recs.append(rec)
            print(json.dumps(rec), flush=True)
            for block, bi, warps, stages, dot, step_sum in (
                    [(b, bi, wp, 2, False, ss) for b in (8, 16, 32) for bi in (256, 512, 1024)
                     for wp in (4, 8) for ss in (False, True)]
                    + [(b, bi, 4, st, True, False) for b in (16, 32, 64) for bi in (64, 128, 256)
                       for st in (3, 4)]
                    if args.sweep and tokens == 1 else []):
                fn = lambda: kernels._expert_rows_launch(x, w, experts, 0, per, block_o=block,
                                                         block_i=bi, num_warps=warps,
                                                         num_stages=stages, DOT=dot,
                                                         STEP_SUM=step_sum)
                close = torch.allclose(fn().float(), ref.float(), rtol=2e-2, atol=1e-2)
                us = graphed_us(fn)
                weight_bytes = routed * w.shape[1] * w.shape[2] * w.element_size()
                rec = {"probe": "expert_rows_launch", "matrix": name, "tokens": tokens,
                       "rows": R, "block_o": block, "block_i": bi, "num_warps": warps, "dot": dot,
                       "step_sum": step_sum,
                       "num_stages": stages, "us": round(us, 2), "close_to_default": close,
                       "weights_TBps": round(weight_bytes / us / 1e6, 3),
                       "copy_TBps": round(copy, 3)}
                recs.append(rec)
                print(json.dumps(rec), flush=True)
    if args.out:
        meta = provenance("cuda", 1, "python scripts/moe-rows.py")
        append_records(args.out, [{**meta, **r} for r in recs])

if __name__ == "__main__":
    main()
