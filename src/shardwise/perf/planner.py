"""Enumerate every plan for a model, workload and cluster; rank them by the
cost model; optionally run the best ones to check.

Candidates come from each strategy's ``candidates`` (plus micro-batch
variants for the strategies that micro-batch) and are filtered through its
``validate``, so the planner lists exactly the plans ``shardwise run`` would
accept on that many ranks. A valid plan that does not fit in memory is kept,
marked with the reason.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable

from ..parallel.base import available_strategies, get_strategy, validate_plan
from ..spec import ModelSpec, Plan, ShardwiseError, Workload
from .clusters import Cluster, load_cluster
from ..output import Col, Sheet, count, nbytes, num, plural, render
from .costmodel import Prediction, predict, resolve_capacity

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


@dataclass
class Ranking:
    """Every candidate for a model, workload and cluster, ranked; and the
    plans worth showing: valid ones, one per strategy and predicted figures
    (micro-batch counts or capacities that change nothing are shown once)."""

    spec: ModelSpec
    workload: Workload
    cluster: Cluster
    ranks: int
    phase: str
    rows: list[Row]  # every candidate: fitting ones fastest first, then no fit, then invalid
    shown: list[Row]  # the valid rows, one per strategy and figures, in rank order
    same: dict[str, list[str]]  # a shown plan -> the plans whose figures it repeats

    @property
    def invalid(self) -> list[Row]:
        return [r for r in self.rows if not r.valid]

    def best(self, top: int) -> list[str]:
        """The ``top`` fitting plans of the table, best first."""
        return [r.plan for r in self.shown if r.fits][:top]


def _figures(r: Row) -> tuple:
    p = r.prediction
    return (Plan.parse(r.plan).strategy, p.fits, f"{p.prefill_tps:.6g}",
            f"{p.decode_step_ms:.6g}", f"{p.memory.total:.6g}")


def _simplest(plan: str) -> tuple:
    """Which of several plans with the same figures to show: the fewest
    micro-batches, then the shortest name."""
    return (Plan.parse(plan).micro_batches, len(plan), plan)


def ranking(ref, cluster: str, batch: int | None, seq: int | None, phase: str,
            ranks: int | None = None, steps: int | None = None) -> Ranking:
    """Rank every candidate (:func:`enumerate_plans`) for the model ``ref``
    (a models.ModelRef or a name) names and its serving workload with the
    flags given. ``steps``: the decode positions the KV cache must hold (a
    benchmark sizes it for its warm-up and timed steps)."""
    if phase not in ("prefill", "decode", "both"):
        raise ShardwiseError(f"--phase must be prefill, decode or both (got {phase!r})")
    spec, wl = _workload(ref, batch, seq, phase, steps)
    cl = load_cluster(cluster)
    rows = rank_plans(enumerate_plans(spec, wl, cl, ranks), phase)
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        if r.valid:
            groups.setdefault(_figures(r), []).append(r)
    shown, same = [], {}
    for members in groups.values():
        pick = min(members, key=lambda r: _simplest(r.plan))
        shown.append(pick)
        same[pick.plan] = [r.plan for r in members if r is not pick]
    order = {id(r): i for i, r in enumerate(rows)}
    shown.sort(key=lambda r: order[id(r)])
    return Ranking(spec, wl, cl, ranks or cl.n_gpus, phase, rows, shown, same)


def best_fitting(ref, cluster: str, batch: int | None, seq: int | None, phase: str,
                 top: int, ranks: int | None = None,
                 steps: int | None = None) -> tuple[list[str], ModelSpec, Workload]:
    """The ``top`` plans that fit, best first, as the plan table lists them
    (what ``plan --validate`` and ``plan --run`` run), with the model and
    workload they were ranked for."""
    rk = ranking(ref, cluster, batch, seq, phase, ranks, steps)
    return rk.best(top), rk.spec, rk.workload


# -- what the CLI prints (output.py renders it) -------------------------------------

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


def describe(p: Prediction) -> list:
    """A prediction: headline figures, memory, compute ops and collectives."""
    wl, s = p.workload, p.spec
    title = (f"{s.name} {p.plan} on {p.cluster} ({plural(p.world_size, 'GPU')}), {s.dtype}, "
             f"batch {wl.batch}, context {wl.seq_len}")
    ms = lambda v: f"{num(v)} ms"  # noqa: E731
    figures = [
        ("prefill_ms", "prefill", p.prefill.seconds * 1e3, ms),
        ("prefill_tokens_per_s", "prefill throughput (tokens/s)", p.prefill_tps, count),
        ("prefill_exposed_comm_ms", "prefill communication exposed",
         p.prefill.exposed_comm_s * 1e3, ms),
        ("prefill_bubble_ms", "prefill pipeline bubble", p.prefill.bubble_s * 1e3, ms),
        ("tpot_ms", "decode step for the batch (tpot_ms)", p.decode_step_ms, ms),
        ("ms_per_token", "decode step / batch (ms_per_token)", p.ms_per_token, ms),
        ("decode_tokens_per_s", "decode throughput (tokens/s)", p.decode_tps, count),
        ("memory_bytes", "memory of the fullest rank", p.memory.total, nbytes),
        ("hbm_bytes", "memory per GPU", p.hbm_bytes, nbytes)]
    # The value column shows the human text; JSON and CSV keep the raw value.
    summary = Sheet("prediction", title,
                    [Col("figure", "figure"), Col("value", "value", row_text=lambda r: r["text"])],
                    [{"figure": label, "text": fmt(v), "key": key, "value": v}
                     for key, label, v, fmt in figures],
                    [] if p.fits else [f"DOES NOT FIT: {p.reason}"])
    m = p.memory
    mem = Sheet("memory", "memory of the fullest rank",
                [Col("component", "component"), Col("bytes", "bytes", nbytes)],
                [{"component": c, "bytes": b} for c, b in (
                    ("weights", m.weights), ("KV cache", m.kv_cache),
                    ("activations (est.)", m.activations),
                    ("comm buffers (est.)", m.comm_buffers), ("total", m.total))])
    parts: list = [summary, mem]
    for phase in ("prefill", "decode"):
        st = p.step(phase)
        parts.append(Sheet(f"{phase}_compute", f"{phase}: compute on the busiest rank", [
            Col("op", "op"), Col("GFLOP", "gflop", lambda v: f"{v:,.1f}"),
            Col("GB moved", "gb", lambda v: f"{v:,.3f}"), Col("ms", "ms", num)],
            [{"op": o.name, "gflop": o.flops / 1e9, "gb": o.bytes / 1e9, "ms": o.seconds * 1e3}
             for o in st.ops.values()]))
        if st.comms:
            parts.append(Sheet(f"{phase}_collectives", f"{phase}: collectives per rank", [
                Col("op", "op"), Col("link", "link", left=True), Col("calls", "calls", count),
                Col("MB", "mb", lambda v: f"{v:,.2f}"), Col("ms", "ms", num)],
                [{"op": c.key, "link": c.link, "calls": c.calls, "mb": c.bytes / 1e6,
                  "ms": c.seconds * 1e3} for c in st.comms.values()]))
    parts += [f"note: {n}" for n in p.notes]
    return parts


def predict_parts(ref, plan: str, cluster: str = "h100-sxm-16", batch: int | None = None,
                  seq: int | None = None, phase: str | None = None) -> list:
    """``shardwise predict --model M --plan PLAN [--cluster C --batch B --seq T]``."""
    spec, wl = _workload(ref, batch, seq, phase)
    return describe(predict(spec, wl, plan, load_cluster(cluster)))


def predict_command(*args, **kwargs) -> str:
    """:func:`predict_parts` as a table."""
    return render(predict_parts(*args, **kwargs))


# Reasons a plan table gives for its invalid plans, one line each (``--all``
# lists every plan).
INVALID_LINES = 5


def _invalid_summary(invalid: list[Row]) -> list[str]:
    """Invalid plans in a few lines: a plan and its micro-batch variants once,
    plans refused for the same reason together."""
    bases: dict[str, list[Row]] = {}
    for r in invalid:
        p = Plan.parse(r.plan)
        bases.setdefault(str(dataclasses.replace(p, micro_batches=1)), []).append(r)
    reasons: dict[str, list[str]] = {}
    for base, rows in bases.items():
        first = min(rows, key=lambda r: _simplest(r.plan))
        reason = first.error.replace(first.plan, "{plan}")
        variants = len(rows) - 1
        name = base + (f" (and {plural(variants, 'mb= variant')})" if variants else "")
        reasons.setdefault(reason, []).append((base, name))
    lines = []
    for reason, names in reasons.items():
        listed = ", ".join(n for _, n in names[:3])
        more = f" and {len(names) - 3} more" if len(names) > 3 else ""
        lines.append(f"- {listed}{more}: {reason.replace('{plan}', names[0][0])}")
    if len(lines) > INVALID_LINES:
        rest = len(lines) - INVALID_LINES
        lines = lines[:INVALID_LINES] + [f"- and {plural(rest, 'other reason')}"]
    return lines


def plan_parts(rk: Ranking, top: int | None = None, show_all: bool = False) -> list:
    """The plan table: valid plans ranked, one per figures (``show_all``:
    every valid plan, and the invalid ones in a table of their own), the
    invalid ones summarised under it."""
    rows = [r for r in rk.rows if r.valid] if show_all else rk.shown
    if top is not None:
        rows = rows[:top]
    by = {"prefill": "prefill time", "decode": "decode step time"}.get(
        rk.phase, "prefill + decode time")
    title = (f"{rk.spec.name}, batch {rk.workload.batch}, context {rk.workload.seq_len}, on "
             f"{rk.cluster.name} ({plural(rk.ranks, 'GPU')}), ranked by {by}")
    table = []
    for r in rows:
        p = r.prediction
        table.append({"plan": r.plan, "status": "fits" if p.fits else "no fit", "fits": p.fits,
                      "prefill_tokens_per_s": p.prefill_tps, "tpot_ms": p.decode_step_ms,
                      "ms_per_token": p.ms_per_token, "decode_tokens_per_s": p.decode_tps,
                      "memory_bytes": p.memory.total, "reason": p.reason,
                      "same_figures": [] if show_all else rk.same.get(r.plan, [])})
    cols = [Col("plan", "plan"), Col("status", "status", left=True),
            Col("prefill tok/s", "prefill_tokens_per_s", count),
            Col("step ms", "tpot_ms", num, 1), Col("ms/token", "ms_per_token", num, 3),
            Col("mem/rank", "memory_bytes", nbytes, 1),
            Col("why not", "reason", priority=2, wrap=True)]
    if not show_all:
        cols.append(Col("same figures", "same_figures", ", ".join, 4, wrap=True))
    n_valid = sum(r.valid for r in rk.rows)
    n_fit = sum(r.fits for r in rk.rows)
    repeats = n_valid - len(rk.shown)
    notes = [f"{len(rk.rows)} candidates: {n_valid} valid, {n_fit} fit in memory"
             + (f"; {len(rows)} shown" if len(rows) < n_valid else "")
             + (f" ({repeats} repeat the figures of a plan shown: --all lists them)"
                if repeats and not show_all else "")]
    invalid = rk.invalid
    if invalid and not show_all:
        notes.append(f"{len(invalid)} invalid on {plural(rk.ranks, 'rank')} (--all lists "
                     f"each):")
        notes += _invalid_summary(invalid)
    parts: list = [Sheet("plans", title, cols, table, notes)]
    if invalid and show_all:
        parts.append(Sheet("invalid", f"invalid on {plural(rk.ranks, 'rank')}",
                           [Col("plan", "plan"), Col("why", "error", wrap=True)],
                           [{"plan": r.plan, "error": r.error} for r in invalid]))
    return parts


def plan_command(ref, cluster: str = "h100-sxm-16", batch: int | None = None,
                 seq: int | None = None, phase: str = "prefill", top: int | None = None,
                 ranks: int | None = None) -> str:
    """``shardwise plan --model M [--cluster C --batch B --seq T --phase prefill|decode|both
    --top N --ranks R]``: every plan, ranked, as a table."""
    return render(plan_parts(ranking(ref, cluster, batch, seq, phase, ranks), top))
