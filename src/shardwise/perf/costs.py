"""What each recorded event costs on a cluster: the profile's figures by the
event's shape class, nothing about which strategy made it.

* A kernel takes the roofline of its class, max(FLOPs / rate, bytes /
  bandwidth) (Williams, Waterman & Patterson 2009), plus the launch of a
  kernel of its kind: GEMMs at the rate measured for the nearest shapes
  (``Cluster.gemm_rate``: the calibrated grid, interpolated) reading at the
  streaming rate; attention at its backend's rate (cuDNN and the
  memory-efficient kernel at the profile's SDPA rate for its head_dim,
  FlashAttention-2 at its own, shardwise's flash kernel for wide heads at
  calibrate's ``wide_attention_tflops``, else at the SDPA rate for its
  head_dim), and with a few queries a whole tile of query
  rows computed while the KV cache is read at the copy rate (traced in CUDA
  graphs: 4.3 TB/s where the copy ran at 4.2); everything else (elementwise,
  copies, norms, Triton kernels, indexed writes) moves its bytes at the copy
  rate. Compute rates follow the step's duty cycle (:func:`duty_derate`).
* In a CUDA graph a decode step's small kernels take at least the time
  calibrate's decode kernel probes measured for their kind and size, where
  the profile has them (GEMMs of up to 64 rows, the fused add + norm, the KV
  cache write), the launch included.
* A host call costs the profile's figure for its kind (GEMM, attention by
  phase, other kernel ops, Triton launches, views, module calls,
  device-to-host reads, each collective), times the ratio of a step started
  from a wait (``step_host``) and the layer probe's scale (``host_scale``);
  nothing in a CUDA graph.
* A collective costs alpha + factor x bytes / bus bandwidth on the link it
  crosses (:mod:`.clusters`); on the device that is the kernel's latency
  plus the growth of the time over the smallest message's (the eager
  latency is the host's call).
"""
from __future__ import annotations

from ..spec import dtype_bytes
from .clusters import Cluster
from .events import Call, Coll, Kernel

# Rows up to which a graph decode GEMM's time comes from calibrate's decode
# kernel probes (16 rows; Cluster.decode_gemm_s), where the profile has them.
DECODE_PROBE_MAX_ROWS = 64
# FlashAttention-2 (and the memory-efficient and cuDNN kernels) compute a
# whole tile of query rows even when a decode step has one query: 128 rows
# for FA2 at head_dim 128 on sm90 (kBlockM), 64 for the others.
FLASH_Q_TILE = 128
EFFICIENT_Q_TILE = 64
# The Triton kernel calibrate's "norm" probe times (model/kernels.py add_norm).
PROBED_TRITON = {"add_norm_kernel": "norm"}


def duty_derate(sustained: float, duty: float) -> float:
    """Compute rate over the burst rate for a GPU busy ``duty`` (0..1) of a
    step. A power-limited GPU's clock follows its average power draw, and
    its dynamic power goes about as the cube of its clock (P ~ C V^2 f, the
    voltage scaling with the clock). Always busy, it holds ``sustained`` (the
    rate under back-to-back GEMMs over the burst rate), so the cap is
    ``sustained^3`` of the burst power; busy ``duty`` of the step, it holds
    the clock c with ``duty * c^3 = sustained^3``, at most the burst clock."""
    duty = min(1.0, max(0.0, duty))
    return 1.0 if duty <= 0 else min(1.0, sustained / duty ** (1.0 / 3.0))


def device_time(cl: Cluster, t: float, op: str, link: str) -> float:
    """A collective's time on the device, from its time ``t`` called eagerly.
    The profile's latency is an eager call's, measured back to back:
    host-bound, so it is the host's call, not device time. What remains on
    the device is the growth of the time over the smallest message's (whose
    apparent bandwidth is latency jitter, not wire time), after the latency
    of the collective kernel itself (:meth:`Cluster.collective_kernel_s`,
    measured in a CUDA graph)."""
    if link not in cl.links:
        return t
    lc = cl.link(link, op)
    smallest = lc.table[0][0] if lc.table else 0.0
    t0 = lc.time(op, smallest, 2) if 0 < smallest <= 2**20 else lc.latency_us * 1e-6
    return max(t - t0, 0.0) + cl.collective_kernel_s(op)


