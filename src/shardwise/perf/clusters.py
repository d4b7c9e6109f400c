"""Cluster profiles: what a GPU and its links can do, as data.

A profile (``profiles/<name>.json``, or any path) describes identical GPUs,
``gpus_per_node`` to a node and ``nodes`` nodes, and what the cost model
needs of them: achieved matmul and attention rates, HBM bandwidth and size,
and for each link (``nvlink``: any two GPUs of one node; ``ib``: GPUs of
different nodes) and each collective, a latency (alpha) and a bus bandwidth
(beta), optionally as a table over message sizes. Every number says where it
comes from (``source``): a datasheet, public nccl-tests figures, or
``shardwise calibrate`` on a named machine.

Collective time follows the alpha-beta model (Hockney 1994) with the bus
bandwidth convention of nccl-tests (PERFORMANCE.md): for a message of S bytes
(the buffer for all-reduce, the gathered output for all-gather, the input for
reduce-scatter and all-to-all, the tensor for point-to-point: the same bytes
:class:`shardwise.parallel.comm.Comm` counts), on n ranks,

    t = alpha + factor(op, n) * S / busbw(S)

with factor 2(n-1)/n for all-reduce (ring), (n-1)/n for all-gather,
reduce-scatter and all-to-all, 1 for point-to-point. Placement is the
launcher's: global rank r sits on node r // gpus_per_node.
"""
from __future__ import annotations

import bisect
import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources

from ..spec import ShardwiseError

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p")
LINKS = ("nvlink", "ib")


def bus_factor(op: str, n: int) -> float:
    """Bytes each rank moves per payload byte (nccl-tests' bus bandwidth factor)."""
    if op == "p2p":
        return 1.0
    if n <= 1:
        return 0.0
    if op == "all_reduce":
        return 2 * (n - 1) / n
    if op in ("all_gather", "reduce_scatter", "all_to_all"):
        return (n - 1) / n
    raise ShardwiseError(f"unknown collective {op!r}; one of {', '.join(COLLECTIVES)}")


@dataclass(frozen=True)
class LinkCost:
    """One collective on one link: ``latency_us`` and bus bandwidth in GB/s,
    either one figure or a table ``[[bytes, GB/s], ...]`` interpolated
    linearly in log(bytes) and held flat past either end."""

    latency_us: float
    busbw_gbps: float | None = None
    table: tuple[tuple[float, float], ...] = ()

    def busbw(self, nbytes: float) -> float:
        """Bus bandwidth in bytes/s for a message of ``nbytes``."""
        if not self.table:
            return self.busbw_gbps * 1e9
        sizes = [s for s, _ in self.table]
        if nbytes <= sizes[0]:
            return self.table[0][1] * 1e9
        if nbytes >= sizes[-1]:
            return self.table[-1][1] * 1e9
        i = bisect.bisect_right(sizes, nbytes)
        (s0, b0), (s1, b1) = self.table[i - 1], self.table[i]
        w = (math.log(nbytes) - math.log(s0)) / (math.log(s1) - math.log(s0))
        return (b0 + w * (b1 - b0)) * 1e9

    def time(self, op: str, nbytes: float, n: int) -> float:
        if nbytes <= 0 or (op != "p2p" and n <= 1):
            return 0.0
        return self.latency_us * 1e-6 + bus_factor(op, n) * nbytes / self.busbw(nbytes)


