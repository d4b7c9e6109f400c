"""Enumerate every plan for a model, workload and cluster; rank them by the
cost model; optionally run the best ones to check.

Candidates come from each strategy's ``candidates`` and from the
compositions of the cluster's ranks (:func:`~shardwise.parallel.plans.composition_candidates`:
mesh dimensions outermost first, so the innermost land on one node's
links), each filtered through its ``validate``, so the planner lists
exactly the plans ``shardwise run`` would accept on that many ranks.

Every plan that takes micro-batches (tp_pp, one stage or more; layerwise;
ring; every composition) is tried at one, or where that does not fit in
memory at the fewest that does, then at more while that is faster
(:func:`micro_batch_family`); helix or ep alone, which run the batch in one
piece, are tried where they do not fit as the one stage of a pipeline
(``pp:1/helix:4x4,mb=2``). A plan is reported as not fitting only when no
micro-batch count makes it fit. A valid plan that does not fit is kept,
marked with the reason; one the cost model cannot price too, with its own.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable

from ..parallel.registry import available_strategies, check_plan, plan_rules
from ..parallel.plans import composition_candidates
from ..spec import COMPOSE_ONLY, ModelSpec, Plan, ShardwiseError, Workload
from .clusters import Cluster, load_cluster
from ..output import Col, Sheet, count, nbytes, num, plural, render
from .costmodel import Prediction, predict, recorded_phases, resolve_capacity
from .heap import young_heap
from .prerecord import sharing
from .recordings import checked, recording_key
from ..parallel.partition import (_NAMED, Partition, PartitionError, fmt_bytes, parse_capacity,
                                  partition, per_replica)

# Micro-batch counts tried for every plan that takes them (more where none fits).
MICRO_BATCHES = (1, 2, 4, 8, 16, 32)


@dataclass
class Row:
    plan: str
    prediction: Prediction | None = None
    error: str = ""  # why the plan is not valid on these ranks
    unpriced: str = ""  # a valid plan the cost model cannot price: why
    memory: bool = False  # the error is that no layer partition fits the capacity
    note: str = ""  # what the table adds to the reason a plan does not fit

    @property
    def valid(self) -> bool:
        return not self.error

    @property
    def priced(self) -> bool:
        return self.prediction is not None

    @property
    def fits(self) -> bool:
        return self.priced and self.prediction.fits


def family(plan: str | Plan) -> str:
    """A plan without its micro-batch count: the plans that differ only in it
    (a plan and its :meth:`~shardwise.spec.Plan.one_stage` form are one)."""
    p = Plan.parse(plan) if isinstance(plan, str) else plan
    p = dataclasses.replace(p, micro_batches=1)
    if len(p.parts) == 2 and p.parts[0] == Plan("pp", (1,)) \
            and p.parts[1].strategy not in COMPOSE_ONLY and not p.parts[1].takes_micro_batches:
        p = p.parts[1]
    return str(p)


def base_plans(spec: ModelSpec, workload: Workload, ranks: int,
               cluster: Cluster) -> list[Plan]:
    """Every strategy's candidates on ``ranks`` ranks and the compositions of
    that many ranks, capacities named L2/HBM read from ``cluster``, each
    once, without micro-batches."""
    texts = [t for name in available_strategies()
             for t in plan_rules(name).candidates(spec, workload, ranks)]
    texts += composition_candidates(ranks, spec.is_moe)
    out: dict[str, Plan] = {}
    for text in texts:
        plan = resolve_capacity(Plan.parse(text), cluster)
        out.setdefault(str(plan), plan)
    return list(out.values())


def evaluate(spec: ModelSpec, workload: Workload, plan: Plan | str, cluster: Cluster,
             ranks: int) -> Row:
    """One candidate: its prediction, or why it is invalid or unpriced."""
    text = str(plan)
    try:
        checked(spec, workload, text, ranks)
    except ShardwiseError as e:
        return Row(text, error=ranks_flag(str(e)), memory=isinstance(e, PartitionError))
    try:
        return Row(text, predict(spec, workload, text, cluster, ranks))
    except ShardwiseError as e:
        return Row(text, unpriced=ranks_flag(str(e)))


def ranks_flag(message: str) -> str:
    """A plan's validation message as plan and predict take a rank count:
    ``--ranks N``, where a launch takes ``--nproc N``."""
    return message.replace("--nproc", "--ranks")


def _fit_known(r: Row) -> bool:
    """Whether a row says how the plan stands in memory (fits, does not,
    or no layer partition fits)."""
    return r.priced or r.memory


def micro_batch_family(spec: ModelSpec, workload: Workload, base: Plan, cluster: Cluster,
                       ranks: int, micro_batches: Iterable[int] = MICRO_BATCHES,
                       phase: str = "both") -> list[Row]:
    """``base`` at one micro-batch; where that does not fit in memory, at the
    fewest micro-batches that fit (a stage holds one micro-batch's
    activations, so more of them need less memory): a bisection between one
    and the batch (one sequence each; if that does not fit, no count does).
    Then at the counts of ``micro_batches`` above that, in increasing order,
    until one is slower in ``phase`` than the fastest before it: a pipeline
    of P stages takes about (m + P - 1) micro-batch times at m
    micro-batches, which falls with the bubble and then rises with each
    micro-batch's fixed cost, so the counts past it are slower still. A
    plan without micro-batches, or one that is invalid or unpriced at one
    micro-batch, is its one row. A plan that takes no micro-batches
    (helix or ep alone) and does not fit is followed by the counts above one
    of its :meth:`~shardwise.spec.Plan.one_stage` form that this tries, where that form is valid."""
    at = lambda mb: evaluate(spec, workload, dataclasses.replace(base, micro_batches=mb),  # noqa: E731
                             cluster, ranks)
    first = at(1)
    if not base.takes_micro_batches and first.priced and not first.fits:
        staged = micro_batch_family(spec, workload, base.one_stage(), cluster, ranks,
                                    micro_batches, phase)
        return [first] + [r for r in staged
                          if r.valid and Plan.parse(r.plan).micro_batches > 1]
    if not base.takes_micro_batches or not _fit_known(first):
        return [first]
    rows = {1: first}
    counts = sorted(mb for mb in set(micro_batches) if 1 < mb <= workload.batch)
    if first.fits:
        fastest = first
    else:
        # The fewest that fit, by bisection between one micro-batch and one
        # sequence each (the least memory): none if that does not fit.
        lo, hi = 1, workload.batch
        if hi == lo:
            return [first]
        fastest = rows[hi] = at(hi)
        if not fastest.fits:
            return [rows[mb] for mb in sorted(rows)]
        while hi - lo > 1:
            mid = (lo + hi) // 2
            r = rows[mid] = at(mid)
            if not _fit_known(r):
                break
            if r.fits:
                hi, fastest = mid, r
            else:
                lo = mid
        counts = [mb for mb in counts if mb > hi and mb not in rows]
    for mb in counts:
        r = rows[mb] = at(mb)
        if not _fit_known(r):  # the others are unpriced for the same reason
            break
        if r.fits and score(r.prediction, phase) >= score(fastest.prediction, phase):
            break
        if r.fits:
            fastest = r
    return [rows[mb] for mb in sorted(rows)]


def enumerate_plans(spec: ModelSpec, workload: Workload, cluster: Cluster,
                    ranks: int | None = None,
                    micro_batches: Iterable[int] = MICRO_BATCHES,
                    phase: str = "both", on_plan=None) -> list[Row]:
    """Every candidate on ``ranks`` (default: all the cluster's GPUs) at
    the micro-batch counts of :func:`micro_batch_family`: valid ones with
    their prediction, invalid ones with the validation error, unpriced
    ones with the reason. ``on_plan(done, total, plan)``: called before
    each plan's family is priced (a progress display)."""
    ranks = cluster.n_gpus if ranks is None else ranks
    if not 1 <= ranks <= cluster.n_gpus:
        raise ShardwiseError(f"--ranks {ranks}: cluster {cluster.name} has {cluster.n_gpus} "
                             f"GPUs; give --ranks {cluster.n_gpus} or fewer")
    micro_batches = tuple(micro_batches)
    bases = base_plans(spec, workload, ranks, cluster)
    family_of = lambda i: micro_batch_family(spec, workload, bases[i], cluster, ranks,  # noqa: E731
                                             micro_batches, phase)
    rows: list[Row] = []
    # A first ranking is recorded by several processes where that pays.
    keys = [recording_key(spec, workload, resolve_capacity(Plan.parse(str(b)), cluster), ranks,
                          phases=recorded_phases(None)) for b in bases]
    with young_heap() as collect, sharing(keys, family_of) as share:
        for i, base in enumerate(bases):
            collect()
            share.start(i)
            if on_plan is not None:
                on_plan(i, len(bases), str(base))
            rows += family_of(i)
    return rows


def best_micro_batching(rows: list[Row], phase: str) -> Row | None:
    """The fastest of a plan's rows that fits, or None."""
    fitting = [r for r in rows if r.fits]
    return min(fitting, key=lambda r: score(r.prediction, phase)) if fitting else None


def score(p: Prediction, phase: str) -> float:
    """Seconds to minimise: the prefill, one decode step, or a whole request
    (prefill plus every decode step) for ``both``."""
    if phase == "prefill":
        return p.prefill.seconds
    if phase == "decode":
        return p.decode.seconds
    return p.prefill.seconds + p.workload.decode_steps * p.decode.seconds


def rank_plans(rows: list[Row], phase: str) -> list[Row]:
    """Plans that fit, fastest first; then priced plans that do not fit;
    then valid plans the cost model does not price; then invalid ones."""
    def key(r: Row):
        if not r.valid:
            return (3, 0.0, r.plan)
        if not r.priced:
            return (2, 0.0, r.plan)
        return (0 if r.fits else 1, score(r.prediction, phase), r.plan)

    return sorted(rows, key=key)


@dataclass
class Ranking:
    """Every candidate for a model, workload and cluster, ranked; and the
    plans worth showing: priced ones, one per strategy and predicted figures
    (micro-batch counts or capacities that change nothing are shown once),
    none at a micro-batch count that does not fit where another count does."""

    spec: ModelSpec
    workload: Workload
    cluster: Cluster
    ranks: int
    phase: str
    rows: list[Row]  # every candidate: fitting ones fastest first, then no fit, unpriced, invalid
    shown: list[Row]  # the priced rows worth showing, in rank order
    same: dict[str, list[str]]  # a shown plan -> the plans whose figures it repeats
    fitting_families: set[str]  # plans (without mb=) that fit at some micro-batch count

    @property
    def invalid(self) -> list[Row]:
        """Invalid rows, but for a capacity no partition fits at a micro-batch
        count where another count of the plan fits."""
        return [r for r in self.rows if not r.valid
                and not (r.memory and family(r.plan) in self.fitting_families)]

    @property
    def unpriced(self) -> list[Row]:
        """Valid rows the cost model does not price, of plans priced at no
        micro-batch count (a composition whose replicas' plan takes no mb=)."""
        priced = {family(r.plan) for r in self.rows if r.priced}
        return [r for r in self.rows if r.valid and not r.priced
                and family(r.plan) not in priced]

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


def rank_rows(spec: ModelSpec, wl: Workload, cl: Cluster, rows: list[Row], phase: str,
              ranks: int) -> Ranking:
    """``rows`` ranked (:func:`rank_plans`), and the ones to show: of a plan
    that fits at some micro-batch count, the counts that fit; of one that
    fits at none, the count that needs the least memory, with a note."""
    rows = rank_plans(rows, phase)
    families: dict[str, list[Row]] = {}
    for r in rows:
        if r.priced:
            families.setdefault(family(r.plan), []).append(r)
    fitting = {f for f, members in families.items() if any(r.fits for r in members)}
    candidates = []
    for f, members in families.items():
        if f in fitting:
            candidates += [r for r in members if r.fits]
            continue
        least = min(members, key=lambda r: (r.prediction.memory.total, _simplest(r.plan)))
        if len(members) > 1:
            most = max(Plan.parse(r.plan).micro_batches for r in members)
            least.note = f"no micro-batch count fits (up to mb={most} tried)"
        candidates.append(least)
    groups: dict[tuple, list[Row]] = {}
    for r in candidates:
        groups.setdefault(_figures(r), []).append(r)
    shown, same = [], {}
    for members in groups.values():
        pick = min(members, key=lambda r: _simplest(r.plan))
        shown.append(pick)
        same[pick.plan] = [r.plan for r in members if r is not pick]
    order = {id(r): i for i, r in enumerate(rows)}
    shown.sort(key=lambda r: order[id(r)])
    return Ranking(spec, wl, cl, ranks, phase, rows, shown, same, fitting)


def ranking(ref, cluster: str, batch: int | None, seq: int | None, phase: str,
            ranks: int | None = None, steps: int | None = None, on_plan=None) -> Ranking:
    """Rank every candidate (:func:`enumerate_plans`) for the model ``ref``
    (a models.ModelRef or a name) names and its serving workload with the
    flags given. ``steps``: the decode positions the KV cache must hold (a
    benchmark sizes it for its warm-up and timed steps). ``on_plan``: as
    :func:`enumerate_plans` takes it."""
    if phase not in ("prefill", "decode", "both"):
        raise ShardwiseError(f"--phase must be prefill, decode or both (got {phase!r})")
    spec, wl = _workload(ref, batch, seq, phase, steps)
    cl = load_cluster(cluster)
    return rank_rows(spec, wl, cl, enumerate_plans(spec, wl, cl, ranks, phase=phase,
                                                   on_plan=on_plan), phase, ranks or cl.n_gpus)


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
                  seq: int | None = None, phase: str | None = None,
                  ranks: int | None = None) -> list:
    """``shardwise predict --model M --plan PLAN [--cluster C --ranks N --batch B --seq T]``."""
    spec, wl = _workload(ref, batch, seq, phase)
    p, cl = Plan.parse(plan), load_cluster(cluster)
    if ranks is not None and ranks > cl.n_gpus:
        raise ShardwiseError(f"--ranks {ranks}: cluster {cl.name} has {cl.n_gpus} GPUs; give "
                             f"--ranks {cl.n_gpus} or fewer")
    try:
        if not p.is_composed:
            return describe(predict(spec, wl, p, cl, ranks))
        check_plan(spec, wl, p, ranks)
    except ShardwiseError as e:
        raise ShardwiseError(ranks_flag(str(e))) from None
    try:
        return describe(predict(spec, wl, p, cl, ranks))
    except ShardwiseError as e:
        raise ShardwiseError(f"{e}; verify or bench it (shardwise verify --plan {plan}), or "
                             f"predict a single-strategy plan") from None


