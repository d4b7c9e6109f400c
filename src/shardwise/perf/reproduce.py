"""Set the seed experiments' claimed figures beside shardwise's predictions,
check the claims against each other and against the hardware, and measure
the cost model's error against real runs (``fidelity``).

The claimed figures below are transcribed from the seed documents (by id).
Each claim is a TPS and a TPOT; the documents do not say whether TPS is
prefill or decode throughput, nor whether TPOT is a decode step's latency or
that latency divided by the batch, so the checks test each reading.
"""
from __future__ import annotations

import dataclasses
import statistics
from dataclasses import dataclass

from ..parallel.registry import validate_plan
from ..bench.records import command_option
from ..presets import get_preset
from ..spec import ModelSpec, Plan, ShardwiseError, Workload, dtype_bytes
from .clusters import Cluster, load_cluster
from ..output import Sheet
from .costmodel import Prediction, fmt_bytes, predict, resolve_capacity
from .planner import best_micro_batching, enumerate_plans, micro_batch_family, rank_rows

# The claims are a TPS and a TPOT: plans are compared on a whole request (the
# prefill and every decode step), each at its fastest micro-batching that fits.
PHASE = "both"

# Datasheet peaks (H100 SXM): dense fp16/bf16 tensor cores and HBM3; the
# claims are checked against what the hardware could do at best.
H100_PEAK_FLOPS = 989e12
H100_PEAK_HBM = 3.35e12


@dataclass(frozen=True)
class Claim:
    plan: str
    tps: float  # tokens/s
    tpot_ms: float


@dataclass(frozen=True)
class SeedClaims:
    doc: str  # seed document id
    presets: tuple[str, ...]
    gpus: int
    baseline: Claim
    proposed: Claim


SEEDS: dict[str, SeedClaims] = {s.doc: s for s in (
    # "2-layer Dense ... Baseline (TP=8, PP=2) 1,200,000 0.35; Proposed (m x n=16) 1,580,000 0.22"
    SeedClaims("000_cf9853f796bd8a98", ("seed-helix-2l",), 16,
               Claim("tp_pp:8x2", 1_200_000, 0.35), Claim("helix:4x4", 1_580_000, 0.22)),
    # "Baseline TP=8, PP=2 1.20M 0.85; RA+SP 1.45M 0.70"
    SeedClaims("001_540de35c73915cd1", ("seed-ring-4l",), 16,
               Claim("tp_pp:8x2", 1_200_000, 0.85), Claim("ring:16", 1_450_000, 0.70)),
    # "TPS 12,800 -> 15,360; TPOT 0.078 -> 0.065 ms"
    SeedClaims("002_c95086c2ea772412", ("seed-layerwise-3b", "seed-layerwise-30b"), 16,
               Claim("tp_pp:8x2", 12_800, 0.078), Claim("layerwise:cap=L2", 15_360, 0.065)),
    # "Baseline (TP=8, PP=2): TPS 120,000, TPOT 8.3 ms; Proposed (EP=16): 450,000, 2.2 ms"
    SeedClaims("003_20484a92daf2c30a", ("seed-moe-16l",), 16,
               Claim("tp_pp:8x2", 120_000, 8.3), Claim("ep:16", 450_000, 2.2)),
    # "4-layer Dense ... 1,200,000 0.35; Proposed (m x n=16) 1,580,000 0.22"
    SeedClaims("004_440e515445fd6fd9", ("seed-helix-4l",), 16,
               Claim("tp_pp:8x2", 1_200_000, 0.35), Claim("helix:4x4", 1_580_000, 0.22)),
)}


def find_seed(name: str) -> tuple[SeedClaims, list[str]]:
    """A seed by preset name, document id, id prefix (``000``) or file name."""
    key = name.removesuffix(".txt")
    for s in SEEDS.values():
        if key in s.presets:
            return s, [key]
        if s.doc == key or s.doc.startswith(key + "_") or s.doc.split("_")[0] == key:
            return s, list(s.presets)
    raise ShardwiseError(f"unknown seed {name!r}; give a preset "
                         f"({', '.join(p for s in SEEDS.values() for p in s.presets)}) "
                         f"or a document id ({', '.join(s.doc[:3] for s in SEEDS.values())})")


