"""Where the recorder (:mod:`.record`) makes what the model makes on meta
tensors faster than the model's code would through it, with the same
result: a rank's build (its events are dropped) made with no mode, and a
KV cache's views of a micro-batch, asked again with the same shapes, made
directly with the calls the first recorded.

A rank's KV caches (every layer's: a fill and four views each) and weights
are most of the ops of its build, each several times dearer through the
recorder than the op itself; they are made as PyTorch makes them on meta
(:func:`building`). A step takes its caches' views of each micro-batch
(``KVCache.batch_view``: a slice, then the K and V views, five view ops),
a pipeline stage's or a chunked stage's every layer's: a fifth of the ops
of a step. :func:`batch_views` records the calls of the first of each
shape and, asked again, appends them and makes the views with one
``as_strided`` each, where they are views of a cache made before the step
(the recorder follows the step's own tensors, not these) and hold nothing
else.
"""
from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
from torch import nn

from ..model import reference
from .events import Call
from .lowering import _storage
from .trace import no_modes

# (the cache's class, its tensor's shape, stride, offset and dtype, b0, b1) -> (the calls
# of its batch view, each attribute's (name, size, stride, offset))
_VIEWS: dict = {}


def _native(fn):
    """``fn`` run with no mode: meta tensors as PyTorch makes them."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with no_modes():
            return fn(*args, **kwargs)

    return run


@contextmanager
def building(source: type):
    """A rank's model built as fast as it can be: modules on meta without
    initialising their parameters (the loader replaces every one of them),
    and the weights (``source.get``: the recorder's weight source) and KV
    caches made on meta with no mode: the recorder's events of a build are
    dropped, and what it made is the same tensors."""
    saved = {c: c.reset_parameters for c in (nn.Linear, nn.LayerNorm, nn.RMSNorm, nn.Embedding)}
    allocate, get = reference.KVCache.__dict__["allocate"], source.get
    try:
        for c in saved:
            c.reset_parameters = lambda self: None
        reference.KVCache.allocate = classmethod(_native(allocate.__func__))
        source.get = _native(get)
        yield
    finally:
        for c, f in saved.items():
            c.reset_parameters = f
        reference.KVCache.allocate, source.get = allocate, get


def batch_views(real, active):
    """``KVCache.batch_view`` (``real``) while steps are recorded, ``active()``
    the recorder of the step (module docstring)."""
    def batch_view(cache, b0: int, b1: int):
        rec, kv = active(), cache.kv
        if rec is None or _storage(kv) in rec._storages or "_shadow" in kv.__dict__ \
                or kv is rec.inputs:
            return real(cache, b0, b1)
        key = (type(cache), kv.shape, kv.stride(), kv.storage_offset(), kv.dtype, b0, b1)
        got = _VIEWS.get(key)
        if got is None:
            events, n = rec.events, len(rec.events)
            out = real(cache, b0, b1)
            calls = events[n:]
            views = [(name, t.shape, t.stride(), t.storage_offset())
                     for name, t in vars(out).items()
                     if isinstance(t, torch.Tensor) and _storage(t) == _storage(kv)]
            if (rec.events is events and len(views) == len(vars(out)) and type(out) is type(cache)
                    and all(type(c) is Call and c.kind == "metas" for c in calls)):
                _VIEWS[key] = (tuple(calls), tuple(views))
            return out
        calls, views = got
        rec.events.extend(calls)
        out = object.__new__(type(cache))
        with no_modes():
            for name, size, stride, offset in views:
                out.__dict__[name] = kv.as_strided(size, stride, offset)
        return out

    return batch_view
