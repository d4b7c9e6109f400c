"""Enumerate every plan for a model, workload and cluster; rank them by the
cost model; optionally run the best ones to check.

Candidates come from each strategy's ``candidates`` (plus micro-batch
variants for the strategies that micro-batch) and are filtered through its
``validate``, so the planner lists exactly the plans ``shardwise run`` would
accept on that many ranks. A valid plan that does not fit in memory is kept,
marked with the reason.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Callable, Iterable

from ..parallel.base import available_strategies, get_strategy, validate_plan
from ..spec import ModelSpec, Plan, ShardwiseError, Workload
from .clusters import Cluster, load_cluster
from .costmodel import Prediction, fmt_bytes, predict, resolve_capacity

# Micro-batch counts tried for plans that pipeline or loop over micro-batches.
MICRO_BATCHES = (1, 2, 4, 8, 16, 32)
MICRO_BATCHED = ("tp_pp", "layerwise", "ring")


@dataclass
class Row:
    plan: str
    prediction: Prediction | None = None
    error: str = ""  # why the plan is not valid on these ranks

    @property
    def valid(self) -> bool:
        return self.prediction is not None

    @property
    def fits(self) -> bool:
        return self.valid and self.prediction.fits


def candidate_plans(spec: ModelSpec, workload: Workload, ranks: int, cluster: Cluster,
                    micro_batches: Iterable[int] = MICRO_BATCHES) -> list[str]:
    """Every strategy's candidates on ``ranks`` ranks, with micro-batch variants,
    capacities named L2/HBM read from ``cluster``, each once, in canonical form."""
    out: list[str] = []
    for name in available_strategies():
        for text in get_strategy(name).candidates(spec, workload, ranks):
            base = resolve_capacity(Plan.parse(text), cluster)
            variants = [base]
            pipelined = name != "tp_pp" or (len(base.shape) == 2 and base.shape[1] > 1)
            if name in MICRO_BATCHED and pipelined:
                variants = [Plan(base.strategy, base.shape, mb, base.options)
                            for mb in micro_batches if mb <= workload.batch]
            for plan in variants:
                if str(plan) not in out:
                    out.append(str(plan))
    return out


def enumerate_plans(spec: ModelSpec, workload: Workload, cluster: Cluster,
                    ranks: int | None = None,
                    micro_batches: Iterable[int] = MICRO_BATCHES) -> list[Row]:
    """Every candidate on ``ranks`` (default: all the cluster's GPUs), valid
    ones with their prediction, invalid ones with the validation error."""
    ranks = cluster.n_gpus if ranks is None else ranks
    if not 1 <= ranks <= cluster.n_gpus:
        raise ShardwiseError(f"--ranks {ranks}: cluster {cluster.name} has {cluster.n_gpus} GPUs")
    rows = []
    for text in candidate_plans(spec, workload, ranks, cluster, micro_batches):
        try:
            validate_plan(spec, workload, text, ranks)
            rows.append(Row(text, predict(spec, workload, text, cluster, ranks)))
        except ShardwiseError as e:
            rows.append(Row(text, error=str(e)))
    return rows


def score(p: Prediction, phase: str) -> float:
    """Seconds to minimise: the prefill, one decode step, or a whole request
    (prefill plus every decode step) for ``both``."""
    if phase == "prefill":
        return p.prefill.seconds
    if phase == "decode":
        return p.decode.seconds
    return p.prefill.seconds + p.workload.decode_steps * p.decode.seconds


def rank_plans(rows: list[Row], phase: str) -> list[Row]:
    """Plans that fit, fastest first; then valid plans that do not fit; then
    invalid ones."""
    def key(r: Row):
        if not r.valid:
            return (2, 0.0, r.plan)
        return (0 if r.fits else 1, score(r.prediction, phase), r.plan)

    return sorted(rows, key=key)


def best_fitting(ref, cluster: str, batch: int | None, seq: int | None, phase: str,
                 top: int, ranks: int | None = None,
                 steps: int | None = None) -> tuple[list[str], ModelSpec, Workload]:
    """The ``top`` plans that fit, best first (what ``plan --validate`` and
    ``plan --run`` run), with the model and workload they were ranked for.
    ``ref``: a models.ModelRef. ``steps``: the decode positions the KV cache
    must hold (a benchmark sizes it for its warm-up and timed steps)."""
    spec, wl = _workload(ref, batch, seq, phase, steps)
    rows = rank_plans(enumerate_plans(spec, wl, load_cluster(cluster), ranks), phase)
    return [r.plan for r in rows if r.fits][:top], spec, wl


# -- text for the CLI ------------------------------------------------------------

def _table(title: str, columns: list[str], rows: list[list[str]]) -> str:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 or c in ("status", "link", "op", "component") else "right",
                     overflow="fold")
    for r in rows:
        t.add_row(*r)
    console = Console(record=True, width=160, file=io.StringIO())
    console.print(t)
    return console.export_text()


def _workload(ref, batch, seq, phase, steps=None) -> tuple[ModelSpec, Workload]:
    """The model ``ref`` (a models.ModelRef) names, and its serving workload
    (the seed's for a preset) with the flags given."""
    from ..models import as_ref

    ref = as_ref(ref)
    wl = ref.serve_workload
    pick = lambda flag, d: d if flag is None else flag  # noqa: E731
    wl = Workload(batch=pick(batch, wl.batch), seq_len=pick(seq, wl.seq_len),
                  phase=phase or wl.phase,
                  decode_steps=steps if steps is not None else wl.decode_steps)
    return ref.spec, wl


def describe(p: Prediction) -> str:
    """A prediction as text: headline figures, memory, compute ops and collectives."""
    wl, s = p.workload, p.spec
    head = (f"{s.name} {p.plan} on {p.cluster} ({p.world_size} GPUs), {s.dtype}, batch {wl.batch}, "
            f"context {wl.seq_len}\n"
            f"prefill: {p.prefill.seconds * 1e3:.4g} ms = {p.prefill_tps:,.0f} tokens/s "
            f"(communication {p.prefill.exposed_comm_s * 1e3:.3g} ms exposed, "
            f"pipeline bubble {p.prefill.bubble_s * 1e3:.3g} ms)\n"
            f"decode step (tpot_ms): {p.decode_step_ms:.4g} ms for the batch = "
            f"{p.ms_per_token:.4g} ms per token (ms_per_token), {p.decode_tps:,.0f} tokens/s\n")
    fit = "fits" if p.fits else f"DOES NOT FIT: {p.reason}"
    m = p.memory
    mem = _table("memory of the fullest rank (" + fit + ")", ["component", "bytes"], [
        ["weights", fmt_bytes(m.weights)], ["KV cache", fmt_bytes(m.kv_cache)],
        ["activations (est.)", fmt_bytes(m.activations)],
        ["comm buffers (est.)", fmt_bytes(m.comm_buffers)],
        ["total", f"{fmt_bytes(m.total)} of {fmt_bytes(p.hbm_bytes)}"]])
    parts = [head, mem]
    for phase in ("prefill", "decode"):
        st = p.step(phase)
        parts.append(_table(f"{phase}: compute on the busiest rank", ["op", "GFLOP", "GB moved", "ms"],
                            [[o.name, f"{o.flops / 1e9:,.1f}", f"{o.bytes / 1e9:,.3f}",
                              f"{o.seconds * 1e3:.4g}"] for o in st.ops.values()]))
        if st.comms:
            parts.append(_table(f"{phase}: collectives per rank", ["op", "link", "calls", "MB", "ms"],
                                [[c.key, c.link, str(c.calls), f"{c.bytes / 1e6:,.2f}",
                                  f"{c.seconds * 1e3:.4g}"] for c in st.comms.values()]))
    parts += [f"note: {n}\n" for n in p.notes]
    return "\n".join(parts)


def predict_command(ref, plan: str, cluster: str = "h100-sxm-16", batch: int | None = None,
                    seq: int | None = None, phase: str | None = None) -> str:
    """``shardwise predict --model M --plan PLAN [--cluster C --batch B --seq T]``."""
    if Plan.parse(plan).is_composed:
        raise ShardwiseError(f"the cost model does not predict composed plans yet ({plan}); "
                             f"verify or bench it (shardwise verify --plan {plan}), or predict "
                             f"a single-strategy plan")
    spec, wl = _workload(ref, batch, seq, phase)
    return describe(predict(spec, wl, plan, load_cluster(cluster)))


def plan_command(ref, cluster: str = "h100-sxm-16", batch: int | None = None,
                 seq: int | None = None, phase: str = "prefill", top: int | None = None,
                 ranks: int | None = None) -> str:
    """``shardwise plan --model M [--cluster C --batch B --seq T --phase prefill|decode|both
    --top N --ranks R]``: every plan, ranked."""
    if phase not in ("prefill", "decode", "both"):
        raise ShardwiseError(f"--phase must be prefill, decode or both (got {phase!r})")
    spec, wl = _workload(ref, batch, seq, phase)
    cl = load_cluster(cluster)
    rows = rank_plans(enumerate_plans(spec, wl, cl, ranks), phase)
    shown = rows if top is None else [r for r in rows if r.valid][:top]
    table = []
    for i, r in enumerate(shown, 1):
        if not r.valid:
            table.append([r.plan, "invalid", "", "", "", "", r.error])
            continue
        p = r.prediction
        table.append([r.plan, "fits" if p.fits else "no fit", f"{p.prefill_tps:,.0f}",
                      f"{p.decode_step_ms:.4g}", f"{p.ms_per_token:.4g}", fmt_bytes(p.memory.total),
                      p.reason])
    n_ranks = ranks or cl.n_gpus
    title = (f"{spec.name}, batch {wl.batch}, context {wl.seq_len}, on {cl.name} ({n_ranks} GPUs), "
             f"ranked by {'prefill time' if phase == 'prefill' else 'decode step time' if phase == 'decode' else 'prefill + decode time'}")
    text = _table(title, ["plan", "status", "prefill tok/s", "step ms", "ms/token", "mem/rank", "why not"],
                  table)
    n_valid = sum(r.valid for r in rows)
    n_fit = sum(r.fits for r in rows)
    return text + f"{len(rows)} candidates: {n_valid} valid, {n_fit} fit in memory\n"