def model_flops_per_token(spec: ModelSpec, context: int) -> float:
    """Forward FLOPs of one prompt token: 2 per weight it meets (top-k experts
    for MoE) plus Q.K^T and P.V over its average causal context (context+1)/2."""
    mlp = spec.top_k * spec.expert_params() if spec.is_moe else spec.mlp_params()
    per_layer = 2 * (spec.attn_params() + mlp)
    per_layer += 4 * spec.n_heads * spec.head_dim * (context + 1) / 2
    return spec.n_layers * per_layer


def decode_floor_s(spec: ModelSpec, wl: Workload, gpus: int) -> float:
    """The shortest a decode step can be: every weight and the whole KV cache
    read once, over all GPUs' HBM at datasheet bandwidth."""
    e = dtype_bytes(spec.dtype)
    kv = spec.n_layers * 2 * wl.batch * spec.kv_heads * spec.head_dim * wl.seq_len * e
    return (spec.total_params() * e + kv) / (gpus * H100_PEAK_HBM)


def consistency(seed: SeedClaims, spec: ModelSpec, wl: Workload) -> list[str]:
    """What the claimed figures imply, computed (nothing here is hand-written)."""
    out = []
    B, P = wl.batch, seed.gpus
    floor = decode_floor_s(spec, wl, P)
    flops = model_flops_per_token(spec, wl.seq_len)
    e = dtype_bytes(spec.dtype)
    kv = spec.n_layers * 2 * B * spec.kv_heads * spec.head_dim * (wl.seq_len + 1) * e
    if kv > P * 80e9:
        out.append(f"the KV cache at batch {B}, context {wl.seq_len} is {fmt_bytes(kv)}, more "
                   f"than {P} x 80 GB: decode at that size cannot run on the seed's cluster")
    for label, c in (("baseline", seed.baseline), ("proposed", seed.proposed)):
        inflight = c.tps * c.tpot_ms * 1e-3
        if abs(inflight - B) / B < 0.05:
            reading = (f"= batch {B}: TPS is decode throughput batch / TPOT, so TPOT is the "
                       f"step latency")
        elif abs(inflight - 1) < 0.05:
            reading = "= 1: TPOT is just 1 / TPS, the same figure twice, not a latency"
        else:
            reading = f"matches neither the batch ({B}) nor 1: the two figures disagree"
        out.append(f"{label}: TPS x TPOT = {c.tps:,.0f} x {c.tpot_ms} ms = {inflight:,.1f} "
                   f"tokens in flight {reading}")
        step_if_per_token = c.tpot_ms * B
        verdicts = []
        for what, ms in (("a step's latency", c.tpot_ms), ("step / batch", step_if_per_token)):
            ok = ms * 1e-3 >= floor
            verdicts.append(f"as {what} ({ms:.4g} ms per step) it is "
                            f"{'above' if ok else 'BELOW'} the HBM floor")
        out.append(f"{label}: a decode step must read {fmt_bytes(floor * P * H100_PEAK_HBM)} "
                   f"(weights + KV cache), >= {floor * 1e3:.3g} ms on {P} GPUs at "
                   f"{H100_PEAK_HBM / 1e12} TB/s; TPOT {c.tpot_ms} ms " + "; ".join(verdicts))
        mfu = c.tps * flops / (P * H100_PEAK_FLOPS)
        out.append(f"{label}: as prefill, {c.tps:,.0f} tokens/s x {flops / 1e9:.3g} GFLOP/token "
                   f"= {mfu:.1%} of {P} GPUs' dense peak"
                   + (" (impossible)" if mfu > 1 else ""))
    return out


