"""A twin rank's recording: the recording of the rank it is the twin of
(``Strategy.twin``), every global rank in it renamed."""
from __future__ import annotations

import dataclasses
import functools

from ..parallel.topology import Topology
from .events import Coll, Repeat


def renamed(trace, topo: Topology, rank: int):
    """``trace`` (a :class:`~.record.RankTrace`) of another rank as
    ``rank``'s: every global rank in it shifted by the coordinates ``rank``
    differs from the recorded one by."""
    move = moves(topo.axes, topo.shape, trace.rank, rank).__getitem__
    groups: dict = {}  # a group's ranks -> renamed (a step names few groups, many times)

    def events(evs: list) -> list:
        out = []
        for e in evs:
            kind = type(e)
            if kind is Coll:
                ranks = groups.get(e.ranks)
                if ranks is None:
                    ranks = groups[e.ranks] = tuple(sorted(map(move, e.ranks)))
                e = Coll(e.op, e.axis, ranks, e.bytes, e.handle,
                         tuple((move(p), n) for p, n in e.sends),
                         tuple((move(p), n) for p, n in e.recvs), e.fused)
            elif kind is Repeat:
                e = Repeat(events(e.body), e.times, e.carry, e.every)
            out.append(e)
        return out

    steps = {k: dataclasses.replace(v, events=events(v.events)) for k, v in trace.steps.items()}
    return dataclasses.replace(trace, rank=rank, steps=steps)


@functools.lru_cache(maxsize=4096)
def moves(axes: tuple, shape: tuple, a: int, b: int) -> tuple:
    """Every rank of the mesh ``axes`` x ``shape`` shifted by the coordinates
    rank ``b`` differs from rank ``a`` by (kept: a ranking's plans share a
    few meshes and their twins)."""
    topo = Topology(axes, shape)
    ca, cb = topo.coords(a), topo.coords(b)

    def shifted(x: int) -> int:
        c = topo.coords(x)
        return topo.rank_of(**{axis: (c[axis] + cb[axis] - ca[axis]) % size
                               for axis, size in zip(axes, shape)})

    return tuple(shifted(x) for x in range(topo.world_size))
