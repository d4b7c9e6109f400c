"""Will a run fit the devices at hand? Checked before any process starts.

Each rank's memory is the cost model's (weights and KV cache as the strategy
allocates them, plus activations and buffers); a verified run also builds the
single-device reference on rank 0, after freeing its shard. GPUs are checked
one by one against their memory; CPU ranks share the machine's memory, so
their sum is. When a run does not fit, the error names what would: the
most layers that fit (``--layers``), or a plan over more ranks.
"""
from __future__ import annotations

import dataclasses
import os

from ..spec import ModelSpec, Plan, ShardwiseError, Workload
from .costmodel import fmt_bytes, predict

# Peers have no formulas of their own; they hold what these plans hold.
_PEER_AS = {"torch_eager": "tp_pp:1x1", "hf": "tp_pp:1x1", "torch_tp": "tp_pp:{0}x1",
            "torch_cp": "ring:{0}"}
# World sizes tried when suggesting a plan over more ranks.
_WORLDS = (2, 4, 8, 16, 32, 64, 128)


def device_memory(device: str) -> int | None:
    """Bytes of one GPU (cuda) or of the whole machine (cpu); None if unknown."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_properties(0).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _cluster(world: int, memory: int):
    from .clusters import load_cluster

    base = load_cluster("h100-sxm-8")
    return dataclasses.replace(base, gpus_per_node=max(world, 1), nodes=1, hbm_bytes=memory,
                               name="this machine")


def _as_modelled(plan: Plan) -> Plan:
    if plan.strategy in _PEER_AS:
        return Plan.parse(_PEER_AS[plan.strategy].format(*(plan.shape or (1,))))
    return plan


def rank_bytes(spec: ModelSpec, wl: Workload, plan: str, world: int,
               memory: int) -> tuple[int, int]:
    """(the fullest rank's bytes, all ranks' bytes together) of ``plan`` on
    ``world`` ranks."""
    p = predict(spec, wl, _as_modelled(Plan.parse(plan)), _cluster(world, memory), world,
                graphs=False)
    extra = p.memory.activations + p.memory.comm_buffers
    return p.memory.total, sum(p.weights_per_rank) + sum(p.kv_per_rank) + extra * p.world_size


def _need(spec, wl, plans, world, device, memory, verify) -> tuple[int, str]:
    """The bytes the tightest device needs, and what needs them."""
    worst, what = 0, ""
    for plan in plans:
        one, total = rank_bytes(spec, wl, plan, world, memory)
        need = total if device == "cpu" else one
        if need > worst:
            worst, what = need, plan
    if verify:
        ref, _ = rank_bytes(spec, wl, "tp_pp:1x1", 1, memory)
        need = ref + (worst if device == "cpu" else 0)
        if need > worst:
            worst, what = need, "the single-device reference" + (" beside the ranks" if
                                                                  device == "cpu" else "")
    return worst, what


def check_fits(spec: ModelSpec, wl: Workload, plans: list[str], world: int, device: str,
               verify: bool = True) -> None:
    """Raise a :class:`ShardwiseError` naming what would fit when ``plans``
    on ``world`` ranks of ``device`` do not fit its memory."""
    memory = device_memory(device)
    if memory is None or not plans:
        return
    need, what = _need(spec, wl, plans, world, device, memory, verify)
    if need <= memory:
        return
    where = ("this machine's memory" if device == "cpu"
             else f"one GPU's memory ({world} GPU(s) here)")
    fixes = []
    layers = _most_layers(spec, wl, plans, world, device, memory, verify)
    if layers:
        fixes.append(f"--layers {layers}")
    if device == "cuda":
        more = _more_ranks(spec, wl, memory)
        if more:
            fixes.append(f"a plan over more GPUs ({more})")
    if not layers:
        fixes.append("a smaller --batch or --seq")
    raise ShardwiseError(
        f"{spec.name} ({spec.n_layers} layers, {spec.dtype}) does not fit: {what} needs "
        f"~{fmt_bytes(need)} but {where} is {fmt_bytes(memory)}; use "
        + " or ".join(fixes))


def _most_layers(spec, wl, plans, world, device, memory, verify) -> int | None:
    """The most leading layers with which the run fits, or None (not even one)."""
    lo, hi = 0, spec.n_layers - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        try:
            fits = _need(spec.replace(n_layers=mid), wl, plans, world, device, memory,
                         verify)[0] <= memory
        except ShardwiseError:  # the plan does not divide the smaller model
            fits = False
        if fits:
            lo = mid
        else:
            hi = mid - 1
    return lo or None


def _more_ranks(spec, wl, memory) -> str | None:
    """The first plan over more GPUs whose fullest rank fits one GPU."""
    from ..parallel.registry import available_strategies, get_strategy, validate_plan

    for world in _WORLDS:
        for name in available_strategies():
            for cand in get_strategy(name).candidates(spec, wl, world):
                try:
                    validate_plan(spec, wl, cand, world)
                    one, _ = rank_bytes(spec, wl, cand, world, memory)
                except ShardwiseError:
                    continue
                if one <= memory:
                    return f"{cand} on {world} GPUs"
    return None
