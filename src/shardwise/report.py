"""What run, verify, bench, generate, models and presets print, and what
``shardwise report`` makes of any results file: sheets (output.py renders
them as tables, JSON, CSV or Markdown) and PNG plots.

Every record kind shardwise writes is read: ``run --json`` and ``verify
--json`` (one verified run per plan), ``bench --out`` (one timed phase per
record) and ``generate --json`` (one generation per plan).
"""
from __future__ import annotations

import os

from .output import Col, Sheet, count, err, nbytes, num, pct, plural, ratio

# -- run and verify ------------------------------------------------------------------


def _ok_style(row: dict) -> str | None:
    if row.get("ok") is None:
        return None
    return "green" if row["ok"] else "bold red"


def where(device: str | None, n: int) -> str:
    """``CPU, 4 ranks`` or ``NVIDIA H200 x 2``: the machine a record ran on."""
    if not device or device.lower() == "cpu":
        return f"CPU, {plural(n, 'rank')}"
    return f"{device} x {n}" if n != 1 else device


RUN_NOTE = ("max rel err: ||out - ref|| / ||ref|| over prefill and every decode step; "
            "comm: bytes sent by the busiest rank; peak mem: the allocator's high-water "
            "mark on GPUs, the process's peak resident size on CPU.")


def run_sheet(results: list[dict], title: str | None = None) -> Sheet:
    """One row per verified plan (``run``, ``verify``, their --json records)."""
    r0 = results[0]
    device = r0.get("device") or r0.get("device_type")
    title = title or (f"{r0.get('model')} ({r0.get('dtype')}), batch {r0.get('batch')}, prompt "
                      f"{r0.get('seq_len')}, {plural(r0.get('decode_steps', 0), 'decode step')}, "
                      f"{where(device, r0.get('world_size') or 1)}")
    most = lambda v: max(v) if v else None  # noqa: E731
    rows = [{"plan": r["plan"], "max_rel_err": r.get("max_rel_err"), "ok": r.get("ok"),
             "prefill_tokens_per_s": r.get("prefill_tokens_per_s"), "tpot_ms": r.get("tpot_ms"),
             "peak_mem_bytes": most(r.get("peak_mem_bytes_per_rank")),
             "param_bytes": most(r.get("param_bytes_per_rank")),
             "kv_bytes": most(r.get("kv_bytes_per_rank")),
             "comm_prefill_bytes": most(r.get("comm_bytes_prefill_per_rank")),
             "comm_decode_step_bytes": most(r.get("comm_bytes_decode_step_per_rank"))}
            for r in results]
    cols = [Col("plan", "plan"),
            Col("max rel err", "max_rel_err", err, style=_ok_style),
            Col("prefill tok/s", "prefill_tokens_per_s", count),
            Col("decode ms/step", "tpot_ms", num, 1),
            Col("peak mem/rank", "peak_mem_bytes", nbytes, 2),
            Col("params/rank", "param_bytes", nbytes, 3),
            Col("KV/rank", "kv_bytes", nbytes, 3),
            Col("comm prefill", "comm_prefill_bytes", nbytes, 4),
            Col("comm/decode step", "comm_decode_step_bytes", nbytes, 4)]
    return Sheet("runs", title, cols, rows, [RUN_NOTE])


def verify_parts(r: dict) -> list:
    """A verified run step by step: the error of every step, rank 0's
    communication, the strategy's report, MoE routing, the verdict."""
    parts: list = [f"verify {r['plan']} on {r['model']} ({r['dtype']}, "
                   f"{where(r.get('device') or r['device_type'], r['world_size'])}, batch "
                   f"{r['batch']}, prompt {r['seq_len']})"]
    steps = [("prefill", r["prefill_rel_err"])] + [
        (f"decode {i + 1}", e) for i, e in enumerate(r["decode_rel_err"])]
    tol = r["tolerance"]
    parts.append(Sheet("steps", "", [
        Col("step", "step"),
        Col("rel err", "rel_err", lambda v: f"{v:.2e}",
            style=lambda row: "green" if row["rel_err"] <= tol else "bold red")],
        [{"step": s, "rel_err": e} for s, e in steps]))
    comm = r.get("comm_prefill_rank0") or {}
    if comm:
        parts.append(Sheet("communication", "prefill communication of rank 0", [
            Col("op/axis", "op"), Col("calls", "calls", count), Col("bytes", "bytes", nbytes)],
            [{"op": k, "calls": v["calls"], "bytes": v["bytes"]} for k, v in comm.items()]))
    if r.get("report"):
        parts.append(f"strategy: {r['report']}")
    parts += routing_lines(r)
    verdict = "PASS" if r["ok"] else "FAIL"
    parts.append(f"{verdict}: max relative error {r['max_rel_err']:.2e}, tolerance "
                 f"{tol:.0e} (||out - ref|| / ||ref||, {r['dtype']})")
    return parts


