"""Kernels a decode layer launches, per architecture and strategy, counted on
CPU ranks along the code's GPU branches (shardwise.perf.counting's
count_calls with CudaPaths: fused kernels, Triton launches and collectives
each one call, as on a GPU) for the static decode step a CUDA graph replays
(and the eager step beside it).

A layer's count is the busiest rank's difference between a model of 2S and
one of S layers (S: the plan's pipeline stages: each rank holds one layer
more), so the step's own launches (embedding, masks, final norm, LM head)
drop out. On gloo a tensor-parallel all-reduce is a collective followed by
the fused add + norm kernel; on GPUs (NCCL, symmetric memory) a decode
step's all-reduce, add and norm are one kernel, counted here as the
collective. The architectures are
tiny (the counts do not depend on the sizes) with each family's features:
GPT-style (LayerNorm, tanh GELU, MHA), Llama-style (RMSNorm, SwiGLU,
grouped-query attention, Llama 3.1 rotary) and Mixtral-style (the Llama
layer with 4 experts, top 2).

With ``--profiled RECORDS``, the table gains the profiler's count on a GPU:
RECORDS are ``shardwise bench --phase decode --trace DIR`` records of the
same plans on one model at two layer counts (the busiest rank's kernels in
one CUDA graph replay, cuBLAS's own split-K reductions and memsets
included), and a layer's count is their difference per layer.

Usage: python scripts/kernel-counts.py --out results/kernels-per-decode-layer
[--profiled RECORDS.jsonl] (writes OUT.jsonl and OUT.md; a few minutes on two
cores).
"""
from __future__ import annotations

import argparse
import json
import sys

from shardwise.bench.records import git_rev
from shardwise.perf.counting import count_calls
from shardwise.perf.events import CALL_KINDS
from shardwise.runtime.job import Case
from shardwise.spec import ModelSpec, Workload

LLAMA31 = (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
           ("original_max_position_embeddings", 8192), ("rope_type", "llama3"))
ARCHS = {
    "GPT-style": ModelSpec(name="gpt", n_layers=1, d_model=64, n_heads=4, head_dim=16,
                           d_ff=256, dtype="bf16", activation="gelu_tanh", vocab_size=97),
    "Llama-style": ModelSpec(name="llama", n_layers=1, d_model=64, n_heads=8, n_kv_heads=2,
                             head_dim=16, d_ff=128, dtype="bf16", norm="rmsnorm",
                             activation="swiglu", vocab_size=97, rope_theta=500000.0,
                             rope_scaling=LLAMA31),
}
ARCHS["Mixtral-style"] = ARCHS["Llama-style"].replace(name="mixtral", n_experts=4, top_k=2)
# (plan, ranks, pipeline stages); layerwise's capacity is chosen per model
# (PIPELINE: the one that cuts the layers into two equal groups on 2 ranks)
PIPELINE = "layerwise:pipeline"
PLANS = [("tp_pp:1x1", 1, 1), ("helix:1x1", 1, 1), ("ring:1", 1, 1),
         ("layerwise:cap=100GB", 1, 1), ("ep:1", 1, 1),
         ("tp_pp:2x1", 2, 1), ("tp_pp:1x2", 2, 2), ("tp_pp:2x2", 4, 2),
         ("helix:1x2", 2, 1), ("helix:2x1", 2, 1), ("ring:2", 2, 1),
         ("layerwise:cap=100GB", 2, 1), (PIPELINE, 2, 2), ("ep:2", 2, 1)]
