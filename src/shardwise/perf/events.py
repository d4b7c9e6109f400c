"""The events a recorded step is made of, and their counts.

A step of one rank is a list of events in the order the code issued them:
:class:`Call` (a host call with the device :class:`Kernel` s it launches),
:class:`Coll` (a collective or a batch of point-to-point transfers),
:class:`Wait` (on an asynchronous request) and :class:`Repeat` (a loop's
regular iteration, taken many times). :mod:`.trace` records them,
:mod:`.costs` prices them, :mod:`.schedule` plays them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# Host calls by kind, as a run counts them (shardwise.perf.counting.CallCounter):
# ops that launch device work, ops that launch none (views, allocations),
# device-to-host reads, nn.Module calls, Triton launches, and collectives.
CALL_KINDS = ("kernels", "metas", "modules", "syncs", "all_reduce", "all_gather",
              "reduce_scatter", "all_to_all", "p2p", "broadcast", "barrier", "gemms", "attns",
              "tritons")
# Kernel calls also counted as GEMMs; attentions are calls whose name holds
# "scaled_dot_product" or "attention".
GEMM_OPS = {"linear", "matmul", "mm", "addmm", "bmm", "baddbmm", "_addmm_activation",
            "_grouped_mm"}
# Ops whose result the host waits for (the value sizes what follows).
SYNC_OPS = {"nonzero", "nonzero_numpy", "nonzero_static", "item", "_local_scalar_dense",
            "masked_select", "unique", "_unique", "_unique2", "unique_consecutive",
            "unique_dim"}
# Ops whose output's size depends on their input's values, with no meta
# kernel: the recorder computes them from the inputs' shadows (a kernel on
# the device; the read of its result to the host is the sync).
VALUE_OPS = {"bincount", "histc"}
# Ops that allocate without launching a kernel.
ALLOC_OPS = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided"}


def is_attention(name: str) -> bool:
    return "scaled_dot_product" in name or "attention" in name


def host_kind(kind: str, name: str) -> str:
    """The profile's host figure a call costs: ``gemm``, ``attn``, ``op`` (other
    launching ops), ``triton``, ``view``, ``module`` or ``sync``."""
    if kind == "kernels":
        return "gemm" if name in GEMM_OPS else "attn" if is_attention(name) else "op"
    return {"metas": "view", "modules": "module", "syncs": "sync", "tritons": "triton"}[kind]


# -- events -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Kernel:
    """One device kernel: ``cls`` is its shape class (``gemm`` dims (batch, m,
    k, n); ``attention`` dims (backend, B, H, T, S, d, causal, masked);
    ``index_write`` and ``copy`` bytes only; ``triton`` dims (name, rows,
    width)), ``flops`` the model FLOPs, ``bytes`` read plus written."""

    cls: str
    flops: float
    bytes: float
    dims: tuple = ()
    dtype: str = ""


@dataclass(frozen=True, slots=True)
class Call:
    """One host call: its kind (:data:`CALL_KINDS`' first five), its name, the
    kernels it launches on the device (none for a CPU tensor's op) and the
    shapes of its tensor arguments."""

    kind: str
    name: str
    kernels: tuple = ()
    shapes: tuple = ()

    @property
    def host(self) -> str:
        return host_kind(self.kind, self.name)


@dataclass(slots=True)
class Coll:
    """A collective call: ``op`` (all_reduce, all_gather, reduce_scatter,
    all_to_all, broadcast, p2p), the global ``ranks`` of its group, the bytes
    Comm counts, ``handle`` (None: blocking; else the request a Wait names),
    for p2p the ``sends`` and ``recvs`` as (peer, bytes), ``fused``: the
    all-reduce, residual add and norm in one kernel."""

    op: str
    axis: str
    ranks: tuple
    bytes: int
    handle: int | None = None
    sends: tuple = ()
    recvs: tuple = ()
    fused: bool = False


@dataclass(frozen=True, slots=True)
class Wait:
    handle: int


@dataclass(slots=True)
class Repeat:
    """A layer loop's regular iteration ``body``, run ``times`` times. ``carry``
    maps a request waited in the body but made before it to the body's own
    request that takes its place in the next iteration. ``every``: each
    iteration is played (a ring's hops, whose transfers pair with peers
    that repeat theirs in runs of other lengths), not only the first two."""

    body: list
    times: int
    carry: dict = field(default_factory=dict)
    every: bool = False


def carry(body: list) -> dict:
    """Requests waited in a loop body but made before it, paired in order with
    the body's requests not waited in it: the next iteration waits on those."""
    made, waited_outside, escaping = set(), [], []
    for e in body:
        if isinstance(e, Coll) and e.handle is not None:
            made.add(e.handle)
            escaping.append(e.handle)
        elif isinstance(e, Wait):
            if e.handle in made:
                if e.handle in escaping:
                    escaping.remove(e.handle)
            else:
                waited_outside.append(e.handle)
    return dict(zip(waited_outside, escaping)) if len(waited_outside) == len(escaping) else {}


# -- counts -------------------------------------------------------------------------

def expand(events: list, times: int = 1):
    """(event, multiplicity) of every event, loops unrolled as counts."""
    for e in events:
        if isinstance(e, Repeat):
            yield from expand(e.body, times * e.times)
        else:
            yield e, times


def call_counts(events: list) -> dict[str, int]:
    """Host calls by :data:`CALL_KINDS`, as CallCounter counts a run."""
    out = dict.fromkeys(CALL_KINDS, 0)
    for e, n in expand(events):
        if isinstance(e, Call):
            out[e.kind] += n
            if e.kind == "kernels" and e.name in GEMM_OPS:
                out["gemms"] += n
            elif e.kind == "kernels" and is_attention(e.name):
                out["attns"] += n
        elif isinstance(e, Coll):
            out["tritons" if e.fused else e.op] += n
    return out


def comm_counts(events: list) -> dict[str, dict[str, int]]:
    """Calls and bytes per ``op/axis`` key, as Comm.snapshot() counts a run."""
    out: dict = {}
    for e, n in expand(events):
        if not isinstance(e, Coll):
            continue
        if e.op == "p2p":
            for _, nbytes in e.sends:
                s = out.setdefault(f"send/{e.axis}", {"calls": 0, "bytes": 0})
                s["calls"] += n
                s["bytes"] += n * nbytes
            continue
        s = out.setdefault(f"{e.op}/{e.axis}", {"calls": 0, "bytes": 0})
        s["calls"] += n
        s["bytes"] += n * e.bytes
    return dict(sorted(out.items()))