@dataclass(frozen=True)
class Cluster:
    name: str
    gpus_per_node: int
    nodes: int
    matmul_tflops: dict[str, float]  # achieved, by dtype
    attention_tflops: dict[str, float]  # "head_dim<=256", "head_dim>256"
    hbm_gbps: float  # achieved (device copy)
    hbm_bytes: int  # memory per GPU
    l2_bytes: int
    links: dict[str, dict[str, LinkCost]]
    launch_us: float = 0.0  # host cost of one kernel launched eagerly
    source: dict = field(default_factory=dict)
    device: str = ""

    @property
    def n_gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    # -- rates ------------------------------------------------------------
    def matmul_rate(self, dtype: str) -> float:
        key = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}.get(dtype, dtype)
        if key not in self.matmul_tflops:
            raise ShardwiseError(f"cluster {self.name} has no matmul rate for {dtype}; it has "
                                 f"{', '.join(self.matmul_tflops)} (calibrate with --dtype {dtype})")
        return self.matmul_tflops[key] * 1e12

    def attention_rate(self, head_dim: int, dtype: str) -> float:
        """Fused attention rate: fused (flash) kernels stop at head_dim 256,
        past it a slower kernel runs. A profile without attention rates uses
        the matmul rate. Scaled with the dtype's matmul rate relative to bf16."""
        key = "head_dim<=256" if head_dim <= 256 else "head_dim>256"
        base = self.attention_tflops.get(key)
        if base is None:
            return self.matmul_rate(dtype)
        ref = self.matmul_tflops.get(self.attention_tflops.get("dtype", "bf16"))
        scale = self.matmul_rate(dtype) / (ref * 1e12) if ref else 1.0
        return base * 1e12 * min(1.0, scale)

    @property
    def hbm_rate(self) -> float:
        return self.hbm_gbps * 1e9

    # -- links ------------------------------------------------------------
    def node_of(self, rank: int) -> int:
        return rank // self.gpus_per_node

    def link(self, name: str, op: str) -> LinkCost:
        try:
            return self.links[name][op]
        except KeyError:
            raise ShardwiseError(f"cluster {self.name} has no {op} figures for link {name!r}; "
                                 f"its links: {', '.join(self.links)}") from None

    def collective_time(self, op: str, nbytes: float, ranks: list[int]) -> tuple[float, str]:
        """(seconds, link) of one collective of ``nbytes`` (payload as Comm
        counts it) over the global ``ranks``.

        Inside a node: the nvlink figures. A group that spans nodes pays the
        slower link: ring collectives (all-reduce, all-gather, reduce-scatter)
        run NCCL channels through the NICs of the group's GPUs in parallel, so
        their bus bandwidth is the smaller of NVLink's and (group GPUs per
        node) x the per-GPU InfiniBand figure; an all-to-all sends each rank's
        share for other nodes through its own NIC while the on-node share
        crosses NVLink; point-to-point between nodes is the NIC's."""
        n = len(ranks)
        if nbytes <= 0 or n <= 1:
            return 0.0, "-"
        nodes = {self.node_of(r) for r in ranks}
        if len(nodes) == 1:
            return self.link("nvlink", op).time(op, nbytes, n), "nvlink"
        nv, ib = self.link("nvlink", op), self.link("ib", op)
        if op == "p2p":
            return ib.time(op, nbytes, 2), "ib"
        per_node = max(sum(1 for r in ranks if self.node_of(r) == k) for k in nodes)
        if op == "all_to_all":
            remote = (n - per_node) / n  # share of a rank's payload leaving its node
            local = (per_node - 1) / n
            t = max(local * nbytes / nv.busbw(nbytes), remote * nbytes / ib.busbw(nbytes))
            return max(nv.latency_us, ib.latency_us) * 1e-6 + t, "ib"
        bw = min(nv.busbw(nbytes), per_node * ib.busbw(nbytes))
        t = max(nv.latency_us, ib.latency_us) * 1e-6 + bus_factor(op, n) * nbytes / bw
        return t, "ib"

    def p2p_time(self, nbytes: float, src: int, dst: int) -> tuple[float, str]:
        if nbytes <= 0 or src == dst:
            return 0.0, "-"
        name = "nvlink" if self.node_of(src) == self.node_of(dst) else "ib"
        return self.link(name, "p2p").time("p2p", nbytes, 2), name

    # -- (de)serialisation ---------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict) -> "Cluster":
        try:
            links = {
                name: {op: LinkCost(float(c["latency_us"]), c.get("busbw_gbps"),
                                    tuple((float(s), float(b)) for s, b in c.get("table", ())))
                       for op, c in ops.items()}
                for name, ops in d["links"].items()
            }
            out = cls(
                name=d["name"], gpus_per_node=int(d["gpus_per_node"]), nodes=int(d["nodes"]),
                matmul_tflops={k: float(v) for k, v in d["matmul_tflops"].items()},
                attention_tflops={k: (v if k == "dtype" else float(v))
                                  for k, v in d.get("attention_tflops", {}).items()},
                hbm_gbps=float(d["hbm_gbps"]), hbm_bytes=int(d["hbm_bytes"]),
                l2_bytes=int(d.get("l2_bytes", 0)), links=links,
                launch_us=float(d.get("launch_us", 0.0)), source=d.get("source", {}),
                device=d.get("device", ""),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ShardwiseError(f"cluster profile {d.get('name', '?')!r} is malformed: {e!r}") from None
        out.check()
        return out

    def check(self) -> None:
        problems = []
        if self.gpus_per_node < 1 or self.nodes < 1:
            problems.append("gpus_per_node and nodes must be >= 1")
        if "nvlink" not in self.links and self.n_gpus > 1:
            problems.append("a profile of several GPUs needs link 'nvlink' (inside a node)")
        if self.nodes > 1 and "ib" not in self.links:
            problems.append("a profile of several nodes needs link 'ib' (across nodes)")
        for name, ops in self.links.items():
            for op, c in ops.items():
                if op not in COLLECTIVES:
                    problems.append(f"link {name}: unknown collective {op!r}")
                if c.busbw_gbps is None and not c.table:
                    problems.append(f"link {name} {op}: give busbw_gbps or a table")
                if c.table and any(b <= 0 for _, b in c.table) or (c.busbw_gbps or 1) <= 0:
                    problems.append(f"link {name} {op}: bandwidths must be > 0")
        if problems:
            raise ShardwiseError(f"cluster profile {self.name!r}: " + "; ".join(problems))


def available_clusters() -> list[str]:
    folder = resources.files("shardwise.perf") / "profiles"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def load_cluster(name_or_path: str) -> Cluster:
    """A packaged profile by name (``h100-sxm-16``) or a JSON file by path."""
    if os.path.exists(name_or_path):
        with open(name_or_path) as f:
            return Cluster.from_dict(json.load(f))
    path = resources.files("shardwise.perf") / "profiles" / f"{name_or_path}.json"
    if not path.is_file():
        raise ShardwiseError(f"unknown cluster {name_or_path!r}: no such file, and no packaged "
                             f"profile of that name; choose one of "
                             f"{', '.join(available_clusters())} or write one with "
                             f"`shardwise calibrate`")
    return Cluster.from_dict(json.loads(path.read_text()))
