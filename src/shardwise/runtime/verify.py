"""A run's outputs against the single-device reference: the relative error
of every step (prefill and each decode step) on the same weights.

Rank 0 of a verified run (:mod:`.engine`) and of a verified generation
(:mod:`.generate`) both judge their outputs by it.
"""
from __future__ import annotations

import torch

from ..model.load import build_reference
from ..parallel.checks import balanced_ranges
from .job import Case
from .routing_check import NearTies, flips


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| (Frobenius, computed in float64)."""
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def step_errors(case: Case, source, dtype, device, prompt, steps, outputs):
    """Relative error of every step against the reference; for MoE models
    also the routing analysis of ``runtime/routing_check.py``: near-tied
    tokens, routing flips (near-tied tokens whose output row departs), the
    error without the flips, and how far the reference departs from itself
    when run as two half-batches (GEMMs of other shapes)."""
    wl = case.workload
    errs, ties = [], None
    with torch.inference_mode():
        ref = build_reference(source, dtype, device)
        near = NearTies(ref, dtype)
        caches = ref.allocate_caches(wl.batch, wl.max_len)
        halves = balanced_ranges(wl.batch, 2) if wl.batch > 1 else []
        half_caches = [ref.allocate_caches(b - a, wl.max_len) for a, b in halves]
        for t, (x, out) in enumerate(zip([prompt, *steps], outputs)):
            pos = 0 if t == 0 else wl.seq_len + t - 1
            want = ref(x, caches, pos)
            errs.append(rel_err(out, want))
            flags = near.take()
            if flags is None:
                continue
            if ties is None:
                ties = {k: [] for k in ("near_tie_tokens", "determinate_rel_err", "routing_flips",
                                        "rel_err_without_flips", "reference_split_rel_err",
                                        "reference_split_flips")}
            keep = ~flags
            ties["near_tie_tokens"].append(int(flags.sum()))
            ties["determinate_rel_err"].append(
                rel_err(out[keep], want[keep]) if bool(keep.any()) else 0.0)
            flip = flips(out, want, flags)
            ties["routing_flips"].append(int(flip.sum()))
            ties["rel_err_without_flips"].append(rel_err(out[~flip], want[~flip]))
            if halves:
                parts = []
                for (a, b), c in zip(halves, half_caches):
                    parts.append(ref(x[a:b], c, pos))
                    near.take()  # the flags that count are the whole batch's
                split = torch.cat(parts)
                ties["reference_split_rel_err"].append(rel_err(split, want))
                ties["reference_split_flips"].append(int(flips(split, want, flags).sum()))
        near.close()
    del ref, caches, half_caches
    return errs, ties
