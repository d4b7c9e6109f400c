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

import json
import math
import os
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources

from ..spec import ShardwiseError
from .interp import grid_rate, log_interp, piecewise
from .links import COLLECTIVES, LinkCost, bus_factor

_DTYPE_KEYS = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


def _seconds(us: float | None, otherwise_s: float) -> float:
    """A profile figure in microseconds as seconds, or ``otherwise_s`` without one."""
    return 1e-6 * us if us is not None else otherwise_s


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
    launch_us: float = 0.0  # host cost of one eager call, every kind alike (older profiles)
    source: dict = field(default_factory=dict)
    device: str = ""
    # Optional figures (absent from older profiles; each has a documented default,
    # see docs/costmodel.md "Profiles"):
    stream_gbps: float | None = None  # read-bound streaming (GEMV, decode attention)
    flash_tflops: float | None = None  # FlashAttention-2 kernel called directly (bf16/fp16, d<=256)
    # shardwise's flash kernel for wide heads (model/flash.py), causal, by head_dim: {"256": TFLOP/s, ...}
    wide_attention_tflops: dict = field(default_factory=dict)
    kernel_us: float | None = None  # GPU time of a tiny kernel in a stream / CUDA graph
    graph_latency_us: float | None = None  # small collective captured in a CUDA graph
    graph_collective_us: dict = field(default_factory=dict)  # op -> us, the same by kind
    matmul_shapes: dict = field(default_factory=dict)  # dtype -> [(m, k, n, TFLOP/s)] measured
    # dtype -> {"m", "k", "n": the grid's axes, "tflops": [m][k][n] (null: not timed)}
    gemm_grid: dict = field(default_factory=dict)
    sustained_matmul_tflops: float | None = None  # after ~2 s of back-to-back GEMMs
    # Host side of eager work, per call, on the slowest rank (calibrate measures
    # every rank): an op that launches a kernel, one that launches none (a view,
    # an allocation), an nn.Module call's own overhead, a device-to-host read
    # with the device idle, and an eager collective call by kind.
    op_us: float | None = None
    view_us: float | None = None
    module_us: float | None = None
    sync_us: float | None = None
    collective_us: dict = field(default_factory=dict)  # op -> us (COLLECTIVES)
    # The host call of a GEMM and of an attention (per phase: "prefill",
    # "decode"), which cost more than op_us (cuBLASLt heuristics, SDPA's
    # backend choice, cuDNN's plan cache); and the GPU time of the smallest
    # GEMM and decode attention kernels, which take longer than kernel_us.
    gemm_us: float | None = None
    attn_us: dict = field(default_factory=dict)
    norm_us: float | None = None  # the fused residual-add + norm's call (a Triton launch)
    gemm_kernel_us: float | None = None
    attn_kernel_us: float | None = None
    # calibrate's decode kernel probes (graph replays of 16 rows, widths 512 to
    # 4096): {"norm": {D: us}, "cache_write": {D: us}, "gemm": {"KxN": us}};
    # the cost model's graph decode reads them (decode_gemm_s and the others).
    decode_kernels_us: dict = field(default_factory=dict)
    # calibrate's eager layer probe (a decode step of a tiny reference layer,
    # timed back to back): {"us": one layer's time, "calls": its calls by kind}.
    layer_probe: dict = field(default_factory=dict)
    overlap_efficiency: float | None = None  # share of a collective hidden beside compute
    step_host_ratio: float | None = None  # host time of a step started from a wait / back to back

    # Defaults: measured on 2x H200 (docs/shared DESIGN.md section 5) or published.
    STREAM_OF_COPY = 3.9 / 4.2  # 1-token GEMV weight streaming 3.9 TB/s vs device copy 4.2
    FLASH2_TFLOPS = 330.0  # FlashAttention-2 forward, head_dim 128, H100 SXM (Shah et al. 2024)
    KERNEL_US = 2.0  # a dependent tiny kernel on Hopper: launch latency + one HBM round trip
    GRAPH_LATENCY_US = 10.0  # 8 KB all-reduce inside a CUDA graph, 2x H200 (vs ~40 eager)
    FP32_OF_BF16 = 67 / 989  # H100 SXM datasheet: FP32 67 TFLOP/s, dense BF16 989

    @property
    def n_gpus(self) -> int:
        return self.gpus_per_node * self.nodes

    # -- rates ------------------------------------------------------------
    def matmul_rate(self, dtype: str) -> float:
        """Achieved matmul rate in ``dtype``. A GPU profile measures the half
        precisions; a float32 matmul of a half-precision model (the MoE
        router's scores) runs on the CUDA cores, at the bf16 rate x
        ``FP32_OF_BF16`` where the profile has no float32 figure."""
        key = _DTYPE_KEYS.get(dtype, dtype)
        if key not in self.matmul_tflops:
            if key == "fp32" and "bf16" in self.matmul_tflops:
                return self.matmul_tflops["bf16"] * 1e12 * self.FP32_OF_BF16
            have = list(self.matmul_tflops)
            raise ShardwiseError(f"cluster {self.name} has no matmul rate for {dtype}; it has "
                                 f"{', '.join(have)}: use --dtype {have[0]}, or a profile that "
                                 f"shardwise calibrate measured on a device that runs {dtype}")
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

    def wide_attention_rate(self, head_dim: int, dtype: str) -> float | None:
        """shardwise's flash kernel for wide heads (``model/flash.py``) at this
        head_dim in half precision, as calibrate measured it (bf16; fp16
        scaled like :meth:`attention_rate`); None where the profile has no
        figure for it (the cost model then charges PyTorch's kernels)."""
        base = self.wide_attention_tflops.get(str(head_dim))
        if base is None or dtype not in ("bf16", "fp16", "bfloat16", "float16"):
            return None
        ref = self.matmul_tflops.get(self.wide_attention_tflops.get("dtype", "bf16"))
        scale = self.matmul_rate(dtype) / (ref * 1e12) if ref else 1.0
        return float(base) * 1e12 * min(1.0, scale)

    @property
    def hbm_rate(self) -> float:
        return self.hbm_gbps * 1e9

    @property
    def stream_rate(self) -> float:
        """Bytes/s of a read-dominated stream (weights of a GEMV, a decode step's
        KV cache): ``stream_gbps``, else the device copy x 3.9/4.2 (the ratio
        measured on H200: GEMV weight streaming 3.9 TB/s, copy 4.2 TB/s)."""
        if self.stream_gbps:
            return self.stream_gbps * 1e9
        return self.hbm_rate * self.STREAM_OF_COPY

    def flash_rate(self, dtype: str) -> float:
        """FlashAttention-2 called directly (``aten._scaled_dot_product_flash_attention``,
        as ring's and helix's ``attend_lse`` do, and SDPA when cuDNN is excluded):
        ``flash_tflops``, else 330 TFLOP/s (FA2 forward at head_dim 128 on H100 SXM,
        the FlashAttention-3 paper's baseline; H200 has the same SMs and clocks),
        never above the profile's SDPA rate. Scaled like :meth:`attention_rate`."""
        sdpa = self.attention_rate(128, dtype)
        if "head_dim<=256" not in self.attention_tflops:
            return sdpa
        base = (self.flash_tflops or self.FLASH2_TFLOPS) * 1e12
        ref = self.matmul_tflops.get(self.attention_tflops.get("dtype", "bf16"))
        scale = self.matmul_rate(dtype) / (ref * 1e12) if ref else 1.0
        return min(sdpa, base * min(1.0, scale))

    @property
    def kernel_s(self) -> float:
        """GPU time of one small kernel (its launch latency and tail), in a stream
        or replayed from a CUDA graph: ``kernel_us``, else 2 us."""
        return _seconds(self.kernel_us, 1e-6 * self.KERNEL_US)

    @property
    def graph_latency_s(self) -> float:
        """Latency of a small collective captured in a CUDA graph (no host work):
        ``graph_latency_us``, else 10 us (measured on 2x H200, DESIGN.md section 5)."""
        return _seconds(self.graph_latency_us, 1e-6 * self.GRAPH_LATENCY_US)

    def collective_kernel_s(self, op: str) -> float:
        """Latency of one small collective of kind ``op`` on the device (a CUDA
        graph of 20, no host work): ``graph_collective_us[op]``, else
        :attr:`graph_latency_s` (the all-reduce's). In graphs on 2x H200 a
        reduce-scatter or all-gather kernel took 5 to 8 us with gaps of 2 to 6
        us around it (results/diag/traces-graphs.tgz)."""
        us = self.graph_collective_us.get(op)
        return self.graph_latency_s if us is None else 1e-6 * us

    # -- host costs of eager work --------------------------------------------
    @property
    def gemm_s(self) -> float:
        """Host seconds of a GEMM call: ``gemm_us``, else :attr:`op_s`."""
        return _seconds(self.gemm_us, self.op_s)

    @property
    def norm_s(self) -> float:
        """Host seconds of a fused add + norm call: ``norm_us``, else :attr:`op_s`."""
        return _seconds(self.norm_us, self.op_s)

    def attn_s(self, decoding: bool) -> float:
        """Host seconds of an attention call in a prefill or decode step:
        ``attn_us`` of the phase, else :attr:`op_s`."""
        return _seconds(self.attn_us.get("decode" if decoding else "prefill"), self.op_s)

    @property
    def gemm_kernel_s(self) -> float:
        """GPU seconds of the smallest GEMM kernel: ``gemm_kernel_us``, else :attr:`kernel_s`."""
        return _seconds(self.gemm_kernel_us, self.kernel_s)

    # -- decode kernels replayed from a CUDA graph (calibrate's probes) ----------
    def decode_gemm_s(self, k: int, n: int, nbytes: float) -> float | None:
        """GPU seconds of a decode GEMM ``[rows x k] @ [k x n]`` (``nbytes`` of
        weight) in a CUDA graph, from calibrate's probes (16 rows, bf16), or
        None without them. Among the probes of one inner width ``k`` the time
        is piecewise linear in the weight's bytes (past the largest, the extra
        bytes at the streaming rate; below the smallest, the same slope, down
        to the fastest probe); between probed ``k`` linear in log k, beyond
        them the nearest's. The inner width matters on its own: a 2048 x 512
        GEMM took 5.3 us against 3.4 us for 512 x 2048 on 2x H200 (deeper
        reductions per output tile)."""
        table = self.decode_kernels_us.get("gemm")
        if not table:
            return None
        by_k: dict[int, list[tuple[float, float]]] = {}
        for shape, us in table.items():
            kk, nn = (int(x) for x in shape.split("x"))
            by_k.setdefault(kk, []).append((2.0 * kk * nn, 1e-6 * us))
        floor = min(t for pts in by_k.values() for _, t in pts)

        def at(kk: int) -> float:
            pts = sorted(by_k[kk])
            return piecewise(pts, nbytes, self.stream_rate, floor)

        ks = sorted(by_k)
        return log_interp([(kk, at(kk)) for kk in ks], k)

    def decode_norm_s(self, d: int) -> float | None:
        """GPU seconds of the fused add + norm over rows of width ``d`` in a CUDA
        graph (calibrate's probe of 16 rows; linear in log d between probed
        widths, the nearest's beyond them), or None without the probe."""
        table = self.decode_kernels_us.get("norm")
        if not table:
            return None
        return log_interp(sorted((int(w), 1e-6 * us) for w, us in table.items()), d)

    def decode_cache_write_s(self, nbytes: float) -> float | None:
        """GPU seconds of a decode step's packed K/V cache write of ``nbytes``
        (K and V) in a CUDA graph: calibrate's probe (16 sequences, width D,
        so 64 D bytes in bf16) at the same bytes, linear in log bytes between
        probes, the nearest's beyond them; None without the probe."""
        table = self.decode_kernels_us.get("cache_write")
        if not table:
            return None
        return log_interp(sorted((64 * int(w), 1e-6 * us) for w, us in table.items()),
                           nbytes)

    @property
    def attn_kernel_s(self) -> float:
        """GPU seconds of the smallest attention kernel: ``attn_kernel_us``, else :attr:`kernel_s`."""
        return _seconds(self.attn_kernel_us, self.kernel_s)

    @property
    def op_s(self) -> float:
        """Host time of one eager op that launches a kernel, called from Python
        (dispatcher, allocation, launch): ``op_us``, else ``launch_us`` (older
        profiles charge every call alike)."""
        return _seconds(self.op_us, 1e-6 * self.launch_us)

    @property
    def view_s(self) -> float:
        """Host time of an eager op that launches no kernel (a view, a reshape
        that needs no copy, an allocation): ``view_us``, else ``launch_us``."""
        return _seconds(self.view_us, 1e-6 * self.launch_us)

    @property
    def module_s(self) -> float:
        """An nn.Module call's own host time (beyond what its forward calls):
        ``module_us``, else ``launch_us``."""
        return _seconds(self.module_us, 1e-6 * self.launch_us)

    @property
    def sync_s(self) -> float:
        """A device-to-host read (``nonzero``, ``.item()``, ``.cpu()``) with the
        device idle: the copy's call and the host's wait for it. ``sync_us``,
        else two eager ops' host time (the copy call, then the wait and the
        result's return, each about one call)."""
        return _seconds(self.sync_us, 2 * self.op_s)

    def collective_host_s(self, op: str, link: str = "nvlink") -> float:
        """Host time of one eager call of collective ``op`` (``p2p``: one batched
        send/receive call): ``collective_us[op]``, else the link's latency for
        ``op`` (the time of the smallest message called back to back: host-bound,
        so an upper bound of the call's host time), else ``launch_us``."""
        if op in self.collective_us:
            return 1e-6 * self.collective_us[op]
        ops = self.links.get(link) or next(iter(self.links.values()), {})
        if op in ops:
            return 1e-6 * ops[op].latency_us
        return 1e-6 * self.launch_us

    @property
    def step_host(self) -> float:
        """Host time of an eager step as ``shardwise bench`` runs it (each step
        after a barrier and a device synchronisation, the host starting from a
        wait) over the same calls back to back, where the per-call figures are
        measured: ``step_host_ratio``, else 1."""
        return max(1.0, self.step_host_ratio) if self.step_host_ratio else 1.0

    @cached_property
    def host_scale(self) -> float:
        """How much longer a real layer's host work takes than the sum of its
        calls' per-call figures: the layer probe's measured time over its
        counted calls at those figures (>= 1; 1 without a probe). The per-call
        loops run tiny ops back to back; a layer also runs the Python between
        its calls, and the host's speed at calibration time is in both."""
        us, calls = self.layer_probe.get("us"), self.layer_probe.get("calls")
        if not us or not calls or self.op_us is None:
            return 1.0
        g, a = calls.get("gemms", 0.0), calls.get("attns", 0.0)
        n = calls.get("tritons", calls.get("norms", 0.0))  # Triton launches (older: "norms")
        modelled = 1e6 * ((calls.get("kernels", 0.0) - g - a - n) * self.op_s + g * self.gemm_s
                          + a * self.attn_s(True) + n * self.norm_s
                          + calls.get("metas", 0.0) * self.view_s
                          + calls.get("modules", 0.0) * self.module_s)
        return max(1.0, us / modelled) if modelled > 0 else 1.0

    @property
    def overlap(self) -> float:
        """Share of a collective's time hidden when it runs beside compute on
        another stream (its kernels take SMs and memory bandwidth, so the
        compute slows by the rest): ``overlap_efficiency`` as calibrate
        measures it, else 1 (fully hidden, what earlier versions assumed)."""
        if self.overlap_efficiency is None:
            return 1.0
        return min(1.0, max(0.0, self.overlap_efficiency))

    @property
    def sustained_ratio(self) -> float:
        """Compute rate held over a long run / the burst rate the profile's
        matmul and attention figures were measured at (<= 1): from
        ``sustained_matmul_tflops`` when calibrated, else 1 (no derating: older
        profiles do not say)."""
        burst = self.matmul_tflops.get("bf16") or next(iter(self.matmul_tflops.values()), None)
        if not self.sustained_matmul_tflops or not burst:
            return 1.0
        return min(1.0, self.sustained_matmul_tflops / burst)

    def gemm_rate(self, dtype: str, k: int, n: int, m: float | None = None) -> float:
        """Matmul rate for ``m`` rows (None: the grid's largest), inner size k and
        output width n: interpolated in the calibrated grid (``gemm_grid``),
        linearly in (log m, log k, log n) between its points and held at its
        edges; a profile without a grid takes the measured shape nearest in
        those logarithms (``measurements.matmul``), else its single figure."""
        key = _DTYPE_KEYS.get(dtype, dtype)
        grid = self.gemm_grid.get(key)
        if grid and k > 0 and n > 0:
            return grid_rate(grid, m or grid["m"][-1], k, n) * 1e12
        shapes = self.matmul_shapes.get(key)
        if not shapes or k <= 0 or n <= 0:
            return self.matmul_rate(dtype)
        rows = (lambda s: abs(math.log(s[0] / m))) if m and m > 0 else (lambda s: 0.0)
        best = min(shapes, key=lambda s: abs(math.log(s[1] / k)) + abs(math.log(s[2] / n)) + rows(s))
        return best[3] * 1e12

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
                stream_gbps=_opt(d, "stream_gbps"), flash_tflops=_opt(d, "flash_tflops"),
                wide_attention_tflops={k: (v if k == "dtype" else float(v))
                                       for k, v in d.get("wide_attention_tflops", {}).items()},
                kernel_us=_opt(d, "kernel_us"), graph_latency_us=_opt(d, "graph_latency_us"),
                graph_collective_us={k: float(v)
                                     for k, v in d.get("graph_collective_us", {}).items()},
                sustained_matmul_tflops=_opt(d, "sustained_matmul_tflops"),
                op_us=_opt(d, "op_us"), view_us=_opt(d, "view_us"),
                module_us=_opt(d, "module_us"), sync_us=_opt(d, "sync_us"),
                collective_us={k: float(v) for k, v in d.get("collective_us", {}).items()},
                gemm_us=_opt(d, "gemm_us"), norm_us=_opt(d, "norm_us"),
                attn_us={k: float(v) for k, v in d.get("attn_us", {}).items()},
                gemm_kernel_us=_opt(d, "gemm_kernel_us"), attn_kernel_us=_opt(d, "attn_kernel_us"),
                decode_kernels_us={kind: {str(k): float(v) for k, v in table.items()}
                                   for kind, table in d.get("decode_kernels_us", {}).items()},
                layer_probe=dict(d.get("measurements", {}).get("layer_probe", {})),
                overlap_efficiency=_opt(d, "overlap_efficiency"),
                step_host_ratio=_opt(d, "step_host_ratio"),
                gemm_grid={dt: {"m": [int(v) for v in g["m"]], "k": [int(v) for v in g["k"]],
                                "n": [int(v) for v in g["n"]],
                                "tflops": [[[None if v is None else float(v) for v in row]
                                            for row in plane] for plane in g["tflops"]]}
                           for dt, g in d.get("gemm_grid", {}).items()},
                matmul_shapes={dt: [(int(x["m"]), int(x["k"]), int(x["n"]), float(x["tflops"]))
                                    for x in rows]
                               for dt, rows in d.get("measurements", {}).get("matmul", {}).items()},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as e:
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
        for op in self.collective_us:
            if op not in COLLECTIVES:
                problems.append(f"collective_us: unknown collective {op!r}")
        for dt, g in self.gemm_grid.items():
            sizes = [len(g["m"]), len(g["k"]), len(g["n"])]
            shape = [len(g["tflops"]), *(len(x) for x in g["tflops"][:1]),
                     *(len(x) for x in g["tflops"][0][:1])] if g["tflops"] else [0]
            if shape != sizes or any(sorted(g[a]) != g[a] or min(g[a]) <= 0 for a in "mkn"):
                problems.append(f"gemm_grid[{dt!r}]: tflops must be [m][k][n] over increasing "
                                f"positive axes (axes {sizes}, table {shape})")
        for op in self.graph_collective_us:
            if op not in COLLECTIVES:
                problems.append(f"graph_collective_us: unknown collective {op!r}")
        for kind, table in self.decode_kernels_us.items():
            for key in table:
                parts = key.split("x") if kind == "gemm" else [key]
                if not all(p.isdigit() and int(p) > 0 for p in parts) or len(parts) != (
                        2 if kind == "gemm" else 1):
                    problems.append(f"decode_kernels_us[{kind!r}]: {key!r} is not "
                                    + ("K x N, e.g. '512x1536'" if kind == "gemm"
                                       else "a width, e.g. '512'"))
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


