"""Python's cyclic garbage collection while a ranking runs.

A ranking keeps most of what it makes (recordings, their compiled
schedules, prices), and each full collection walks every object alive
(PyTorch's modules among them) again: a second or more of a warm ranking
of a zoo model. :func:`young_heap` keeps collection to what the plan being
priced made.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager


@contextmanager
def young_heap():
    """Yields ``collect()``, to call between plans: the garbage made since
    the last call collected, and what survives frozen (never walked by a
    collection again; freed as usual when nothing refers to it). What was
    alive before is frozen at the start. Everything is unfrozen at the end,
    unless something else had frozen objects before (then nothing is done
    here at all), or collection is off."""
    ours = gc.isenabled() and gc.get_freeze_count() == 0

    def collect() -> None:
        if ours:
            gc.collect()
            gc.freeze()

    if ours:
        gc.freeze()
    try:
        yield collect
    finally:
        if ours:
            gc.unfreeze()
