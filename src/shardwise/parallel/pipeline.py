"""Micro-batched pipeline runtime for inference, shared by every plan.

GPipe fill/drain (Huang et al. 2019, "GPipe") without the backward pass:
stage s receives micro-batch i from stage s-1, runs its layers, and posts an
asynchronous send to stage s+1 before starting on micro-batch i+1, so while
the first stage works on i+1 the second works on i. Activations travel
point-to-point between ranks with the same coordinates on every other axis
(the same tensor-parallel rank, the same sequence shard, the same batch
share). A plan without a pipeline axis is a pipeline of one stage: the same
loop over micro-batches, with no hops.

A stage holds one micro-batch's activations at a time, not the batch's: the
first stage takes its micro-batch's rows of the inputs when it runs it
(``take``), a later stage the micro-batch it received; each computes it,
and the send of micro-batch i is waited on before that of i+1 is posted. What
persists from one micro-batch to the next is the KV cache, per sequence
anyway: a micro-batch's cache is a batch view of the stage's, so its decode
step finds the keys its prefill wrote. The last stage keeps of each
micro-batch's output the positions ``keep`` selects (a prefill's last
position: the next token is all a decode step needs; every position when a
run verifies them) and joins them at the end (one kernel, as the cost model
counts), so it holds the batch's outputs only where every position is kept.

Every rank of a stage runs the same number of micro-batches (its
collectives pair with its peers'), so a rank whose share of the batch is
smaller than another's (expert parallelism's data-parallel attention) may
run an empty micro-batch: it sends and receives nothing and its stage still
joins the stage's collectives.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..model.reference import KVCache, each_alike
from .base import micro_batched
from .comm import Comm
from .topology import Topology

StageFn = Callable[[torch.Tensor, Sequence[KVCache], int], torch.Tensor]
# Told (micro-batch index, tokens per sequence, position) before each
# micro-batch runs: settings every rank of a stage must agree on.
BeforeFn = Callable[[int, int, object], None]


class Pipeline:
    """Run ``stage_fn`` on this rank's stage for every micro-batch.

    ``micro`` lists the micro-batches as ranges of this rank's sequences
    (``rows`` in all). ``stage_fn(x, caches, pos)`` maps the stage's input
    (token ids or hidden states on the first stage, hidden states
    ``[b, T, D]`` elsewhere) to its output. ``run`` returns the kept output
    of this rank's sequences on the last stage and None elsewhere. With
    ``whole``, a single micro-batch is the stage's input and caches as they
    are, not views of them (helix and ep run the batch in one piece; a view
    is host calls for nothing). ``alike[i]``: what, beside its size, decides
    micro-batch i's work (what ``before`` makes of i), for
    :func:`~.base.micro_batched`.
    """

    def __init__(self, comm: Comm, topo: Topology, axis: str, stage_fn: StageFn,
                 caches: Sequence[KVCache], micro: Sequence[tuple[int, int]], d_model: int,
                 dtype: torch.dtype, device, before: BeforeFn | None = None,
                 whole: bool = False, alike: Sequence | None = None):
        self.comm, self.topo, self.axis = comm, topo, axis
        self.stage_fn, self.caches = stage_fn, list(caches)
        self.micro, self.d_model = list(micro), d_model
        self.dtype, self.device, self.before = dtype, device, before
        self.whole = whole and len(self.micro) == 1
        self.alike = alike
        self.prev = topo.neighbor(axis, -1)
        self.next = topo.neighbor(axis, +1)

    @property
    def is_first(self) -> bool:
        return self.prev is None

    @property
    def is_last(self) -> bool:
        return self.next is None

    def run(self, take: Callable[[int, int], torch.Tensor] | None, pos, tokens: int,
            keep=None) -> torch.Tensor | None:
        """One step of ``tokens`` positions per sequence. ``take(b0, b1)``:
        the stage's input for this rank's sequences ``b0:b1`` (first stage;
        None elsewhere). ``keep``: the positions of each micro-batch's output
        the last stage keeps (a slice of dim 1; an empty one: none, and ``run``
        returns None), None: every one."""
        in_flight = None

        def micro_batch(i: int, b0: int, b1: int) -> torch.Tensor:
            nonlocal in_flight
            if self.is_first:
                xi = take(b0, b1)
            else:
                xi = torch.empty((b1 - b0, tokens, self.d_model), dtype=self.dtype,
                                 device=self.device)
                if xi.numel():
                    self.comm.recv(xi, self.prev, self.axis)
            if self.before is not None:
                self.before(i, tokens, pos)
            caches = self.caches if self.whole else each_alike(
                self.caches, lambda c: c.batch_view(b0, b1))
            y = self.stage_fn(xi, caches, pos)
            if self.is_last:
                if keep is None:
                    return y
                if keep.start == keep.stop:
                    return None
                # A copy of the kept positions: a view would hold the whole output.
                return y[:, keep].clone(memory_format=torch.contiguous_format) if y.numel() \
                    else y[:, keep]
            if in_flight is not None:
                in_flight.wait()  # at most one micro-batch's output in flight
            in_flight = self.comm.isend(y, self.next, self.axis) if y.numel() else None
            return None

        outs = micro_batched(self.micro, micro_batch, self.alike)
        if in_flight is not None:
            in_flight.wait()
        if not self.is_last or outs[0] is None:  # None: the rank keeps no position
            return None
        return outs[0] if len(outs) == 1 else torch.cat(outs)  # no copy for one micro-batch