def predict_command(*args, **kwargs) -> str:
    """:func:`predict_parts` as a table."""
    return render(predict_parts(*args, **kwargs))


# Reasons a plan table gives for its invalid (or unpriced) plans, one line
# each (``--all`` lists every plan).
INVALID_LINES = 5


def _summary(rows: list[Row], why: str = "error") -> list[str]:
    """Plans in a few lines with their reasons (``why``: the Row field): a
    plan and its micro-batch variants once, plans with the same reason
    together."""
    bases: dict[str, list[Row]] = {}
    for r in rows:
        bases.setdefault(family(r.plan), []).append(r)
    reasons: dict[str, list[str]] = {}
    for base, members in bases.items():
        # Named by its simplest member: the family's own name where that is
        # among them, else the micro-batch count refused (the others shown).
        first = min(members, key=lambda r: _simplest(r.plan))
        reason = getattr(first, why).replace(first.plan, "{plan}")
        variants = len(members) - 1
        name = first.plan + (f" (and {plural(variants, 'mb= variant')})" if variants else "")
        reasons.setdefault(reason, []).append((first.plan, name))
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
    """The plan table: priced plans ranked, one per figures (``show_all``:
    every priced plan, and the unpriced and invalid ones in tables of their
    own), the unpriced and invalid ones summarised under it."""
    rows = [r for r in rk.rows if r.priced] if show_all else rk.shown
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
                      "memory_bytes": p.memory.total,
                      "reason": "; ".join(filter(None, (p.reason, r.note))),
                      "same_figures": [] if show_all else rk.same.get(r.plan, [])})
    cols = [Col("plan", "plan"), Col("status", "status", left=True),
            Col("prefill tok/s", "prefill_tokens_per_s", count),
            Col("step ms", "tpot_ms", num, 1), Col("ms/token", "ms_per_token", num, 3),
            Col("mem/rank", "memory_bytes", nbytes, 1),
            Col("why not", "reason", priority=2, wrap=True)]
    if not show_all:
        cols.append(Col("same figures", "same_figures", ", ".join, 4, wrap=True))
    n_valid = sum(r.valid for r in rk.rows)
    n_priced = sum(r.priced for r in rk.rows)
    n_fit = sum(r.fits for r in rk.rows)
    repeats = sum(len(v) for v in rk.same.values())
    counts = n_priced - len(rk.shown) - repeats
    hidden = [f"{repeats} repeat the figures of a plan shown"] if repeats else []
    hidden += [f"{counts} are micro-batch counts of a plan shown that do not fit where "
               f"another does, or need more memory where none does"] if counts else []
    notes = [f"{len(rk.rows)} candidates: {n_valid} valid, {n_priced} priced, {n_fit} fit in "
             f"memory" + (f"; {len(rows)} shown" if len(rows) < n_priced else "")
             + (f" ({'; '.join(hidden)}: --all lists them)" if hidden and not show_all else "")]
    unpriced, invalid = rk.unpriced, rk.invalid
    if unpriced and not show_all:
        notes.append(f"{len(unpriced)} valid but not priced by the cost model (--all lists "
                     f"each):")
        notes += _summary(unpriced, "unpriced")
    if invalid and not show_all:
        notes.append(f"{len(invalid)} invalid on {plural(rk.ranks, 'rank')} (--all lists "
                     f"each):")
        notes += _summary(invalid)
    parts: list = [Sheet("plans", title, cols, table, notes)]
    unpriced = [r for r in rk.rows if r.valid and not r.priced]
    if unpriced and show_all:
        parts.append(Sheet("unpriced", "valid, not priced by the cost model",
                           [Col("plan", "plan"), Col("why", "unpriced", wrap=True)],
                           [{"plan": r.plan, "unpriced": r.unpriced} for r in unpriced]))
    invalid = [r for r in rk.rows if not r.valid]
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