WORKLOAD = Workload(batch=4, seq_len=16, decode_steps=2)
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p", "broadcast")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="results/kernels-per-decode-layer")
    ap.add_argument("--profiled", metavar="RECORDS", default=None,
                    help="bench --trace decode records at two layer counts: the profiler's "
                         "count per layer on a GPU, in a second table")
    args = ap.parse_args()
    profiled = _profiled(args.profiled) if args.profiled else []
    rows = []
    for nproc in sorted({n for _, n, _ in PLANS}):
        cases, keys = [], []
        for arch, spec in ARCHS.items():
            for plan, n, stages in PLANS:
                if n != nproc or (plan.startswith("ep") and not spec.is_moe):
                    continue
                for layers in (stages, 2 * stages):
                    m = spec.replace(n_layers=layers)
                    cases.append(Case(m, WORKLOAD, _two_groups(m) if plan == PIPELINE else plan,
                                      verify=False))
                keys.append((arch, "layerwise (2 groups)" if plan == PIPELINE else plan, stages))
        res = count_calls(cases, nproc, deadline_s=600)
        for i, (arch, plan, stages) in enumerate(keys):
            a, b = res[2 * i], res[2 * i + 1]
            row = {"arch": arch, "plan": plan, "ranks": nproc}
            for phase in ("static", "decode"):  # each rank holds one layer more in b
                pairs = [(_calls(ra, phase), _calls(rb, phase)) for ra, rb in zip(a, b)]
                row[f"{phase}_kernels_per_layer"] = max(
                    cb["kernels"] + cb["tritons"] - ca["kernels"] - ca["tritons"]
                    for ca, cb in pairs)
                row[f"{phase}_collectives_per_layer"] = max(
                    sum(cb[k] - ca[k] for k in COLLECTIVES) for ca, cb in pairs)
            rows.append(row)
            print(json.dumps(row), flush=True)
    rev = git_rev()
    command = f"python scripts/kernel-counts.py --out {args.out}" + (
        f" --profiled {args.profiled}" if args.profiled else "")
    with open(args.out + ".jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({**r, "command": command, "device": "cpu (the GPU branches)",
                                "git_rev": rev}) + "\n")
        for p in profiled:  # each names its own device, revision and bench command
            f.write(json.dumps({**p, "source": "profiler"}) + "\n")
    with open(args.out + ".md", "w") as f:
        f.write(f"# Kernels per decode layer\n\n`{command}` "
                f"at {rev}: kernel launches of one decode layer of {WORKLOAD.batch} sequences "
                f"on the busiest rank, counted on "
                f"CPU ranks along the GPU branches (fused kernels and collectives one call "
                f"each). *Graph*: the static step a CUDA graph replays; *eager*: the step at an "
                f"int position. Collectives are counted apart (NCCL's own kernels). On gloo a "
                f"tensor-parallel all-reduce is the collective and the fused add + norm kernel "
                f"after it; on GPUs a decode step's all-reduce, add and norm are one kernel "
                f"(counted here as the collective, its norm as a kernel). A decode step's "
                f"products are Triton kernels (kernels.linear: one row by a GEMV, 2 to 16 by "
                f"rows_kernel), and SwiGLU's activation runs inside one of them (the "
                f"up-projection's epilogue for 2 to 16 rows, the down-projection's GEMV for "
                f"one); a GELU MLP's up-projection is cuBLASLt's GEMM with the GELU in its "
                f"epilogue, which may add split-K reductions and memsets on GPUs (profiler "
                f"counts: results/llama/README.md)."
                f"\n\n")
        f.write("| architecture | plan | ranks | graph kernels | eager kernels | collectives |\n")
        f.write("| --- | --- | --- | --- | --- | --- |\n")
        for r in rows:
            f.write(f"| {r['arch']} | {r['plan']} | {r['ranks']} | "
                    f"{r['static_kernels_per_layer']:g} | {r['decode_kernels_per_layer']:g} | "
                    f"{r['static_collectives_per_layer']:g} |\n")
        if profiled:
            f.write(_profiled_table(profiled, rows))
    return 0


