"""Micro-batched pipeline runtime for inference, shared by tp_pp and layerwise.

GPipe fill/drain (Huang et al. 2019, "GPipe") without the backward pass:
stage s receives micro-batch i from stage s-1, runs its layers, and posts an
asynchronous send to stage s+1 before starting on micro-batch i+1, so while
the first stage works on i+1 the second works on i. Activations travel
point-to-point between ranks with the same coordinates on every other axis.
The KV cache of a micro-batch is a batch view of the stage's cache, so a
micro-batch's decode step finds the keys its prefill wrote.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..model.reference import KVCache
from .base import micro_batched
from .comm import Comm
from .topology import Topology

StageFn = Callable[[torch.Tensor, Sequence[KVCache], int], torch.Tensor]


class Pipeline:
    """Run ``stage_fn`` on this rank's stage for every micro-batch.

    ``stage_fn(x, caches, pos)`` maps the stage's input (token ids or hidden
    states on the first stage, hidden states ``[b, T, D]`` elsewhere) to its
    output. ``run`` returns the concatenated output on the last stage and None
    elsewhere.
    """

    def __init__(self, comm: Comm, topo: Topology, axis: str, stage_fn: StageFn,
                 caches: Sequence[KVCache], micro_batches: int, d_model: int,
                 dtype: torch.dtype, device):
        self.comm, self.topo, self.axis = comm, topo, axis
        self.stage_fn, self.caches = stage_fn, list(caches)
        self.micro_batches, self.d_model = micro_batches, d_model
        self.dtype, self.device = dtype, device
        self.prev = topo.neighbor(axis, -1)
        self.next = topo.neighbor(axis, +1)

    @property
    def is_first(self) -> bool:
        return self.prev is None

    @property
    def is_last(self) -> bool:
        return self.next is None

    def run(self, inputs: torch.Tensor, pos: int) -> torch.Tensor | None:
        B, T = inputs.shape[:2]
        pending = []

        def micro_batch(b0: int, b1: int) -> torch.Tensor:
            if self.is_first:
                x = inputs[b0:b1]
            else:
                x = torch.empty((b1 - b0, T, self.d_model), dtype=self.dtype, device=self.device)
                self.comm.recv(x, self.prev, self.axis)
            y = self.stage_fn(x, [c.batch_view(b0, b1) for c in self.caches], pos)
            if not self.is_last:
                pending.append((self.comm.isend(y, self.next, self.axis), y))
            return y

        outs = micro_batched(B, self.micro_batches, micro_batch)
        for req, _ in pending:
            req.wait()
        if not self.is_last:
            return None
        return outs[0] if len(outs) == 1 else torch.cat(outs)  # no copy for one micro-batch
