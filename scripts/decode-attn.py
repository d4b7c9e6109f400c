"""A decode step's attention on one GPU at Llama 3.1 8B's widths (32 query
heads, 8 K/V heads of 128; the token-major cache's views): shardwise's
split-key kernel (``model.decode``) beside SDPA as the step called it before
(the static step's additive mask with ``enable_gqa``, every backend SDPA
offers), at batch 1 x 2062, 16 x 4110 and 1 x 32768 keys. The rate is the K/V bytes
read over the device time (CUDA graphs of ten calls: no launch in it),
beside the device copy rate measured in the same process (bytes read and
written). ``--sweep`` also times the kernel's launch
options (keys a step, programs an SM, warps, stages).

Usage: python scripts/decode-attn.py [--sweep] [--out FILE.jsonl]
"""
import argparse
import json

import torch
import torch.nn.functional as Fn
from torch.nn.attention import SDPBackend, sdpa_kernel

from shardwise.bench.records import append_records, provenance
from shardwise.runtime.timing import graphed_us, measure_ceilings
from shardwise.model import decode


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    # The copy rate as bench measures it (a copy timed in a CUDA graph read 2.45
    # TB/s on an H100 where bench's read 3.04).
    copy = measure_ceilings(dev)["hbm_peak_gbps"] / 1e3  # TB/s, read + write
    H, Hkv, d = 32, 8, 128
    recs = []

    def rec(**r):
        recs.append(r)
        print(json.dumps(r), flush=True)

    for B, S in ((1, 2062), (16, 4110), (1, 32768)):
        kv = torch.randn(B, S, 2, Hkv, d, device=dev, dtype=dt)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        q = torch.randn(B, H, 1, d, device=dev, dtype=dt)
        pos = torch.tensor(S - 1, device=dev)
        n = pos + 1
        kv_bytes = 2 * B * Hkv * S * d * 2
        bias = torch.zeros(1, S + (-S % 16), dtype=dt, device=dev)[:, :S]
        ref = Fn.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
        mine = decode.attend(q, k, v, n)[0]
        err = ((mine.float() - ref).abs().max() / ref.abs().max()).item()
        base = dict(B=B, S=S, H=H, Hkv=Hkv, d=d, copy_TBps=round(copy, 3))
        us = graphed_us(lambda: decode.attend(q, k, v, n))
        rec(probe="decode_attn", variant="split-keys (default)", us=round(us, 2), rel_err=err,
            splits=decode.split_keys(B * Hkv, S, torch.cuda.get_device_properties(dev).multi_processor_count)[0],
            kv_TBps=round(kv_bytes / us / 1e6, 3), **base)
        for name, be in (("default", None), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                         ("efficient", SDPBackend.EFFICIENT_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)):
            for form in ("mask", "no mask"):
                def fn():
                    m = bias if form == "mask" else None
                    if be is None:
                        return Fn.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
                    with sdpa_kernel([be]):
                        return Fn.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
                try:
                    out = fn()
                    e = ((out.float() - ref).abs().max() / ref.abs().max()).item()
                    us = graphed_us(fn)
                    rec(probe="decode_attn", variant=f"sdpa {name}, {form}", us=round(us, 2), rel_err=e,
                        kv_TBps=round(kv_bytes / us / 1e6, 3), **base)
                except RuntimeError as exc:
                    rec(probe="decode_attn", variant=f"sdpa {name}, {form}", error=str(exc)[:80], **base)
        if not args.sweep:
            continue
        for bn in (32, 64, 128):
            for waves in (2, 4, 8):
                for warps in (4, 8):
                    for stages in (2, 3):
                        fn = lambda: decode.attend(q, k, v, n, block_n=bn, waves=waves, warps=warps,
                                                   stages=stages)
                        try:
                            e = ((fn()[0].float() - ref).abs().max() / ref.abs().max()).item()
                            us = graphed_us(fn)
                        except Exception as exc:  # a launch that does not fit the SM
                            rec(probe="decode_attn_launch", block_n=bn, waves=waves, warps=warps,
                                stages=stages, error=str(exc)[:80], **base)
                            continue
                        rec(probe="decode_attn_launch", block_n=bn, waves=waves, warps=warps,
                            stages=stages, us=round(us, 2), rel_err=e,
                            kv_TBps=round(kv_bytes / us / 1e6, 3), **base)
    if args.out:
        meta = provenance("cuda", 1, "python scripts/decode-attn.py")
        append_records(args.out, [{**meta, **r} for r in recs])

if __name__ == "__main__":
    main()
