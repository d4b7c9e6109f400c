"""Terminal tables for run and verify results (rich)."""
from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.table import Table

from .bench.records import floor_ratio

# Piped output (logs, CI) gets a wide table instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _err_cell(r: dict) -> str:
    if "max_rel_err" not in r:
        return "not checked"
    style = "green" if r["ok"] else "bold red"
    return f"[{style}]{r['max_rel_err']:.1e}[/{style}]"


def print_run(results: list[dict], model, wl) -> None:
    t = Table(title=f"{model.name} ({model.dtype}), batch {wl.batch}, prompt {wl.seq_len}, "
                    f"{wl.decode_steps} decode steps, {results[0]['world_size']} ranks "
                    f"({results[0]['device_type']})")
    for col in ("plan", "max rel err", "prefill tok/s", "decode ms/step", "params/rank",
                "KV/rank", "peak mem/rank", "comm prefill", "comm/decode step"):
        t.add_column(col, justify="left" if col == "plan" else "right")
    for r in results:
        t.add_row(
            r["plan"], _err_cell(r), f"{r['prefill_tokens_per_s']:,.0f}",
            f"{r['tpot_ms']:.2f}" if r["tpot_ms"] is not None else "-",
            human_bytes(max(r["param_bytes_per_rank"])), human_bytes(max(r["kv_bytes_per_rank"])),
            human_bytes(max(r["peak_mem_bytes_per_rank"])),
            human_bytes(max(r["comm_bytes_prefill_per_rank"])),
            human_bytes(max(r["comm_bytes_decode_step_per_rank"])),
        )
    console.print(t)
    console.print("max rel err: ||out - ref|| / ||ref|| over prefill and every decode step; "
                  "comm: bytes sent by the busiest rank; peak mem: the allocator's high-water "
                  "mark on GPUs, the process's peak resident size on CPU.")


def print_verify(r: dict) -> None:
    console.print(f"verify {r['plan']} on {r['model']} ({r['dtype']}, {r['world_size']} "
                  f"ranks, {r['device_type']}, batch {r['batch']}, prompt {r['seq_len']})")
    t = Table()
    t.add_column("step")
    t.add_column("rel err", justify="right")
    steps = [("prefill", r["prefill_rel_err"])] + [
        (f"decode {i + 1}", e) for i, e in enumerate(r["decode_rel_err"])]
    for name, e in steps:
        style = "green" if e <= r["tolerance"] else "bold red"
        t.add_row(name, f"[{style}]{e:.2e}[/{style}]")
    console.print(t)
    c = Table(title="prefill communication of rank 0")
    c.add_column("op/axis")
    c.add_column("calls", justify="right")
    c.add_column("bytes", justify="right")
    for k, v in r["comm_prefill_rank0"].items():
        c.add_row(k, str(v["calls"]), human_bytes(v["bytes"]))
    if r["comm_prefill_rank0"]:
        console.print(c)
    if r.get("report"):
        console.print("strategy:", r["report"])
    if "moe_near_tie_tokens" in r:
        total = r["batch"] * r["seq_len"]
        console.print(
            f"MoE routing: {r['moe_near_tie_tokens'][0]} of {total} prompt tokens have top-k "
            f"expert scores tied within {r['dtype']} rounding in the reference (a rounding "
            f"elsewhere may route them differently); error over the other tokens, per step: "
            + ", ".join(f"{e:.2e}" for e in r["determinate_rel_err"]))
        console.print(
            f"routing flips (near-tied tokens whose output departs), per step: "
            f"{r['routing_flips']}; error without them: "
            + ", ".join(f"{e:.2e}" for e in r["rel_err_without_flips"])
            + (f". The reference run as two half-batches departs from itself by "
               + ", ".join(f"{e:.2e}" for e in r["reference_split_rel_err"])
               + f" with {r['reference_split_flips']} flips"
               if r.get("reference_split_rel_err") else ""))
    verdict = "[green]PASS[/green]" if r["ok"] else "[bold red]FAIL[/bold red]"
    console.print(f"{verdict}: max relative error {r['max_rel_err']:.2e}, tolerance "
                  f"{r['tolerance']:.0e} (||out - ref|| / ||ref||, {r['dtype']})")


