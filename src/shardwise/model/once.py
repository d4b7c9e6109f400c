"""What the code makes at a first call and keeps for the later ones.

A table or buffer that a module, or the process for every module alike,
builds the first time a step needs it and reuses afterwards is built under
:func:`made_once`. A run makes it at its first step, before the steps it
times; a recorder of what a step does (:mod:`shardwise.perf.record`)
replaces :data:`MADE_ONCE` to leave the build out of the step it records,
so that a first call records what every later one does.
"""
from contextlib import nullcontext

MADE_ONCE = nullcontext


def made_once():
    """Scope of building what is made at a first call and kept."""
    return MADE_ONCE()
