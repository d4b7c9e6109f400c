"""Collectives on a link: the alpha-beta model (Hockney 1994) with the bus
bandwidth convention of nccl-tests (PERFORMANCE.md). For a message of S
bytes (as :class:`shardwise.parallel.comm.Comm` counts them) on n ranks,
``t = alpha + factor(op, n) * S / busbw(S)``, with factor 2(n-1)/n for
all-reduce (ring), (n-1)/n for all-gather, reduce-scatter and all-to-all, 1
for point-to-point."""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

from ..spec import ShardwiseError

COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "p2p")


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