def _measured(r: dict) -> list[tuple[str, float]]:
    """What a record measured, as (metric, value): prefill tokens/s and/or
    the decode step in ms, each compared only with its own prediction."""
    phase = r.get("phase", "both")
    out = []
    tps = r.get("tps") if "phase" in r else r.get("prefill_tokens_per_s")
    if tps and phase in ("prefill", "both"):
        out.append(("prefill tok/s", tps))
    step = r.get("median_ms") if phase == "decode" else r.get("tpot_ms")
    if step and phase in ("decode", "both"):
        out.append(("decode step ms", step))
    return out


def _predicted(p: Prediction, metric: str) -> float:
    return p.prefill_tps if metric.startswith("prefill") else p.decode_step_ms


def _measured_sheet(results: list[str], preset: str, profile: Cluster | None) -> Sheet:
    """The records of ``preset`` in ``results``: one row per record and metric,
    its measurement beside the prediction of the same metric on ``profile``."""
    from ..bench.records import read_records
    from ..output import Col, count, num

    rows = []
    for path in results:
        for r in read_records(path):
            if r.get("preset") != preset:
                continue
            p, why = None, ""
            if profile is not None:
                try:
                    spec, wl, plan, world = record_case(r, profile)
                    p = predict(spec, wl, plan, profile, world, graphs=r.get("cuda_graphs"),
                                prefill_graphs=prompt_graphed(r))
                except ShardwiseError as e:
                    why = str(e)
            for metric, value in _measured(r):
                pred = _predicted(p, metric) if p is not None else None
                rows.append({"plan": r["plan"], "ranks": r.get("n_devices") or r.get("world_size"),
                             "batch": r.get("batch"), "seq_len": r.get("seq_len"),
                             "device": r.get("device", ""), "metric": metric,
                             "measured": value, "predicted": pred,
                             "error": pred / value - 1 if pred else None, "why": why})
    fmt = lambda v, r: count(v) if r["metric"].startswith("prefill") else num(v)  # noqa: E731
    cols = [Col("plan", "plan"), Col("ranks", "ranks", priority=2),
            Col("batch x seq", "batch", priority=1,
                row_text=lambda r: f"{r['batch']}x{r['seq_len']}"),
            Col("device", "device", left=True, priority=3), Col("metric", "metric", left=True),
            Col("measured", "measured", row_text=lambda r: fmt(r["measured"], r))]
    if profile is not None:
        cols += [Col("predicted", "predicted", row_text=lambda r: (
                     fmt(r["predicted"], r) if r["predicted"] else "-")),
                 Col("error", "error", lambda v: "-" if v is None else f"{v:+.0%}"),
                 Col("not predicted", "why", priority=4, wrap=True)]
    return Sheet(f"measured_{preset}", f"measured runs of {preset}" + (
        f" (predictions on {profile.name})" if profile else ""), cols, rows)