# -- shardwise partition ------------------------------------------------------------

def partition_parts(ref, capacity: str, ranks: int, batch: int | None = None,
                    seq: int | None = None, micro_batches: int = 1,
                    cluster: str | None = None) -> list:
    """``shardwise partition --model M --capacity C --ranks R [--batch B --seq T
    --cluster C]``: the groups for the model ``ref`` (a models.ModelRef)
    names and its serving workload (the seed's for a preset; ``batch`` and
    ``seq`` override it), L2 and HBM read from ``cluster``'s profile. Raises
    ShardwiseError when nothing fits."""
    from ..models import as_ref

    ref = as_ref(ref)
    serve = ref.serve_workload
    workload = serve.replace(batch=serve.batch if batch is None else batch,
                             seq_len=serve.seq_len if seq is None else seq)
    # Read even where the capacity is in bytes: a --cluster that names nothing is refused.
    cl = load_cluster(cluster) if cluster is not None else None
    named = cl is not None and _NAMED.fullmatch(capacity.strip())
    part = partition(ref.spec, workload, parse_capacity(capacity, cl), ranks, micro_batches,
                     ranks_flag="--ranks", capacity_flag="--capacity ")
    return partition_sheets(part, ref.spec, workload,
                            f"{capacity} of {cl.name}" if named else None)