def _opt(d: dict, key: str) -> float | None:
    return float(d[key]) if d.get(key) is not None else None


def available_clusters() -> list[str]:
    folder = resources.files("shardwise.perf") / "profiles"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".json"))


def _profile_json(path: str) -> dict:
    """A profile file's JSON object; a file that is not one is refused in one line."""
    try:
        with open(path) as f:
            d = json.load(f)
    except IsADirectoryError:
        raise ShardwiseError(f"cluster profile {path} is a directory; give a profile JSON "
                             f"file (written by `shardwise calibrate`) or a profile name") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ShardwiseError(f"cluster profile {path} cannot be read ({e})") from None
    except ValueError as e:
        raise ShardwiseError(f"cluster profile {path} is not JSON ({e}); give a profile "
                             f"written by `shardwise calibrate` or a profile name") from None
    if not isinstance(d, dict):
        raise ShardwiseError(f"cluster profile {path} holds a JSON {type(d).__name__}, not a "
                             f"profile object")
    return d


def load_cluster(name_or_path: str) -> Cluster:
    """A packaged profile by name (``h100-sxm-16``) or a JSON file by path."""
    if os.path.exists(name_or_path):
        return Cluster.from_dict(_profile_json(name_or_path))
    path = resources.files("shardwise.perf") / "profiles" / f"{name_or_path}.json"
    if not path.is_file():
        raise ShardwiseError(f"unknown cluster {name_or_path!r}: no such file, and no packaged "
                             f"profile of that name; choose one of "
                             f"{', '.join(available_clusters())} or write one with "
                             f"`shardwise calibrate`")
    return Cluster.from_dict(json.loads(path.read_text()))


def clusters_sheet():
    """``shardwise clusters``: every packaged profile, what --cluster names."""
    from ..output import Col, Sheet, nbytes, num

    rows = []
    for name in available_clusters():
        c = load_cluster(name)
        rows.append({"name": name, "device": c.device, "nodes": c.nodes,
                     "gpus_per_node": c.gpus_per_node, "gpus": c.n_gpus,
                     "hbm_bytes": c.hbm_bytes, "matmul_tflops": c.matmul_tflops.get("bf16"),
                     "hbm_gbps": c.hbm_gbps, "links": sorted(c.links)})
    return Sheet("clusters", "cluster profiles (--cluster NAME; or a JSON file from shardwise "
                 "calibrate)", [
        Col("name", "name"), Col("device", "device", left=True, priority=2),
        Col("GPUs", "gpus", row_text=lambda r: f"{r['nodes']} x {r['gpus_per_node']}"),
        Col("HBM", "hbm_bytes", nbytes), Col("bf16 TFLOP/s", "matmul_tflops", num, 1),
        Col("HBM GB/s", "hbm_gbps", num, 1), Col("links", "links", ", ".join, 3, left=True)],
        rows)