def reproduce_parts(seed_name: str, cluster: str = "h100-sxm-16",
                    results: list[str] | None = None,
                    measured_profile: str | None = None) -> list:
    """``shardwise reproduce SEED [--cluster C] [--results FILE ... --profile P]``."""
    from ..output import Col, count, num

    seed, presets = find_seed(seed_name)
    cl = load_cluster(cluster)
    parts: list = []
    for name in presets:
        p = get_preset(name)
        spec, wl = p.model, p.workload
        rows = []
        preds: dict[str, Prediction] = {}

        def add(what: str, row, claimed: dict) -> None:
            if not row.priced:
                rows.append({"role": what, "plan": row.plan, **claimed,
                             "memory": f"invalid: {row.error}" if row.error
                             else f"not priced: {row.unpriced}"})
                return
            pr = row.prediction
            rows.append({"role": what, "plan": str(pr.plan), **claimed,
                         "prefill_tokens_per_s": pr.prefill_tps,
                         "tpot_ms": pr.decode_step_ms, "ms_per_token": pr.ms_per_token,
                         "memory": "fits" if pr.fits else f"no fit: {pr.reason}"})

        for label, claim in (("baseline", seed.baseline), ("proposed", seed.proposed)):
            claimed = {"claimed_tps": claim.tps, "claimed_tpot_ms": claim.tpot_ms}
            tries = [(label, claim.plan)]
            if claim.plan.startswith("layerwise"):  # what the strategy can do on this cluster
                tries.append((f"{label} (HBM)", "layerwise:cap=HBM"))
            for what, plan in tries:
                # The plan at its best micro-batching (the fastest count that fits).
                family = micro_batch_family(spec, wl, resolve_capacity(Plan.parse(plan), cl),
                                            cl, cl.n_gpus, phase=PHASE)
                row = best_micro_batching(family, PHASE) or family[0]
                add(what, row, claimed)
                if row.priced:
                    preds.setdefault(label, row.prediction)
                    break
        rk = rank_rows(spec, wl, cl, enumerate_plans(spec, wl, cl, phase=PHASE), PHASE,
                       cl.n_gpus)
        best = [r for r in rk.shown if r.fits][:1]
        if best:
            add("planner's best", best[0], {})
            preds["best"] = best[0].prediction
        else:
            rows.append({"role": "planner's best", "plan": "-",
                         "memory": f"no plan fits {cl.name}"})
        title = (f"seed {seed.doc} / preset {name}: {spec.name}, {spec.dtype}, batch {wl.batch}, "
                 f"context {wl.seq_len}; claimed vs predicted on {cl.name}")
        parts.append(Sheet(f"claims_{name}", title, [
            Col("", "role", left=True), Col("plan", "plan"),
            Col("claimed TPS", "claimed_tps", count), Col("claimed TPOT ms", "claimed_tpot_ms", num),
            Col("pred. prefill tok/s", "prefill_tokens_per_s", count),
            Col("pred. step ms", "tpot_ms", num), Col("pred. ms/token", "ms_per_token", num, 2),
            Col("memory", "memory", priority=3, wrap=True)], rows))
        if "baseline" in preds and "proposed" in preds:
            b, q = preds["baseline"], preds["proposed"]
            parts.append(f"claimed gain: TPS x{seed.proposed.tps / seed.baseline.tps:.3g}, TPOT "
                         f"x{seed.proposed.tpot_ms / seed.baseline.tpot_ms:.3g}; predicted: prefill "
                         f"x{q.prefill_tps / b.prefill_tps:.3g}, decode step "
                         f"x{q.decode_step_ms / b.decode_step_ms:.3g}")
        if "baseline" in preds and "best" in preds:
            b, q = preds["baseline"], preds["best"]
            parts.append(f"the planner's best over the baseline: prefill "
                         f"x{q.prefill_tps / b.prefill_tps:.3g}, decode step "
                         f"x{q.decode_step_ms / b.decode_step_ms:.3g}")
        parts.append("consistency of the seed's own figures:\n"
                     + "\n".join(f"- {line}" for line in consistency(seed, spec, wl)))
        if p.notes:
            parts.append("preset notes:\n" + "\n".join(f"- {n}" for n in p.notes))
        if results:
            prof = load_cluster(measured_profile) if measured_profile else None
            sheet = _measured_sheet(results, name, prof)
            if sheet.rows:
                parts.append(sheet)
    return parts


def reproduce_command(*args, **kwargs) -> str:
    """:func:`reproduce_parts` as a table."""
    from ..output import render

    return render(reproduce_parts(*args, **kwargs))


# -- fidelity: the model's error against measured runs -------------------------------

def record_decode_steps(r: dict) -> int:
    """Decode positions the run's KV cache was sized for: a ``verify``/``run``
    record says (``decode_steps``); ``shardwise bench`` sizes it for warm-up +
    timed steps + 1 (``BenchSettings.decode_positions``), which its command
    line records (defaults 3 and 10)."""
    if r.get("decode_steps"):
        return int(r["decode_steps"])
    cmd = r.get("command") or ""
    if "bench" in cmd.split()[:2]:
        return command_option(cmd, "--warmup", 3) + command_option(cmd, "--iters", 10) + 1
    return 1


