"""Multi-GPU H100 profiles from one calibrated H100 and cited link figures.

    python scripts/derive-clusters.py --from results/profiles/h100-x1.json \
        --out-dir src/shardwise/perf/profiles

writes ``h100-sxm-8`` (one node of 8), ``h100-sxm-16`` (2 nodes x 8) and
``h100-sxm-64`` (8 nodes x 8). What one GPU does alone (GEMM grid and rates,
attention, device copy and streaming, host costs per call kind, kernel and
graph costs, the decode kernel probes, the layer probe: every figure of
``shardwise calibrate`` on one H100) is copied unchanged from ``--from``. What
one GPU cannot measure comes from elsewhere, and each profile's ``source``
says which figure came from where:

* the links (``nvlink`` inside a node, ``ib`` across nodes): public figures,
  cited below (:data:`LINKS`), as a latency and one bus bandwidth per
  collective (the alpha-beta form ``perf/links.py`` reads);
* the figures of collectives that need two GPUs to measure (an eager
  collective call's host time, a small collective's latency inside a CUDA
  graph, the share of a collective hidden beside compute): from
  ``--collectives-from``, the calibrated 2x H200 profile (NVLink, the same
  GH100 compute die and clocks).

Regenerate after re-calibrating; never edit the written profiles by hand.
"""
import argparse
import json
import os

from shardwise.perf.clusters import Cluster

# The cluster shapes written: name -> (nodes, GPUs per node).
SHAPES = {"h100-sxm-8": (1, 8), "h100-sxm-16": (2, 8), "h100-sxm-64": (8, 8)}

# Keys of a calibrated profile that describe the machine it ran on, not one GPU.
MACHINE_KEYS = ("name", "gpus_per_node", "nodes", "links", "source")

# Figures of a multi-GPU calibration that a single GPU lacks.
COLLECTIVE_KEYS = ("collective_us", "graph_latency_us", "graph_collective_us",
                   "overlap_efficiency")

# Link figures, per collective: (latency in us, bus bandwidth in GB/s).
LINKS = {
    "nvlink": {"all_reduce": (30.0, 370.0), "all_gather": (25.0, 360.0),
               "reduce_scatter": (25.0, 360.0), "all_to_all": (30.0, 330.0),
               "p2p": (20.0, 370.0)},
    "ib": {"all_reduce": (40.0, 45.0), "all_gather": (35.0, 45.0),
           "reduce_scatter": (35.0, 45.0), "all_to_all": (40.0, 42.0),
           "p2p": (25.0, 45.0)},
}
CITED = {
    "nvlink": "Cited, not measured: NVLink 4 through NVSwitch, 900 GB/s per GPU (both "
              "directions, H100 SXM datasheet). Bus bandwidths are public nccl-tests figures "
              "for 8 x H100 SXM at large messages (all-reduce ~360-450 GB/s; the lower end "
              "without NVLS): all-reduce 370, all-gather and reduce-scatter 360, all-to-all "
              "330, point-to-point 370 GB/s. Latencies are NCCL small-message latency "
              "(~10-20 us) plus PyTorch's eager launch, ~25-30 us a collective (eager small "
              "all-reduces of 40-50 us were measured on H200 NVLink with torch 2.11, ~10 us "
              "inside a CUDA graph).",
    "ib": "Cited, not measured: one 400 Gb/s InfiniBand NDR NIC per GPU = 50 GB/s per "
          "direction; NCCL reaches ~0.85-0.9 of line rate at large messages: 45 GB/s per GPU "
          "(42 for all-to-all; figures are per GPU: a group with k GPUs per node drives k "
          "NICs). Latency: ~5 us network + NCCL proxy + eager launch, ~25-40 us.",
}


def links() -> dict:
    return {name: {op: {"latency_us": lat, "busbw_gbps": bw} for op, (lat, bw) in ops.items()}
            for name, ops in LINKS.items()}


def derive(gpu: dict, gpu_path: str, multi: dict, multi_path: str, name: str, nodes: int,
           per_node: int, command: str) -> dict:
    per_gpu = {k: v for k, v in gpu.items() if k not in MACHINE_KEYS}
    from_multi = {k: multi[k] for k in COLLECTIVE_KEYS if k in multi}
    lacking = [k for k in COLLECTIVE_KEYS if k not in multi]
    gpu_summary, multi_summary = gpu["source"]["summary"], multi["source"]["summary"]
    source = {
        "summary": f"Derived by `{command}`: {nodes} node(s) x {per_node} GPUs; every per-GPU "
                   f"figure measured on one H100 ({gpu_path}: {gpu_summary}); collective "
                   f"figures that need two GPUs measured on 2x H200 NVLink ({multi_path}: "
                   f"{multi_summary}); the links cited from public figures.",
        "command": command,
        "measured": f"From {gpu_path} ({gpu_summary}, torch {gpu['source'].get('torch', '?')}), "
                    f"unchanged: " + ", ".join(sorted(per_gpu)) + ".",
        "collectives": f"From {multi_path} ({multi_summary}), unchanged: "
                       + ", ".join(sorted(from_multi))
                       + ". Measured on two H200 of one node (NVLink; the same GH100 compute "
                         "die and clocks as H100 SXM); a one-GPU calibration cannot measure "
                         "them. The eager calls' host times are the H200 host's (its op_us "
                       + f"{multi.get('op_us')} us against {gpu.get('op_us')} us here); the "
                         "in-graph latency and the overlap are those of 2 GPUs on NVLink, "
                         "taken for every group size and for groups across nodes alike."
                       + (f" Absent there, so absent here (the cost model's defaults apply): "
                          + ", ".join(lacking) + "." if lacking else ""),
        **CITED,
    }
    return {"name": name, "device": gpu["device"], "gpus_per_node": per_node, "nodes": nodes,
            **per_gpu, **from_multi,
            "links": {k: v for k, v in links().items() if k == "nvlink" or nodes > 1},
            "source": source}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--from", dest="source", required=True,
                    help="a profile that `shardwise calibrate` wrote on one H100")
    ap.add_argument("--out-dir", required=True, help="where to write the profiles")
    ap.add_argument("--collectives-from", default="src/shardwise/perf/profiles/h200-x2.json",
                    help="a calibrated profile of two or more GPUs on NVLink, for "
                         + ", ".join(COLLECTIVE_KEYS))
    args = ap.parse_args()
    with open(args.source) as f:
        gpu = json.load(f)
    with open(args.collectives_from) as f:
        multi = json.load(f)
    if gpu.get("gpus_per_node", 1) * gpu.get("nodes", 1) != 1:
        raise SystemExit(f"{args.source} is a profile of several GPUs; give one calibrated on "
                         f"one GPU")
    if multi.get("gpus_per_node", 1) * multi.get("nodes", 1) < 2:
        raise SystemExit(f"{args.collectives_from} is a one-GPU profile; give one calibrated "
                         f"on two or more GPUs")
    command = (f"python scripts/derive-clusters.py --from {args.source} --out-dir "
               f"{args.out_dir} --collectives-from {args.collectives_from}")
    os.makedirs(args.out_dir, exist_ok=True)
    for name, (nodes, per_node) in SHAPES.items():
        profile = derive(gpu, args.source, multi, args.collectives_from, name, nodes, per_node,
                         command)
        Cluster.from_dict(profile)  # refuses a malformed profile before it is written
        path = os.path.join(args.out_dir, f"{name}.json")
        with open(path, "w") as f:
            json.dump(profile, f, indent=2)
            f.write("\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
