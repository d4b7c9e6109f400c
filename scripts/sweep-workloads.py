"""The workloads of the 4/8-GPU sweep: for each seed preset at its exact
dimensions, the seed's baseline scaled to N GPUs and the proposed plans, at
the largest batch and sequence (from the seed's own workload down, halving
the batch first, then the sequence) at which every one of those plans fits
on the profile and a step has at most --max-tokens prompt tokens (so the
sweep fits a bounded GPU run). Prints one line per preset:
PRESET BATCH SEQ PLAN [PLAN ...]
Usage: python scripts/sweep-workloads.py --gpus 8 --profile PROFILE.json [--max-tokens 131072]
"""
import argparse

from shardwise.perf.clusters import load_cluster
from shardwise.perf.costmodel import predict
from shardwise.presets import PRESETS
from shardwise.spec import ShardwiseError, Workload


def plans_for(name: str, n: int) -> list[str]:
    half = max(1, n // 2)
    if name.startswith("seed-helix"):
        helix = dict.fromkeys([f"helix:2x{half}", f"helix:{half}x2", f"helix:{n}x1"])
        return [f"tp_pp:{n}x1", f"tp_pp:{half}x2", *helix]
    if name.startswith("seed-ring"):
        return [f"tp_pp:{n}x1", f"ring:{n}"]
    if name.startswith("seed-layerwise"):
        return [f"tp_pp:{n}x1", f"tp_pp:{half}x2", "layerwise:cap=HBM*0.9"]
    if name.startswith("seed-moe"):
        return [f"tp_pp:{n}x1", f"ep:{n}"]
    return []


def fits(spec, wl, plans, cluster, n) -> bool:
    try:
        return all(predict(spec, wl, p, cluster, n).fits for p in plans)
    except ShardwiseError:
        return False


ap = argparse.ArgumentParser()
ap.add_argument("--gpus", type=int, required=True)
ap.add_argument("--profile", required=True)
ap.add_argument("--max-tokens", type=int, default=131072)
args = ap.parse_args()
cluster = load_cluster(args.profile)
for name, preset in PRESETS.items():
    plans = plans_for(name, args.gpus)
    if not plans:
        continue
    batch, seq = preset.workload.batch, preset.workload.seq_len
    # the sweep's bench sizes the cache for --warmup 2 + --iters 5 + 1 steps
    while batch >= 1 and seq >= 256:
        wl = Workload(batch=batch, seq_len=seq, decode_steps=8)
        if batch * seq <= args.max_tokens and fits(preset.model, wl, plans, cluster, args.gpus):
            print(name, batch, seq, *plans)
            break
        if batch > 1:
            batch //= 2
        else:
            seq //= 2
    else:
        print(f"# {name}: nothing fits down to batch 1 x 256", flush=True)
