"""What every strategy provides: the base class its runtime class derives
from, and the helpers they share. :mod:`.registry` finds them by name.

A strategy is one file in this package: its layers on the sub-mesh of one
pipeline stage (``tp_stage``, ``helix_stage``, ...) and a class, a thin
wrapper of :class:`~.compose.Composed` that runs them over the whole world
(composed plans run the same stage code over several mesh dimensions). The
class inherits its plan's rules (the classmethods below) from
its class in :mod:`.plans`, which imports no torch: a plan is refused before
launch without loading it (:func:`~.registry.check_plan`). The class:

* ``validate(spec, workload, plan, world_size) -> Topology`` (classmethod, no
  processes): checks the plan against the model and the world size and
  raises :class:`ShardwiseError` naming the problem and the fix;
* ``ranks_needed(plan)`` (classmethod): the world size the plan implies, or
  None when it adapts to any (layerwise);
* ``candidates(spec, workload, world_size)`` (classmethod): plan strings worth
  trying on that many ranks (the planner filters them through ``validate``);
* ``__init__(spec, workload, plan, topo, comm, loader)``: builds this rank's
  shard and its KV caches (``workload.batch`` x ``workload.max_len``);
* ``forward(inputs, pos)`` (called through ``step``): one prefill (``pos == 0``, ``inputs [B, L, ...]``)
  or decode step (``inputs [B, 1, ...]``). Every rank is given the same global
  inputs and takes its part; returns this rank's local result (of a prefill,
  the last position only where the strategy ``streams``, unless ``step`` is
  asked for every position);
* ``collect(local)``: the global output ``[B, T, D or V]`` (``T`` 1 for a
  prefill's last position) on rank 0, None elsewhere (verification only,
  outside the timed region);
* ``report()``: strategy-specific facts for the run's output (load balance...);
* ``supports_graphs`` (attribute or property, default False): a decode step
  may be captured once in a CUDA graph and replayed at every position, i.e.
  it accepts ``pos`` as a 0-d device tensor and does no host work that
  depends on it (see ``runtime/timing.py``);
* ``twin(spec, workload, plan, topo, rank)`` (classmethod, default: the rank
  itself): a rank whose steps are this rank's with the global ranks shifted
  along the mesh axes where the two differ. A recorder of a plan's steps
  (``shardwise.perf``) records a twin once; tests hold every twin to it.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..model.reference import one_step
from ..model.weights import Rows
from ..spec import ModelSpec, Plan, Workload
from .comm import Comm
from .plans import PlanRules
from .topology import Topology


def dense_moe_ok(spec: ModelSpec, tokens: int) -> bool:
    """Whether the reference MoE module runs ``tokens`` a call without host
    synchronisation (its dense path; always true of a dense model), as a
    decode step captured in a CUDA graph needs."""
    from ..model.reference import DENSE_MOE_MAX_TOKENS

    return not spec.is_moe or tokens <= DENSE_MOE_MAX_TOKENS


class Strategy(PlanRules, nn.Module):
    supports_graphs: bool = False
    # Whether a prefill step keeps only the last position's output unless
    # asked for every one (``step``); PyTorch's own peers return every one.
    streams: ClassVar[bool] = False
    every_position: bool = True

    def __init__(self, spec: ModelSpec, workload: Workload, plan: Plan, topo: Topology,
                 comm: Comm, loader):
        super().__init__()
        self.spec, self.workload, self.plan = spec, workload, plan
        self.topo, self.comm, self.loader = topo, comm, loader
        self.device, self.dtype = loader.device, loader.dtype

    def forward(self, inputs: torch.Tensor, pos: int):
        raise NotImplementedError

    def step(self, inputs, pos: int, every_position: bool = False):
        """Run ``forward`` and remember the global output shape for ``collect``.
        A prefill's output is the last position's where the strategy streams
        (``streams``: all a decode step needs, the next token), every
        position's with ``every_position`` (a run that verifies them)."""
        self.every_position = every_position or not self.streams
        self.out_shape = self.output_shape(inputs)
        if isinstance(inputs, Rows) and not self.streams:
            inputs = inputs.take(0, inputs.shape[0])
        with one_step(pos):
            return self.forward(inputs, pos)

    def seek(self, pos: int) -> None:
        """Make the next replay of a captured decode step write its keys at
        ``pos``, after replays that were not timed. Nothing to do where the
        step reads its position from the device tensor it was captured with,
        as every strategy here does; a peer whose cache keeps its own
        position counter on the device moves it."""

    def input_rows(self) -> int:
        """The most sequences of the inputs one call takes (a timed run hands
        over a block of them, :class:`~shardwise.model.weights.Rows`)."""
        return self.workload.batch

    def collect(self, local) -> torch.Tensor | None:
        raise NotImplementedError

    def report(self) -> dict:
        return {}

    # -- helpers shared by strategies ----------------------------------
    def output_shape(self, inputs: torch.Tensor) -> tuple[int, ...]:
        B, T = inputs.shape[:2]
        width = self.spec.vocab_size if self.spec.vocab_size is not None else self.spec.d_model
        return (B, T if self.every_position else 1, width)

    def send_to_root(self, local: torch.Tensor | None, owner: int) -> torch.Tensor | None:
        """Move the global output, held whole by global rank ``owner``, to rank 0."""
        rank, shape = self.topo.rank, self.out_shape
        if owner == 0:
            return local if rank == 0 else None
        if rank == owner:
            self.comm.send(local.contiguous(), 0, "collect")
        elif rank == 0:
            buf = torch.empty(shape, dtype=self.dtype, device=self.device)
            return self.comm.recv(buf, owner, "collect")
        return None


def _each(ranges, fn, alike) -> list:
    return [fn(i, b0, b1) for i, (b0, b1) in enumerate(ranges)]


# How micro_batched runs its micro-batches; a recorder of what a step does
# (shardwise.perf) replaces it to run one of each kind and count it for all.
RUN_MICRO_BATCHES = _each


def _steps(kinds: list, fn) -> None:
    for i in range(len(kinds)):
        fn(i)


# How alike_steps runs its steps; a recorder of what a step does
# (shardwise.perf) replaces it to run two of each run of one kind.
RUN_STEPS = _steps


def alike_steps(kinds, fn) -> None:
    """``fn(i)`` for each step ``i`` of a loop, in order, where consecutive
    steps of equal ``kinds[i]`` do the same work (a ring's hops: the same
    block shapes and peers)."""
    RUN_STEPS(list(kinds), fn)


def micro_batched(ranges, fn, alike=None) -> list:
    """``fn(i, b0, b1)`` for each micro-batch ``i`` of ``ranges`` (ranges of
    sequences), in order: the outputs. ``alike[i]``: what, beside its size,
    decides micro-batch i's work (None: its size alone); micro-batches equal
    in both do the same work."""
    return RUN_MICRO_BATCHES(ranges, fn, alike)
