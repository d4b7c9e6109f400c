"""The strategy of composed plans (``pp:2/ring:2/tp:2``): every kind of
stage, each built by its strategy's own code.

A stage runs the first of helix, ring and ep that the plan has, else tensor
parallelism (``tp``, or whole layers where it has no tp); ring's stage takes
tp inside it (``ring/tp``), and so does ep's (``ep/tp``). This module sits
above the strategies' modules, which build on :class:`~.compose.Composed`.
"""
from __future__ import annotations

from .compose import Composed, Stage, StageContext
from .ep import ep_stage
from .helix import helix_stage
from .ring import ZigZag, ring_stage
from .tp_pp import tp_stage


def build_stage(ctx: StageContext) -> Stage:
    if ctx.comp.has("helix"):
        return helix_stage(ctx)
    if ctx.comp.has("ring"):
        return ring_stage(ctx)
    if ctx.comp.has("ep"):
        return ep_stage(ctx)
    return tp_stage(ctx)


class AnyComposed(Composed):
    """A composed plan of any parts on one rank."""

    build_stage = staticmethod(build_stage)
    sequence_layout = ZigZag


STRATEGY = AnyComposed