def _profiled(path: str) -> list[dict]:
    """Per (model, plan): the kernels one decode layer adds to a CUDA graph
    replay, from bench --trace records at two layer counts (the busiest
    rank's profiled kernels, whose difference per layer drops the step's own
    embedding, masks, final norm and LM head)."""
    by = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r.get("phase") != "decode" or "trace" not in r:
                continue
            if any("kernels" not in rank for rank in r["trace"]["ranks"]):
                raise SystemExit(f"{path}: {r['model']} {r['plan']} was profiled on "
                                 f"{r['device']}, which counts no kernels; profile on a GPU")
            k = max(rank["kernels"] for rank in r["trace"]["ranks"])
            by.setdefault((r["model"], r["plan"]), {})[r["n_layers"]] = (k, r)
    out = []
    for (model, plan), runs in by.items():
        if len(runs) < 2:
            raise SystemExit(f"{path}: {model} {plan} was profiled at {len(runs)} layer "
                             f"count(s); a layer's count needs two")
        (l1, (k1, r)), (l2, (k2, _)) = sorted(runs.items())[:2]
        spec = r["model_spec"]
        arch = ("Mixtral-style" if spec.get("n_experts") else
                "Llama-style" if spec.get("norm") == "rmsnorm" else "GPT-style")
        out.append({"model": model, "arch": arch, "plan": plan, "ranks": r["n_devices"],
                    "graph_kernels_per_layer": (k2 - k1) / (l2 - l1),
                    "cuda_graphs": r.get("cuda_graphs"), "batch": r["batch"],
                    "layers": [l1, l2], "device": r["device"], "git_rev": r["git_rev"],
                    "command": r["command"]})
    return out


def _profiled_table(profiled: list[dict], rows: list[dict]) -> str:
    """The profiler's counts beside the CPU count of the same plan on the
    architecture of that model's features (experts, RMSNorm)."""
    cpu = {(r["arch"], r["plan"], r["ranks"]): r["static_kernels_per_layer"] for r in rows}
    p0 = profiled[0]
    text = (f"\n## Profiled on a GPU\n\nKernels one decode layer adds to a CUDA graph "
            f"replay on {p0['device']} at {p0['git_rev']} (batch {p0['batch']}), by "
            f"PyTorch's profiler: the busiest rank's kernels at {p0['layers'][1]} layers less "
            f"those at {p0['layers'][0]} (`{p0['command']}`, and the same at the other layer "
            f"count). Beside it the count above for the plan on the same architecture.\n\n"
            "| model | plan | graph kernels, profiler | graph kernels, CPU count |\n"
            "| --- | --- | --- | --- |\n")
    for p in profiled:  # a layerwise plan on one rank is one group, whatever its capacity
        plan = "layerwise:cap=100GB" if p["plan"].startswith("layerwise") else p["plan"]
        text += (f"| {p['model']} | {p['plan']} | {p['graph_kernels_per_layer']:g} | "
                 f"{cpu.get((p['arch'], plan, p['ranks']), '-')} |\n")
    return text


def _calls(rank: dict, phase: str) -> dict:
    """A rank's host calls of ``phase`` by kind (none where the strategy has no
    static step)."""
    return rank[phase]["calls"] if phase in rank else dict.fromkeys(CALL_KINDS, 0)


def _two_groups(spec: ModelSpec) -> str:
    """The layerwise plan whose partition is two equal groups on two ranks."""
    from shardwise.parallel.partition import PartitionError, layer_costs, partition

    L, half = spec.n_layers, spec.n_layers // 2
    costs = layer_costs(spec, WORKLOAD, WORKLOAD.batch)
    for cap in sorted({costs.group_bytes(i, j) for i in range(L) for j in range(i + 1, L + 1)}):
        try:
            part = partition(spec, WORKLOAD, cap, 2)
        except PartitionError:
            continue
        if [(g.layers.start, g.layers.stop) for g in part.groups] == [(0, half), (half, L)]:
            return f"layerwise:cap={cap}"
    raise RuntimeError(f"no capacity cuts {spec.name} into two equal groups")


if __name__ == "__main__":
    sys.exit(main())
