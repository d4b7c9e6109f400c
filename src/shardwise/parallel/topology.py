"""One validated object for the device mesh of a plan.

A strategy names its mesh axes from slowest to fastest-varying (e.g.
``("pp", "tp")``): consecutive global ranks differ on the *last* axis, so
that axis maps onto the fastest links (GPUs of one node). The topology
builds one named ``DeviceMesh`` and is passed explicitly; nothing here is
global state.

An axis the mesh does not name has size 1 and coordinate 0, so code written
for one part of a composition (``tp`` inside a pipeline stage) runs
unchanged on a mesh without that axis. ``spans`` are tuples of axes whose
ranks also act as one group (helix's flat reduction over ``group`` and
``slice`` inside a larger mesh): their groups are made when the mesh is
built, since every rank of the job takes part in making a group.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from ..output import plural
from ..spec import ShardwiseError


@dataclass
class Topology:
    axes: tuple[str, ...]
    shape: tuple[int, ...]
    rank: int = 0
    device_type: str = "cpu"
    mesh: object = field(default=None, repr=False)  # DeviceMesh once built
    spans: tuple[tuple[str, ...], ...] = ()
    _flat: dict = field(default_factory=dict, repr=False)  # span -> flattened DeviceMesh

    def __post_init__(self):
        if len(self.axes) != len(self.shape) or len(set(self.axes)) != len(self.axes):
            raise ShardwiseError(f"mesh axes {self.axes} do not match degrees {self.shape}")
        if any(s < 1 for s in self.shape):
            raise ShardwiseError(f"mesh degrees must be >= 1, got {self.shape}")

    @property
    def world_size(self) -> int:
        return math.prod(self.shape)

    def check_world(self, world_size: int, plan_text: str) -> None:
        if self.world_size != world_size:
            dims = " x ".join(f"{a}={s}" for a, s in zip(self.axes, self.shape))
            raise ShardwiseError(
                f"plan {plan_text} needs {dims} = {plural(self.world_size, 'rank')} but the job "
                f"has {world_size}; start {plural(self.world_size, 'rank')} (--nproc "
                f"{self.world_size}) "
                f"or choose degrees whose product is {world_size}"
            )

    # -- coordinates (pure arithmetic, no processes) -----------------------
    def coords(self, rank: int | None = None) -> dict[str, int]:
        r = self.rank if rank is None else rank
        out = {}
        for axis, size in zip(reversed(self.axes), reversed(self.shape)):
            out[axis] = r % size
            r //= size
        return {a: out[a] for a in self.axes}

    def coord(self, axis: str) -> int:
        return self.coords()[axis] if axis in self.axes else 0

    def size(self, axis: str | tuple[str, ...]) -> int:
        """Ranks along ``axis`` (a tuple: along all of them); 1 for an axis
        the mesh does not name."""
        if isinstance(axis, tuple):
            return math.prod(self.size(a) for a in axis)
        return self.shape[self.axes.index(axis)] if axis in self.axes else 1

    def rank_of(self, **coords: int) -> int:
        """Global rank at the given coordinates (unnamed axes: this rank's;
        an axis the mesh does not name must be given 0)."""
        c = self.coords()
        for axis, value in coords.items():
            if axis in self.axes:
                c[axis] = value
            elif value != 0:
                raise ValueError(f"axis {axis!r} is not in the mesh {self.axes}")
        r = 0
        for axis, size in zip(self.axes, self.shape):
            r = r * size + c[axis]
        return r

    def group_ranks(self, axis: str | tuple[str, ...]) -> list[int]:
        """Global ranks of this rank's group along ``axis``, in axis order; a
        tuple of axes: the ranks that differ from this one only along them
        (the group ``build`` flattens the span into), ascending."""
        if isinstance(axis, tuple):
            return sorted(self.rank_of(**dict(zip(axis, at)))
                          for at in itertools.product(*(range(self.size(a)) for a in axis)))
        return [self.rank_of(**{axis: i}) for i in range(self.size(axis))]

    def neighbor(self, axis: str, step: int) -> int | None:
        """Global rank ``step`` places along ``axis`` (None past either end)."""
        i = self.coord(axis) + step
        return self.rank_of(**{axis: i}) if 0 <= i < self.size(axis) else None

    def covers_world(self, axes: tuple[str, ...]) -> bool:
        """Whether every axis of more than one rank is among ``axes``."""
        return all(a in axes for a, s in zip(self.axes, self.shape) if s > 1)

    def axis_key(self, axis: str | tuple[str, ...]) -> str:
        """How byte counters name ``axis``: itself, ``world`` for a span of
        the whole mesh, else its axes joined by ``+``."""
        if isinstance(axis, str):
            return axis
        return "world" if self.covers_world(axis) else "+".join(axis)

    # -- the mesh ---------------------------------------------------------
    def build(self) -> "Topology":
        """Create the named DeviceMesh and the groups of ``spans``
        (collective: every rank must call it)."""
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(self.device_type, self.shape, mesh_dim_names=self.axes)
        for span in self.spans:
            if not self.covers_world(span):
                self._flat[span] = self.mesh[span]._flatten("_".join(span))
        return self

    def group(self, axis: str | tuple[str, ...]):
        if isinstance(axis, tuple):
            if self.covers_world(axis):
                import torch.distributed as dist

                return dist.group.WORLD
            return self._flat[axis].get_group()
        return self.mesh.get_group(axis)