def routing_lines(r: dict) -> list[str]:
    """What an MoE run's routing check found: nothing when no token was tied
    within rounding and none flipped (always so in fp32)."""
    ties = r.get("moe_near_tie_tokens") or []
    flips = r.get("routing_flips") or []
    if not any(ties) and not any(flips):
        return []
    total = r["batch"] * r["seq_len"]
    lines = [f"MoE routing: {ties[0]} of {total} prompt tokens have top-k expert scores tied "
             f"within {r['dtype']} rounding in the reference (a rounding elsewhere may route "
             f"them differently); error over the other tokens, per step: "
             + ", ".join(f"{e:.2e}" for e in r["determinate_rel_err"])]
    if any(flips):
        split = ""
        if r.get("reference_split_rel_err"):
            split = (". The reference run as two half-batches departs from itself by "
                     + ", ".join(f"{e:.2e}" for e in r["reference_split_rel_err"])
                     + f" with {r['reference_split_flips']} flips")
        lines.append(f"routing flips (near-tied tokens whose output departs), per step: "
                     f"{flips}; error without them: "
                     + ", ".join(f"{e:.2e}" for e in r["rel_err_without_flips"]) + split)
    return lines


# -- bench ---------------------------------------------------------------------------


def bench_sheet(records: list[dict]) -> Sheet:
    """One row per timed phase of a plan (``bench``, ``bench --out`` records)."""
    from .bench.records import floor_ratio

    r0 = records[0]
    peak = r0.get("matmul_peak_tflops")
    copy = r0.get("hbm_peak_gbps")
    ranks = sorted({r.get("n_devices") or 1 for r in records})
    span = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
    on = ("CPU" if str(r0.get("device", "cpu")).lower() == "cpu"
          else f"{r0['device']} x {span}")
    title = (f"{r0['model']} ({r0['dtype']}, {plural(r0.get('n_layers') or 0, 'layer')}), batch "
             f"{r0['batch']}, context {r0['seq_len']} on {on}"
             + (f"; matmul peak {num(peak)} TFLOP/s, copy {num(copy)} GB/s (measured in the "
                f"run)" if peak or copy else ""))
    rows = []
    for r in records:
        rows.append({"plan": r["plan"], "ranks": r.get("n_devices"), "phase": r["phase"],
                     "tokens_per_s": r["tps"], "step_ms": r["median_ms"],
                     "p10_p90_ms": f"{num(r['p10_ms'])}-{num(r['p90_ms'])}",
                     "ms_per_token": r.get("ms_per_token"), "mfu": r.get("mfu"),
                     "hbm_gbps": r.get("hbm_gbps"), "x_floor": floor_ratio(r),
                     "peak_mem_bytes": (r["peak_mem_gb"] * 1e9
                                        if r.get("peak_mem_gb") is not None else None),
                     "comm_bytes": r.get("comm_bytes"), "comm_share": r.get("comm_share"),
                     "cuda_graphs": r.get("cuda_graphs"), "max_rel_err": r.get("max_rel_err"),
                     "ok": r.get("numerics_ok")})
    cols = [Col("plan", "plan"), Col("ranks", "ranks", priority=2), Col("phase", "phase", left=True),
            Col("tokens/s", "tokens_per_s", count), Col("step ms", "step_ms", num),
            Col("p10-p90 ms", "p10_p90_ms", priority=4),
            Col("ms/token", "ms_per_token", num, 3), Col("MFU", "mfu", ratio, 1),
            Col("HBM GB/s", "hbm_gbps", num, 4), Col("x floor", "x_floor", ratio, 2),
            Col("peak mem", "peak_mem_bytes", nbytes, 3), Col("comm/step", "comm_bytes", nbytes, 4),
            Col("comm share", "comm_share", pct, 4),
            Col("graphs", "cuda_graphs", lambda v: "yes" if v else "-", 4),
            Col("rel err", "max_rel_err", err, 1, style=_ok_style)]
    return Sheet("bench", title, cols, rows)


# -- generate ---------------------------------------------------------------------------


def generate_sheet(records: list[dict]) -> Sheet:
    r0 = records[0]
    rows = [{"plan": r["plan"], "ranks": r.get("world_size") or r.get("n_devices"),
             "prompts": len(r.get("tokens") or []),
             "new_tokens": sum(len(t) for t in r.get("tokens") or []),
             "max_rel_err": r.get("max_rel_err"), "ok": r.get("ok"),
             "text": " | ".join(r.get("text") or [])} for r in records]
    cols = [Col("plan", "plan"), Col("ranks", "ranks", priority=2),
            Col("prompts", "prompts", priority=1), Col("new tokens", "new_tokens"),
            Col("max rel err", "max_rel_err", err, style=_ok_style),
            Col("text", "text", priority=3, wrap=True)]
    return Sheet("generate", f"generation with {r0.get('model')} ({r0.get('dtype')}) on "
                 f"{where(r0.get('device'), r0.get('world_size') or 1)}", cols, rows)