def record_case(r: dict, cluster: Cluster | None = None) -> tuple[ModelSpec, Workload, Plan, int]:
    """The model, workload, plan and world size a result record describes.
    With ``cluster``, a capacity named by the device (``layerwise:cap=L2``)
    resolves to the profile's figure (the device the run measured)."""
    from .costmodel import resolve_capacity

    from ..bench.records import record_spec

    spec = record_spec(r)
    if spec is None:
        raise ShardwiseError(f"record of plan {r.get('plan')} carries no model description "
                             f"(model_spec) and names no known preset")
    wl = Workload(batch=int(r["batch"]), seq_len=int(r["seq_len"]),
                  decode_steps=record_decode_steps(r))
    plan = Plan.parse(r["plan"])
    if cluster is not None:
        plan = resolve_capacity(plan, cluster)
    world = int(r.get("world_size") or r.get("n_devices"))
    validate_plan(spec, wl, plan, world)
    return spec, wl, plan, world


# The bar the model is held to on measured runs, per strategy and phase.
FIDELITY_MEDIAN, FIDELITY_MAX = 0.10, 0.20


def prompt_graphed(r: dict) -> bool:
    """Whether a record's prompt step replayed a CUDA graph: a bench prefill
    record says so (``cuda_graphs``); a run's record, and a bench record
    from before prompts were captured, timed it eagerly."""
    return r.get("phase") == "prefill" and bool(r.get("cuda_graphs"))


def _run_key(r: dict) -> tuple:
    """What makes two records route alike: the same command, model and inputs."""
    return (r.get("command"), r.get("preset"), r.get("model"), r.get("n_layers"), r.get("dtype"),
            r.get("batch"), r.get("seq_len"))


def measured_balance(records: list[dict]) -> dict:
    """MoE routing as runs measured it: for each run (:func:`_run_key`), the
    busiest rank's routed rows over the mean, summed over layers
    (``rank_load_max_over_mean``, which ep reports from the routing table every
    rank holds). The router and its inputs are the run's, not the plan's, and
    ep's rank q owns experts q E/P .. (q+1) E/P as tp_pp's tp rank q does, so
    the figure holds for every MoE plan of the run over the same number of ranks."""
    out = {}
    for r in records:
        rep = r.get("report") or {}
        if rep.get("rank_load_max_over_mean"):
            out[(_run_key(r), r.get("n_devices") or r.get("world_size"))] = float(
                rep["rank_load_max_over_mean"])
    return out


def record_layout(r: dict, spec: ModelSpec, wl: Workload, plan: Plan, world: int):
    """The layer groups and replicas a layerwise record reports it ran (the
    partition search may choose otherwise since), or None."""
    rep = r.get("report") or {}
    if plan.strategy != "layerwise" or not rep.get("groups") or not rep.get("replicas"):
        return None
    from ..parallel.partition import parse_capacity, partition_at

    cuts = [g[0] for g in rep["groups"]] + [rep["groups"][-1][1]]
    return partition_at(spec, wl, cuts, int(rep["replicas"]), world,
                        parse_capacity(plan.option("cap")), plan.micro_batches)


def _same_layout(r: dict, spec: ModelSpec, wl: Workload, plan: Plan, world: int) -> None:
    """A layerwise record that ran other layer groups than the partition
    search now picks describes a plan the code no longer runs: refused."""
    ran = record_layout(r, spec, wl, plan, world)
    if ran is None:
        return
    from ..parallel.partition import plan_partition

    now = plan_partition(spec, wl, plan, world)
    if ([g.layers for g in ran.groups], ran.replicas) != ([g.layers for g in now.groups],
                                                          now.replicas):
        raise ShardwiseError(f"the record ran layer groups {[[g.layers.start, g.layers.stop] for g in ran.groups]} "
                             f"x {ran.replicas} replica(s); the partition search now picks "
                             f"{[[g.layers.start, g.layers.stop] for g in now.groups]} x {now.replicas}")


def at_host_speed(cl: Cluster, r: dict) -> Cluster:
    """``cl`` with the host as record ``r`` found it: the layer probe timed
    beside the measurement (``host_probe_us``) replaces calibrate's, so the
    host scale follows the host's speed at that moment (it drifts within a
    run by tens of percent; device figures do not). Unchanged for records
    without it."""
    us = r.get("host_probe_us")
    if not us or not cl.layer_probe.get("calls"):
        return cl
    return dataclasses.replace(cl, layer_probe={**cl.layer_probe, "us": float(us)})


