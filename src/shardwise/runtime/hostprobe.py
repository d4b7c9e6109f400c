"""The layer probe: how fast the host issues an eager step right now.

A tiny reference stack (8 layers of width 64, so every kernel's time is its
launch's) decoding one token: calibrate times it for the profile
(``layer_probe_us``, :mod:`shardwise.perf.hostcost`), and a benchmark times
it beside each eager measurement (``host_probe_us`` in its record), since
the host's speed drifts within a run; the cost model then scales its host
figures by the host as the run found it. Also the timers the probes use.
"""
from __future__ import annotations

import functools
import time

# -- timers ---------------------------------------------------------------------------

def device_timer(device, fn, iters: int, warmup: int, before=None) -> float:
    """Mean seconds of ``fn()`` over ``iters`` calls after ``warmup``."""
    import torch

    for _ in range(warmup):
        fn()
    if before is not None:
        before()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e-3 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def host_timer(device, fn, iters: int, warmup: int) -> float:
    """Mean host seconds of ``fn()`` over ``iters`` calls issued back to back:
    the wall time of the calls themselves, the device synchronised before and
    after but not in between (tiny work, so the device keeps up)."""
    import torch

    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    t = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return t / iters


# The probe stack's decode step: one token of one sequence at this position,
# over a cache of PROBE_CACHE positions.
PROBE_POS, PROBE_CACHE = 8, 16


def probe_spec(layers: int = 8, dtype: str = "bf16"):
    """The layer probe's model: tiny layers, so that every kernel's time is
    its launch's (the cost model predicts the same stack from a profile)."""
    from ..spec import ModelSpec

    return ModelSpec(name="launch-probe", n_layers=layers, d_model=64, n_heads=4, head_dim=16,
                     d_ff=128, dtype=dtype, activation="gelu_tanh")


@functools.lru_cache(maxsize=4)
def probe_stack(device, layers: int = 8, static: bool = False):
    """(one eager decode step of the probe stack, its layers): tiny layers in
    the precision and activation the GPU benchmarks run (bf16 with the tanh
    GELU: the fused norms and GEMM epilogue; fp32 on CPU). Built once per
    device: bench times it again before every measurement. ``static``: the
    step at a device-tensor position, as bench captures decode steps."""
    import torch

    from ..model.reference import Transformer, one_step
    from ..spec import torch_dtype

    dtype = "bf16" if device.type == "cuda" else "fp32"
    spec = probe_spec(layers, dtype)
    model = Transformer(spec).to(device, torch_dtype(dtype))
    caches = model.allocate_caches(1, PROBE_CACHE)
    x = torch.zeros(1, 1, spec.d_model, device=device, dtype=torch_dtype(dtype))
    # A device-tensor position: the static-shape step a CUDA graph replays.
    pos = torch.tensor(PROBE_POS, device=device) if static else PROBE_POS

    def step():
        with one_step(pos):
            model(x, caches, pos)

    return step, layers


def host_probe_us(device, iters: int = 50) -> float:
    """The layer probe now: host time of one probe layer in us, its steps run
    back to back (as calibrate's ``layer_probe_us``). Benchmarks record it
    beside each eager measurement, since the host's speed drifts within a
    run; the cost model's host scale then uses the host as the run found it."""
    import torch

    with torch.inference_mode():
        step, layers = probe_stack(device)
        return 1e6 * device_timer(device, step, iters, 5) / layers


def host_probe_step_us(device) -> float:
    """A few steps of the layer probe back to back (as ``layer_probe_us``, so
    the two compare): host time of one probe layer in us. Bench runs this
    after each timed eager step, so that the host's speed is measured while
    the steps run, not only before them."""
    import torch

    with torch.inference_mode():
        step, layers = probe_stack(device)
        return 1e6 * device_timer(device, step, 3, 1) / layers