# -- models and presets ---------------------------------------------------------------


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def presets_sheet(presets: dict) -> Sheet:
    rows = []
    for name, p in presets.items():
        m = p.model
        rows.append({"name": name, "layers": m.n_layers, "d_model": m.d_model,
                     "heads": m.n_heads, "head_dim": m.head_dim, "d_ff": m.d_ff,
                     "experts": m.n_experts, "top_k": m.top_k if m.is_moe else None,
                     "dtype": m.dtype, "params": m.total_params(), "baseline": p.baseline,
                     "proposed": p.proposed})
    cols = [Col("name", "name"), Col("layers", "layers", priority=1),
            Col("d_model", "d_model", priority=2),
            Col("heads", "heads", priority=3), Col("head dim", "head_dim", priority=3),
            Col("d_ff", "d_ff", priority=3),
            Col("experts", "experts", lambda v: str(v) if v else "-", 2),
            Col("dtype", "dtype", priority=2), Col("params", "params", _params),
            Col("baseline", "baseline", left=True, priority=1),
            Col("proposed", "proposed", left=True, priority=1)]
    return Sheet("presets", "presets (--model NAME)", cols, rows)


def models_sheet() -> Sheet:
    """The zoo of published architectures and the presets, with their size
    in bf16 and the KV cache each token adds (all layers, bf16)."""
    from .models import resolve, zoo_names
    from .presets import PRESETS
    from .spec import dtype_bytes

    rows = []
    for name, kind in [(n, "zoo") for n in zoo_names()] + [(n, "preset") for n in PRESETS]:
        m = resolve(name, dtype="bf16").spec
        features = [f for f, on in (("rope", m.rope_theta is not None),
                                    ("rope-scaled", m.rope_scaling is not None),
                                    ("qkv-bias", m.qkv_bias), ("tied", m.tie_embeddings),
                                    (m.norm, True), (m.activation, True)) if on]
        rows.append({"name": name, "kind": kind, "layers": m.n_layers, "d_model": m.d_model,
                     "heads": m.n_heads, "kv_heads": m.kv_heads, "head_dim": m.head_dim,
                     "d_ff": m.d_ff, "experts": m.n_experts,
                     "top_k": m.top_k if m.is_moe else None, "params": m.total_params(),
                     "bf16_bytes": m.total_params() * dtype_bytes("bf16"),
                     "kv_bytes_per_token": m.kv_bytes_per_token(), "features": features})
    cols = [Col("name", "name"), Col("kind", "kind", left=True, priority=3),
            Col("layers", "layers", priority=1), Col("d_model", "d_model", priority=2),
            Col("heads", "heads", priority=4), Col("kv heads", "kv_heads", priority=4),
            Col("head dim", "head_dim", priority=4), Col("d_ff", "d_ff", priority=4),
            Col("experts", "experts", lambda v: str(v) if v else "-", 2),
            Col("params", "params", _params), Col("bf16 weights", "bf16_bytes", nbytes, 1),
            Col("KV / token", "kv_bytes_per_token", nbytes, 2),
            Col("features", "features", ", ".join, 5, wrap=True)]
    return Sheet("models", "models (--model NAME; also a checkpoint directory or a "
                 "config.json)", cols, rows)


# -- report: results files ----------------------------------------------------------------

# What each record kind must hold for the tables.
BENCH_KEYS = ("model", "dtype", "batch", "seq_len", "device", "plan", "phase", "tps",
              "median_ms", "p10_ms", "p90_ms")
RUN_KEYS = ("model", "dtype", "batch", "seq_len", "plan", "world_size", "max_rel_err",
            "prefill_tokens_per_s")
GENERATE_KEYS = ("plan", "tokens", "prompt_ids")


def record_kind(r: dict) -> str | None:
    """``bench``, ``run`` (run and verify), ``generate``, or None."""
    if "phase" in r and "tps" in r:
        return "bench"
    if "tokens" in r and "prompt_ids" in r:
        return "generate"
    if "prefill_tokens_per_s" in r:
        return "run"
    return None


def _check(r: dict) -> str | None:
    from .bench.records import missing_keys

    kind = record_kind(r)
    keys = {"bench": BENCH_KEYS, "run": RUN_KEYS, "generate": GENERATE_KEYS}.get(kind)
    if keys is None:
        return ("not a shardwise record (none of: a bench record's phase and tps, a run or "
                "verify record's prefill_tokens_per_s, a generation's tokens)")
    return missing_keys(r, keys, f"{kind} record")