def fidelity_errors(result_files: list[str], cl: Cluster):
    """(rows, errors by (strategy, metric), skipped) for every record: one
    row per record and metric, its raw figures (``measured``, ``predicted``,
    ``error`` as predicted / measured - 1, ``p90_p10`` the spread of its timed
    steps or None); :func:`fidelity_sheets` writes them for people."""
    from ..bench.records import read_records

    errors: dict[tuple[str, str], list[float]] = {}
    rows, skipped = [], []
    records = [r for path in result_files for r in read_records(path)]
    balance = measured_balance(records)
    for path in result_files:
        for r in read_records(path):
            try:
                spec, wl, plan, world = record_case(r, cl)
                # A decode record says whether its step replayed a CUDA graph.
                graphs = r.get("cuda_graphs") if r.get("phase") == "decode" else None
                moe = balance.get((_run_key(r), world)) if spec.is_moe else None
                _same_layout(r, spec, wl, plan, world)
                p = predict(spec, wl, plan, at_host_speed(cl, r), world, graphs=graphs,
                            moe_balance=moe, prefill_graphs=prompt_graphed(r))
            except (ShardwiseError, KeyError, TypeError, ValueError) as e:
                skipped.append(f"{r.get('plan')} ({r.get('preset')}): {e}")
                continue
            phase = r.get("phase", "both")
            tps = r.get("tps") or r.get("prefill_tokens_per_s")
            pairs = []
            if tps and phase in ("prefill", "both"):
                pairs.append(("prefill tok/s", tps, p.prefill_tps))
            if r.get("tpot_ms") and phase in ("decode", "both"):
                pairs.append(("decode ms", r["tpot_ms"], p.decode_step_ms))
            spread = step_spread(r)
            graph = {True: "graph", False: "eager"}.get(r.get("cuda_graphs"), "")
            for what, meas, pred in pairs:
                err = pred / meas - 1
                # Graph and eager steps are judged apart: one is
                # device-bound, the other mostly the host's.
                what += f" ({graph})" if what.startswith("decode") and graph else ""
                what += " (graph)" if what.startswith("prefill") and prompt_graphed(r) else ""
                errors.setdefault((plan.strategy, what), []).append(err)
                rows.append({"plan": r.get("plan") or str(plan),
                             "model": r.get("preset") or r.get("model", ""),
                             "batch_x_seq": f"{wl.batch}x{wl.seq_len}", "dtype": spec.dtype,
                             "metric": what,
                             "measured": float(meas), "predicted": float(pred), "error": err,
                             "p90_p10": spread, "batch": wl.batch, "seq_len": wl.seq_len})
    return rows, errors, skipped


def _human(v: float, metric: str) -> str:
    from ..output import count, num

    return count(v) if metric.startswith("prefill") else num(v, 4)


# A record whose timed steps spread wider than this (p90 / p10) measured a
# moving target; fidelity marks it (the verdicts still count it).
UNSTEADY_SPREAD = 1.5


def step_spread(r: dict) -> float | None:
    """p90 / p10 of a record's timed steps (None when it has no spread)."""
    lo, hi = r.get("p10_ms"), r.get("p90_ms")
    return hi / lo if lo and hi and lo > 0 else None


def fidelity_summary(errors: dict) -> list[dict]:
    """Per strategy and metric: records, median and max |error| (fractions),
    PASS when the median is within 10% and the largest within 20%."""
    out = []
    for (s, what), v in sorted(errors.items()):
        med, top = statistics.median(abs(x) for x in v), max(abs(x) for x in v)
        ok = med <= FIDELITY_MEDIAN and top <= FIDELITY_MAX
        out.append({"strategy": s, "metric": what, "records": len(v), "median": med,
                    "max": top, "verdict": "PASS" if ok else "FAIL"})
    return out


