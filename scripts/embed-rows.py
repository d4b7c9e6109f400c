"""The token-embedding lookup of a decode step on one GPU: ``N`` rows of a
``[V, D]`` table (Llama-3.1-8b's 128256 x 4096, bf16) through
``F.embedding`` (``index_select``'s kernel, which for a few indices gives each
thread block every index in turn) and through advanced indexing
(``weight[ids]``: one thread an element), at 1 to 4096 tokens; device time
in CUDA graphs of ten calls (no launch in it).

Usage: python scripts/embed-rows.py [--out FILE.jsonl]
"""
import argparse
import json

import torch
import torch.nn.functional as Fn

from shardwise.bench.records import append_records, provenance
from shardwise.runtime.timing import graphed_us


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    V, D = 128256, 4096
    w = torch.randn(V, D, device=dev, dtype=dt)
    recs = []
    for n in (1, 4, 16, 64, 256, 4096):
        ids = torch.randint(0, V, (n,), device=dev)
        assert torch.equal(Fn.embedding(ids, w), w[ids])
        rec = {"V": V, "D": D, "tokens": n,
               "embedding_us": graphed_us(lambda: Fn.embedding(ids, w)),
               "index_us": graphed_us(lambda: w[ids])}
        print(json.dumps(rec), flush=True)
        recs.append(rec)
    if args.out:
        meta = provenance("cuda", 1, "python scripts/embed-rows.py")
        append_records(args.out, [{**meta, "probe": "embed_rows", "plan": "none (one kernel)",
                                   **r} for r in recs])


if __name__ == "__main__":
    main()