def print_presets(presets: dict) -> None:
    t = Table(title="presets")
    for col in ("name", "layers", "d_model", "heads x dim", "d_ff", "experts", "dtype",
                "params", "baseline", "proposed"):
        t.add_column(col)
    for name, p in presets.items():
        m = p.model
        t.add_row(name, str(m.n_layers), str(m.d_model), f"{m.n_heads} x {m.head_dim}",
                  str(m.d_ff), f"{m.n_experts} (top {m.top_k})" if m.is_moe else "-", m.dtype,
                  f"{m.total_params() / 1e9:.2f}B" if m.total_params() > 1e8
                  else f"{m.total_params() / 1e6:.2f}M", p.baseline, p.proposed)
    console.print(t)


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def print_models() -> None:
    """The zoo of published architectures and the presets, with their size
    in bf16 and the KV cache each token adds (all layers, bf16)."""
    from .models import resolve, zoo_names
    from .presets import PRESETS
    from .spec import dtype_bytes

    t = Table(title="models (--model NAME; also a checkpoint directory or a config.json)")
    for col in ("name", "kind", "layers", "d_model", "heads / kv x dim", "d_ff", "experts",
                "params", "bf16 weights", "KV / token", "features"):
        t.add_column(col, justify="left" if col in ("name", "kind", "features") else "right")
    rows = [(n, "zoo") for n in zoo_names()] + [(n, "preset") for n in PRESETS]
    for name, kind in rows:
        m = resolve(name, dtype="bf16").spec
        features = [f for f, on in (("rope", m.rope_theta is not None),
                                    ("rope-scaled", m.rope_scaling is not None),
                                    ("qkv-bias", m.qkv_bias), ("tied", m.tie_embeddings),
                                    (m.norm, True), (m.activation, True)) if on]
        t.add_row(name, kind, str(m.n_layers), str(m.d_model),
                  f"{m.n_heads} / {m.kv_heads} x {m.head_dim}", str(m.d_ff),
                  f"{m.n_experts} (top {m.top_k})" if m.is_moe else "-",
                  _params(m.total_params()),
                  human_bytes(m.total_params() * dtype_bytes("bf16")),
                  human_bytes(m.kv_bytes_per_token()), ", ".join(features))
    console.print(t)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_bench(records: list[dict]) -> None:
    r0 = records[0]
    console.print(f"{r0['model']} ({r0['dtype']}, {r0['n_layers']} layers), batch {r0['batch']}, "
                  f"context {r0['seq_len']} on {r0['device']}; matmul peak "
                  f"{_fmt(r0.get('matmul_peak_tflops'), '.0f')} TFLOP/s, copy "
                  f"{_fmt(r0.get('hbm_peak_gbps'), '.0f')} GB/s (measured in this run)")
    t = Table()
    for col in ("plan", "ranks", "phase", "tokens/s", "step ms (p10-p90)", "ms/token", "MFU",
                "HBM GB/s", "x floor", "peak mem GB", "comm/step", "comm share", "graphs",
                "rel err"):
        t.add_column(col, justify="left" if col in ("plan", "phase") else "right")
    for r in records:
        t.add_row(r["plan"], str(r["n_devices"]), r["phase"], f"{r['tps']:,.0f}",
                  f"{r['median_ms']:.3f} ({r['p10_ms']:.3f}-{r['p90_ms']:.3f})",
                  _fmt(r.get("ms_per_token"), ".4f"), _fmt(r.get("mfu"), ".2f"),
                  _fmt(r.get("hbm_gbps"), ".0f"), _fmt(floor_ratio(r), ".2f"),
                  _fmt(r.get("peak_mem_gb"), ".1f"), human_bytes(r.get("comm_bytes")),
                  _fmt(r.get("comm_share"), ".0%"),
                  "yes" if r.get("cuda_graphs") else "-", _fmt(r.get("max_rel_err"), ".1e"))
    console.print(t)


# What print_bench and report_files read from every bench record.
BENCH_KEYS = ("model", "dtype", "n_layers", "batch", "seq_len", "device", "n_devices", "plan", "phase",
              "tps", "median_ms", "p10_ms", "p90_ms")


def report_files(paths: list[str], plot_dir: str | None = None) -> None:
    """Bench records from results files as tables (one per model and workload),
    and optionally PNG plots: tokens/s and decode step time per plan."""
    from .bench.records import missing_keys, read_records

    def check(r):  # a bench record (it has a phase and tps) has what the tables show
        if "phase" in r and "tps" in r:
            return missing_keys(r, BENCH_KEYS, "bench record")
        return None

    records = [r for p in paths for r in read_records(p, check) if "phase" in r and "tps" in r]
    if not records:
        console.print("no benchmark records in " + ", ".join(paths))
        return
    groups: dict = {}
    for r in records:
        key = (r["model"], r.get("n_layers"), r["dtype"], r["batch"], r["seq_len"], r["device"])
        groups.setdefault(key, []).append(r)
    for key in sorted(groups, key=str):
        print_bench(groups[key])
    if plot_dir:
        for path in plot_records(records, plot_dir):
            console.print(f"wrote {path}")


def plot_records(records: list[dict], out_dir: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from .spec import ShardwiseError

        raise ShardwiseError("plots need matplotlib: pip install 'shardwise[plot]'") from None
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for phase, metric, label in (("prefill", "tps", "prefill tokens/s"),
                                 ("decode", "median_ms", "decode step time (ms)")):
        rows = [r for r in records if r["phase"] == phase]
        if not rows:
            continue
        groups: dict = {}
        for r in rows:
            groups.setdefault((r["model"], r["batch"], r["seq_len"]), []).append(r)
        ncols = min(3, len(groups))
        nrows = -(-len(groups) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4.2 * nrows), squeeze=False)
        for ax in axes.flat[len(groups):]:
            ax.axis("off")
        for ax, ((model, batch, seq), rs) in zip(axes.flat, sorted(groups.items(), key=str)):
            rs = sorted(rs, key=lambda r: (r["n_devices"], r["plan"]))
            names = [f"{r['plan']}\n({r['n_devices']} GPU)" for r in rs]
            vals = [r[metric] for r in rs]
            bars = ax.bar(range(len(rs)), vals, color=[f"C{r['n_devices']}" for r in rs])
            ax.bar_label(bars, fmt="%.3g", fontsize=7)
            ax.set_xticks(range(len(rs)), names, rotation=45, ha="right", fontsize=7)
            ax.set_title(f"{model}, batch {batch}, context {seq}", fontsize=9)
            ax.set_ylabel(label)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{phase}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written