class Costs:
    """Times of recorded events on ``cluster`` for one step: ``graph`` (a
    decode step replayed from a CUDA graph: no host, probed small kernels),
    ``decoding`` (the attention call's host figure), ``derate`` (compute
    rates over the profile's burst rates)."""

    def __init__(self, cluster: Cluster, graph: bool, decoding: bool, derate: float):
        cl = self.cl = cluster
        self.graph, self.derate = graph, derate
        scale = 0.0 if graph else cl.step_host * cl.host_scale
        self.host = {k: v * scale for k, v in (
            ("gemm", cl.gemm_s), ("attn", cl.attn_s(decoding)), ("op", cl.op_s),
            ("triton", cl.norm_s), ("view", cl.view_s), ("module", cl.module_s),
            ("sync", cl.sync_s))}
        self._calls: dict = {}
        self._colls: dict = {}
        # The schedule's runs of calls priced (schedule._Segment), by the run
        # (schedule._Run, one object for the same calls): a run costs the same
        # in every rank and every plan it recurs in.
        self.segments: dict = {}

    # -- host calls and their kernels ----------------------------------------
    def call(self, call: Call) -> tuple[float, tuple, str]:
        """(host seconds, device seconds of each kernel, host figure's kind) of one call."""
        got = self._calls.get(id(call))
        if got is None:
            kind = call.host
            got = self._calls[id(call)] = (
                self.host[kind], tuple(self.kernel(k) for k in call.kernels), kind, call)
        return got[:3]

    def kernel(self, k: Kernel) -> float:
        cl = self.cl
        if k.cls == "gemm":
            batch, m, kk, n = k.dims
            rate = cl.gemm_rate(k.dtype, kk, n, batch * m) * self.derate
            t = max(k.flops / rate, k.bytes / cl.stream_rate)
            if self.graph and batch * m <= DECODE_PROBE_MAX_ROWS:
                probe = cl.decode_gemm_s(kk, n, kk * n * dtype_bytes(k.dtype))
                if probe is not None:
                    return max(t, probe)  # the probe holds the launch
            return t + cl.gemm_kernel_s
        if k.cls == "attention":
            return self.attention(k) + cl.attn_kernel_s
        if self.graph and k.cls == "index_write" and self._probed_write(k.bytes / 2):
            return max(k.bytes / cl.hbm_rate, cl.decode_cache_write_s(k.bytes / 2))
        if self.graph and k.cls == "triton" and k.dims[0] in PROBED_TRITON:
            name, rows, width = k.dims
            probe = cl.decode_norm_s(width) if rows <= DECODE_PROBE_MAX_ROWS else None
            if probe is not None:
                return max(k.bytes / cl.hbm_rate, probe)
        return k.bytes / cl.hbm_rate + cl.kernel_s

    def _probed_write(self, written: float) -> bool:
        """Whether the profile probed a cache write of ``written`` bytes (at most
        the largest probe's: 16 sequences, 64 bytes a unit of width)."""
        table = self.cl.decode_kernels_us.get("cache_write")
        return bool(table) and written <= 64 * max(map(int, table))

    def attention(self, k: Kernel) -> float:
        """Prefill: 4 d FLOPs per scored pair and head at the kernel's rate,
        reading at the streaming rate. A few queries (decode): the kernel
        still computes a whole tile of query rows, and reads the keys it is
        given at the copy rate; the split-key decode kernel computes one
        row a query head and streams the keys at the copy rate."""
        backend, B, H, T, S, d, causal, masked = k.dims
        half = dtype_bytes(k.dtype) == 2
        if backend == "split":  # one query position over keys split on every SM: a stream
            rate = self.cl.attention_rate(d, k.dtype) * self.derate
            return max(k.flops / rate, k.bytes / self.cl.hbm_rate)
        if backend == "flash" and half and d <= 256:
            rate, tile = self.cl.flash_rate(k.dtype), FLASH_Q_TILE
        elif backend == "wide":  # taken for prompts (two queries or more): no tile charged
            rate = self.cl.wide_attention_rate(d, k.dtype) or self.cl.attention_rate(d, k.dtype)
            tile = 1
        else:
            rate, tile = self.cl.attention_rate(d, k.dtype), EFFICIENT_Q_TILE
        rate *= self.derate
        if T < tile:
            return max(k.flops * tile / T / rate, k.bytes / self.cl.hbm_rate)
        return max(k.flops / rate, k.bytes / self.cl.stream_rate)

    # -- collectives -----------------------------------------------------------
    def coll(self, c: Coll, rank: int) -> tuple[float, list, str]:
        """(host seconds, device seconds per transfer, link) of a collective
        as ``rank`` calls it: one time for a group collective, one per send
        for a batch of point-to-point ops (its receives take the senders')."""
        # What the price reads of it: a group's op, bytes and ranks; a
        # point-to-point batch's sends, from this rank.
        key = (c.op, c.sends, rank) if c.op == "p2p" else (c.op, c.bytes, c.ranks, c.fused)
        got = self._colls.get(key)
        if got is None:
            got = self._colls[key] = self._coll(c, rank)
        return got

    def _coll(self, c: Coll, rank: int):
        cl = self.cl
        if c.op == "p2p":
            times, link = [], "-"
            for peer, nbytes in c.sends:
                t, lk = cl.p2p_time(nbytes, rank, peer)
                times.append(device_time(cl, t, "p2p", lk) if t else 0.0)
                link = lk if lk != "-" else link
            host = 0.0 if self.graph else cl.collective_host_s("p2p", link if link != "-" else "nvlink")
            return host * self.host_ratio, times, link
        t, link = cl.collective_time(c.op, c.bytes, list(c.ranks))
        device = device_time(cl, t, c.op, link) if t else 0.0
        if self.graph:
            host = 0.0
        elif c.fused:  # the all-reduce, add and norm: one Triton launch
            host = self.host["triton"]
        else:
            host = cl.collective_host_s(c.op, link if link != "-" else "nvlink") * self.host_ratio
        return host, [device], link

    @property
    def host_ratio(self) -> float:
        return 0.0 if self.graph else self.cl.step_host * self.cl.host_scale


def fmt_bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"