def partition_sheets(part: Partition, spec: ModelSpec, workload: Workload,
                     source: str | None = None) -> list:
    """The groups of a partition: layers, bytes, predicted time."""
    from ..output import Col, Sheet, nbytes, num

    cap = fmt_bytes(part.capacity) + (f" ({source})" if source else "")
    head = (f"{spec.name}: {plural(spec.n_layers, 'layer')}, batch {workload.batch}, seq "
            f"{workload.seq_len}, capacity {cap} per device, {plural(part.ranks, 'rank')}\n"
            f"-> {plural(len(part.groups), 'group')} x {plural(part.replicas, 'replica')} = "
            f"{plural(part.ranks_used, 'rank')}"
            + (f" ({part.idle_ranks} idle)" if part.idle_ranks else ""))
    rows = [{"group": n, "first_layer": g.layers.start, "last_layer": g.layers.stop - 1,
             "weight_bytes": g.weight_bytes, "kv_bytes": g.kv_bytes,
             "work_bytes": g.work_bytes, "total_bytes": g.total_bytes,
             "time_ms": 1e3 * g.time_s} for n, g in enumerate(part.groups)]
    sheet = Sheet("groups", "", [
        Col("group", "group"),
        Col("layers", "first_layer", row_text=lambda r: f"{r['first_layer']}-{r['last_layer']}"),
        Col("weights", "weight_bytes", nbytes, 1), Col("KV cache", "kv_bytes", nbytes, 1),
        Col("working", "work_bytes", nbytes, 2), Col("total", "total_bytes", nbytes),
        Col("time (ms)", "time_ms", lambda v: num(v, 4))], rows,
        [f"bottleneck {1e3 * part.bottleneck_s:.4g} ms: the slowest group on its replica's "
         f"{plural(per_replica(workload.batch, part.replicas), 'sequence')} "
         f"(prefill + decode steps)"])
    return [head, sheet]


def format_partition(part: Partition, spec: ModelSpec, workload: Workload) -> str:
    """:func:`partition_sheets` as a table."""
    from ..output import render

    return render(partition_sheets(part, spec, workload))


def partition_command(*args, **kwargs) -> str:
    """:func:`partition_parts` as a table."""
    from ..output import render

    return render(partition_parts(*args, **kwargs))