def read_all(paths: list[str]) -> list[dict]:
    from .bench.records import read_records

    return [r for p in paths for r in read_records(p, _check)]


def report_parts(paths: list[str]) -> list:
    """Sheets of every record in ``paths``: one per model, workload and machine."""
    records = read_all(paths)
    if not records:
        from .spec import ShardwiseError

        raise ShardwiseError("no records in " + ", ".join(paths) + "; give files written by "
                             "shardwise bench --out, run --json, verify --json or generate --json")
    parts: list = []
    groups: dict = {}
    for r in records:
        kind = record_kind(r)
        if kind == "bench":
            key = (kind, r["model"], r.get("n_layers"), r["dtype"], r["batch"], r["seq_len"],
                   r["device"])
        elif kind == "run":
            key = (kind, r["model"], r["dtype"], r["batch"], r["seq_len"], r.get("decode_steps"),
                   r.get("device") or r.get("device_type"), r["world_size"])
        else:
            key = (kind, r.get("model"), r.get("dtype"), r.get("device"))
        groups.setdefault(key, []).append(r)
    make = {"bench": bench_sheet, "run": run_sheet, "generate": generate_sheet}
    for key in sorted(groups, key=str):
        sheet = make[key[0]](groups[key])
        sheet.name = f"{key[0]}_{len(parts)}"
        parts.append(sheet)
    return parts


# -- plots ----------------------------------------------------------------------------------


def _axis_label(v: float, unit: str) -> str:
    if unit == "tokens/s":
        return f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.0f}k" if v >= 1e4 else f"{v:,.0f}"
    return f"{num(v)} ms"


def plot_records(records: list[dict], out_dir: str) -> list[str]:
    """``prefill.png`` (tokens/s) and ``decode.png`` (step time) of the bench
    records, one panel per model and workload: horizontal bars, best first,
    labelled in human units, coloured by GPU count (legend), on a log axis
    where the figures span more than 10x; the title names the device."""
    from .spec import ShardwiseError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        raise ShardwiseError("plots need matplotlib: pip install matplotlib") from None
    records = [r for r in records if record_kind(r) == "bench"]
    if not records:
        raise ShardwiseError("--plots draws bench records (shardwise bench --out); these files "
                             "have none")
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for phase, metric, unit, best_high in (("prefill", "tps", "tokens/s", True),
                                           ("decode", "median_ms", "ms", False)):
        rows = [r for r in records if r["phase"] == phase]
        if not rows:
            continue
        groups: dict = {}
        for r in rows:
            groups.setdefault((r["model"], r["dtype"], r["batch"], r["seq_len"], r["device"]),
                              []).append(r)
        panels = sorted(groups.items(), key=str)
        heights = [0.9 + 0.32 * len(rs) for _, rs in panels]
        fig, axes = plt.subplots(len(panels), 1, figsize=(8, sum(heights) + 0.4),
                                 squeeze=False, gridspec_kw={"height_ratios": heights})
        for ax, ((model, dtype, batch, seq, device), rs) in zip(axes[:, 0], panels):
            rs = sorted(rs, key=lambda r: r[metric], reverse=not best_high)  # best at the top
            vals = [r[metric] for r in rs]
            cpu = str(device).lower() == "cpu"
            counts = sorted({r.get("n_devices") or 1 for r in rs})
            colour = {n: f"C{i}" for i, n in enumerate(counts)}
            bars = ax.barh(range(len(rs)), vals,
                           color=[colour[r.get("n_devices") or 1] for r in rs])
            ax.set_yticks(range(len(rs)), [r["plan"] for r in rs], fontsize=8)
            ax.invert_yaxis()
            ax.bar_label(bars, labels=[_axis_label(v, unit) for v in vals], padding=3,
                         fontsize=7)
            if max(vals) > 10 * min(vals):
                ax.set_xscale("log")
            ax.set_xlim(right=max(vals) * (3 if ax.get_xscale() == "log" else 1.18))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _axis_label(v, unit)))
            ax.tick_params(axis="x", labelsize=7)
            ax.set_xlabel(("prefill tokens/s (higher is better)" if best_high
                           else "decode step time, ms (lower is better)"), fontsize=8)
            span = (f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}")
            on = (f"CPU ({span} ranks)" if cpu
                  else f"{device} x {span} GPU{'s' * (counts[-1] > 1)}")
            ax.set_title(f"{model} ({dtype}), batch {batch}, context {seq} on {on}", fontsize=9)
            unit_name = "rank" if cpu else "GPU"
            ax.legend(handles=[Patch(color=colour[n], label=plural(n, unit_name))
                               for n in counts], fontsize=7, loc="best")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{phase}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