def summary_sheet(errors: dict) -> Sheet:
    """:func:`fidelity_summary` as a sheet: fractions written as percentages."""
    from ..output import Col, pct

    return Sheet("summary", f"error per strategy and phase (|predicted / measured - 1|; PASS: "
                 f"median <= {FIDELITY_MEDIAN:.0%}, max <= {FIDELITY_MAX:.0%})",
                 [Col("strategy", "strategy"), Col("metric", "metric", left=True),
                  Col("records", "records"), Col("median", "median", pct),
                  Col("max", "max", pct), Col("verdict", "verdict", left=True)],
                 fidelity_summary(errors))


def fidelity_parts(result_files: list[str], profile: str) -> list:
    """``shardwise report --fidelity RESULTS.jsonl ... --profile P``: every
    measured record (prefill tokens/s, decode tpot_ms) against its prediction
    on ``profile``; median and max |relative error| per strategy and phase,
    PASS/FAIL against a median of 10% and a maximum of 20%. The sheets hold
    raw numbers (JSON and CSV carry them); the table writes them for people."""
    from ..output import Col

    cl, note = with_sustained_rate(load_cluster(profile), result_files)
    rows, errors, skipped = fidelity_errors(result_files, cl)
    if not rows:
        raise ShardwiseError("no record could be compared: " + ("; ".join(skipped) or "no records"))

    def figure(key):
        return Col(key, key, row_text=lambda r: _human(r[key], r["metric"]))

    # On a narrow terminal what a record is (model, workload, dtype) moves
    # to a further table before what was measured and predicted.
    cols = [Col("plan", "plan"), Col("model", "model", priority=2, left=True),
            Col("batch x seq", "batch_x_seq", priority=2),
            Col("dtype", "dtype", priority=2, left=True), Col("metric", "metric", left=True),
            figure("measured"), figure("predicted"),
            Col("error", "error", lambda v: f"{v:+.0%}"),
            Col("p90/p10", "p90_p10", lambda v: "-" if v is None else f"{v:.2f}"
                + (" !" if v > UNSTEADY_SPREAD else ""))]
    parts: list = [
        Sheet("records", f"measured vs predicted on {cl.name} (p90/p10: the spread of the "
              f"record's timed steps; !: over {UNSTEADY_SPREAD})", cols, rows),
        summary_sheet(errors)]
    if note:
        parts.append(note)
    if skipped:
        parts.append("skipped:\n" + "\n".join(f"- {s}" for s in skipped))
    return parts


def fidelity_command(result_files: list[str], profile: str) -> str:
    """:func:`fidelity_parts` as a table."""
    from ..output import render

    return render(fidelity_parts(result_files, profile))


def with_sustained_rate(cl: Cluster, result_files: list[str]) -> tuple[Cluster, str]:
    """A profile without ``sustained_matmul_tflops`` (calibrated before it was
    measured) takes the device's own: ``shardwise bench`` records the burst and
    the sustained matmul rate of the GPU it ran on (``matmul_peak_tflops``,
    ``matmul_sustained_tflops``); the median ratio over the records of the
    profile's device, times the profile's burst rate. One measured figure for
    the device, the same for every record."""
    import dataclasses

    from ..bench.records import read_records

    if cl.sustained_matmul_tflops or not cl.matmul_tflops:
        return cl, ""
    ratios = [r["matmul_sustained_tflops"] / r["matmul_peak_tflops"]
              for path in result_files for r in read_records(path)
              if r.get("matmul_sustained_tflops") and r.get("matmul_peak_tflops")
              and (not cl.device or r.get("device") == cl.device)]
    if not ratios:
        return cl, ""
    ratio = statistics.median(ratios)
    burst = cl.matmul_tflops.get("bf16") or next(iter(cl.matmul_tflops.values()))
    note = (f"compute rates x {ratio:.3f}: the sustained / burst matmul rate that bench "
            f"measured on {cl.device or 'the device'} ({len(ratios)} records); the profile "
            f"predates calibrate's sustained_matmul_tflops")
    return dataclasses.replace(cl, sustained_matmul_tflops=ratio * burst), note
