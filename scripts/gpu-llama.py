"""Llama- and Mixtral-style models on one GPU, in one call: the GPU tests,
every strategy verified against the reference (bf16, eager and static
decode), tp_pp:1x1 benchmarked, and the kernels a decode layer launches in a
CUDA graph counted by the profiler.

Usage (from the repository root; writes JSON lines and logs under --out):

    python scripts/gpu-llama.py --out results/llama [SECTION ...]

Sections (all by default, in this order):

* ``tests``: ``pytest -m gpu`` (the Triton kernels against their PyTorch
  forms, grouped attention, the empty-prefix merge, a Llama decode step
  replayed from a CUDA graph).
* ``probe``: which SDPA backends take grouped-query attention without a
  repeat of K/V (prefill, ``enable_gqa``) and their rate, and the static
  decode step's attention (grouped rows over a masked cache) per backend
  against the unmasked flash kernel; ``probe.jsonl``.
* ``kernels``: kernels per decode layer of the reference (what tp_pp:1x1 and
  layerwise run) in a CUDA graph, by the profiler: a 2-layer step's replay
  minus a 1-layer step's, for a GPT-style, a Llama-style and a
  Mixtral-style layer; ``kernels.jsonl``.
* ``verify``: every strategy that runs on one GPU (tp_pp:1x1, helix:1x1,
  ring:1, layerwise:cap=HBM, ep:1 for MoE) on llama-3.1-8b and mixtral-8x7b
  cut to ``--verify-layers`` layers, bf16, a prompt long enough for the
  direct-to-cache K/V projection, decoded eagerly and at a device-tensor
  position (the step bench replays in a CUDA graph); ``verify.jsonl``.
* ``bench``: tp_pp:1x1 on llama-3.1-8b (4 layers) and mixtral-8x7b (2
  layers): decode in a CUDA graph at batch 1 x 2048 and 16 x 4096, prefill
  at 4 x 6000 and 1 x 2048; records as ``shardwise bench`` writes them
  (decode x HBM floor, prefill MFU against the GEMM peak of the same
  process); ``bench.jsonl``. ``--trace`` adds profiler traces.

The last lines are a table of the figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SECTIONS = ("tests", "probe", "kernels", "verify", "bench")
MODELS = "llama-3.1-8b:4,mixtral-8x7b:2"  # name:bench layers
# (phase, batch, prompt tokens); --small (a CPU run of the script itself) shrinks them
BENCH_WORKLOADS = [("decode", 1, 2048), ("decode", 16, 4096), ("prefill", 4, 6000),
                   ("prefill", 1, 2048)]
SMALL_WORKLOADS = [("decode", 1, 24), ("decode", 2, 40), ("prefill", 2, 48), ("prefill", 1, 24)]
ONE_GPU_PLANS = ["tp_pp:1x1", "helix:1x1", "ring:1", "layerwise:cap=HBM", "ep:1"]
# torch._fused_sdp_choice's answer (the SDPBackend enum)
BACKENDS = {-1: "error", 0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}


def log(*args):
    print(*args, flush=True)


def write(out: str, name: str, records: list[dict]) -> None:
    from shardwise.bench.records import append_records

    append_records(os.path.join(out, name), records)


def model(name: str, layers: int, dtype: str = "bf16"):
    from shardwise.models import resolve

    return resolve(name, layers=layers, dtype=dtype).spec


# -- tests -------------------------------------------------------------------------------

def tests(args) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests", "-p", "no:cacheprovider"]
    t0 = time.time()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=args.section_timeout)
    tail = (run.stdout + run.stderr).strip().splitlines()[-15:]
    with open(os.path.join(args.out, "gpu-tests.txt"), "w") as f:
        f.write(" ".join(cmd[1:]) + f"  ({time.time() - t0:.0f} s)\n" + "\n".join(tail) + "\n")
    log("\n".join(tail))
    return [f"pytest -m gpu: {tail[-1] if tail else '?'}"]


# -- probe -------------------------------------------------------------------------------

def _time_ms(fn, iters=20, warmup=3) -> float:
    from shardwise.runtime.timing import _event_times

    return 1e3 * statistics.median(_event_times(fn, iters, warmup))


def probe(args) -> list[str]:
    import torch
    import torch.nn.functional as Fn
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    recs, lines = [], []

    def rnd(*shape):
        return torch.randn(*shape, device=dev, dtype=torch.bfloat16, generator=g)

    # Prefill: Llama 3.1 8B's heads, 2 x 4096 tokens, causal.
    B, H, Hkv, T, d = 2, 32, 8, 4096, 128
    q = rnd(B, T, H, d).transpose(1, 2)  # the layout after the Q projection
    k, v = rnd(B, Hkv, T, d), rnd(B, Hkv, T, d)
    kr, vr = k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
    flops = 4 * B * H * d * T * (T + 1) / 2
    want = Fn.scaled_dot_product_attention(q, kr, vr, is_causal=True)
    backends = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    for name, be in backends.items():
        for form, (kk, vv, gqa) in {"enable_gqa": (k, v, True), "repeated": (kr, vr, False)}.items():
            def f():
                with sdpa_kernel([be]):
                    return Fn.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
            rec = {"probe": "prefill_gqa", "backend": name, "form": form, "B": B, "T": T}
            try:
                err = ((f() - want).float().norm() / want.float().norm()).item()
                ms = _time_ms(f, iters=10)
                rec.update(ok=True, rel_err=err, ms=ms, tflops=flops / ms / 1e9)
            except RuntimeError as e:
                rec.update(ok=False, error=str(e).splitlines()[0][:160])
            recs.append(rec)
    choice = torch._fused_sdp_choice(q, k, v, None, 0.0, True, enable_gqa=True)
    recs.append({"probe": "prefill_gqa_default_backend", "choice": BACKENDS.get(int(choice))})
    # The aten ops themselves with grouped K/V (what parallel/lse.py calls).
    for name, op in {"cudnn_op": lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(
                         q, k, v, None, True, 0.0, True, False)[0],
                     "flash_op": lambda: torch.ops.aten._scaled_dot_product_flash_attention(
                         q, k, v, 0.0, True, False)[0]}.items():
        rec = {"probe": "prefill_gqa_op", "op": name}
        try:
            err = ((op() - want).float().norm() / want.float().norm()).item()
            rec.update(ok=err < 2e-2, rel_err=err, ms=_time_ms(op, iters=10))
        except RuntimeError as e:
            rec.update(ok=False, error=str(e).splitlines()[0][:160])
        recs.append(rec)
    del q, k, v, kr, vr, want
    torch.cuda.empty_cache()

    # Static decode attention: one token, grouped rows over a cache masked past the position.
    for B, S in ((1, 2062), (16, 4110)):
        Hkv, G = 8, 4
        kv = rnd(B, S, 2, Hkv, d)
        k, v = kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)
        q = rnd(B, H, 1, d)
        rows = q.view(B, Hkv, G, d)
        n = S - 7
        bias = torch.zeros(1, S + (-S % 16), device=dev, dtype=torch.bfloat16)[:, :S]
        bias[:, n:] = float("-inf")
        want = Fn.scaled_dot_product_attention(rows, k[:, :, :n], v[:, :, :n])
        kv_bytes = 2 * B * Hkv * S * d * 2
        variants = {
            "grouped+mask default": (lambda: Fn.scaled_dot_product_attention(rows, k, v, attn_mask=bias), None),
            "grouped+mask efficient": (lambda: Fn.scaled_dot_product_attention(rows, k, v, attn_mask=bias),
                                       [SDPBackend.EFFICIENT_ATTENTION]),
            "grouped+mask cudnn": (lambda: Fn.scaled_dot_product_attention(rows, k, v, attn_mask=bias),
                                   [SDPBackend.CUDNN_ATTENTION]),
            "gqa+mask default (old)": (lambda: Fn.scaled_dot_product_attention(
                q, k, v, attn_mask=bias, enable_gqa=True).view(B, Hkv, G, d), None),
            "grouped flash, no mask (eager form)": (lambda: Fn.scaled_dot_product_attention(
                rows, k[:, :, :n], v[:, :, :n]), [SDPBackend.FLASH_ATTENTION]),
        }
        for name, (fn, bes) in variants.items():
            def f(fn=fn, bes=bes):
                if bes is None:
                    return fn()
                with sdpa_kernel(bes):
                    return fn()
            rec = {"probe": "decode_attention", "variant": name, "B": B, "S": S}
            try:
                err = ((f() - want).float().norm() / want.float().norm()).item()
                ms = _time_ms(f, iters=30)
                rec.update(ok=err < 2e-2, rel_err=err, us=1e3 * ms, kv_gbps=kv_bytes / ms / 1e6)
            except RuntimeError as e:
                rec.update(ok=False, error=str(e).splitlines()[0][:160])
            recs.append(rec)
        choice = torch._fused_sdp_choice(rows, k, v, bias, 0.0, False)
        recs.append({"probe": "decode_default_backend", "B": B,
                     "choice": BACKENDS.get(int(choice))})
        del kv, k, v
    # Mixtral's expert down projections in a decode step (8 experts, D 4096,
    # F 14336): the batched GEMM against one GEMM of every (rows, expert)
    # pair (the weights read once by many blocks, E x the FLOPs), and the
    # stacked up-projection GEMM.
    E, D, F = 8, 4096, 14336
    w_down = rnd(E, D, F) * 0.01
    w_in = rnd(E * 2 * F, D) * 0.01
    for N in (1, 16):
        h = rnd(N, E, F)
        pairs = lambda: Fn.linear(h.reshape(N * E, F), w_down.reshape(E * D, F))  # noqa: E731
        variants = {"bmm": lambda: torch.bmm(h.transpose(0, 1), w_down.transpose(1, 2)),
                    "all pairs (one GEMM, E x the FLOPs)": pairs,
                    "up, stacked": lambda: Fn.linear(h[:, 0, :D], w_in)}
        for name, fn in variants.items():
            ms = _time_ms(fn, iters=30)
            nbytes = (w_in if name.startswith("up") else w_down).nbytes
            recs.append({"probe": "moe_decode_gemm", "variant": name, "N": N, "us": 1e3 * ms,
                         "weight_gbps": nbytes / ms / 1e6})
    del w_down, w_in
    write(args.out, "probe.jsonl", recs)
    for r in recs:
        if r.get("probe") == "moe_decode_gemm":
            lines.append(f"moe decode N={r['N']} {r['variant']}: {r['us']:.0f} us "
                         f"({r['weight_gbps']:.0f} GB/s)")
        log(json.dumps(r))
        if r.get("probe") == "decode_attention" and r.get("us"):
            lines.append(f"decode attn B={r['B']} {r['variant']}: {r['us']:.1f} us "
                         f"({r['kv_gbps']:.0f} GB/s)")
        if r.get("probe") == "prefill_gqa" and r.get("ms"):
            lines.append(f"prefill attn {r['backend']} {r['form']}: {r['tflops']:.0f} TFLOP/s")
    return lines


# -- kernels per decode layer ------------------------------------------------------------

def kernels(args) -> list[str]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from shardwise.model.load import build_reference
    from shardwise.model.weights import WeightSource, make_inputs
    from shardwise.presets import get_preset

    dev = torch.device("cuda")
    archs = {"gpt-style (seed-helix-4l)": get_preset("seed-helix-4l").model,
             "llama-3.1-8b": model("llama-3.1-8b", 1), "mixtral-8x7b": model("mixtral-8x7b", 1)}
    recs, lines = [], []
    for arch, spec in archs.items():
        spec = spec.replace(dtype="bf16", vocab_size=None, tie_embeddings=False)
        names = {}
        for L in (1, 2):
            with torch.inference_mode():
                s = spec.replace(n_layers=L)
                ref = build_reference(WeightSource(s, 0), torch.bfloat16, dev)
                caches = ref.allocate_caches(16, 600)
                prompt, steps = make_inputs(s, 16, 512, 1, 0, torch.bfloat16, dev)
                ref(prompt, caches, 0)
                pos, x = torch.tensor(512, device=dev), steps[0].clone()
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    ref(x, caches, pos)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    ref(x, caches, pos)
                graph.replay()
                torch.cuda.synchronize()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    graph.replay()
                    torch.cuda.synchronize()
                kern = [e.name for e in prof.events()
                        if e.device_type == torch.autograd.DeviceType.CUDA]
                names[L] = kern
                del ref, caches, graph
                torch.cuda.empty_cache()
        per_layer = len(names[2]) - len(names[1])
        counts = {}
        for n in names[2]:
            counts[n] = counts.get(n, 0) + 1
        for n in names[1]:
            counts[n] -= 1
        layer = {n[:90]: c for n, c in sorted(counts.items()) if c}
        recs.append({"arch": arch, "kernels_per_decode_layer": per_layer,
                     "step_kernels_1_layer": len(names[1]), "layer_kernels": layer,
                     "batch": 16, "context": 512})
        lines.append(f"kernels per decode layer (graph, profiler) {arch}: {per_layer}")
    write(args.out, "kernels.jsonl", recs)
    for r in recs:
        log(json.dumps(r))
    return lines


# -- verify ------------------------------------------------------------------------------

def _launch_all(cases, static: bool, device: str):
    """Rank 0's records of every case, each job relaunched past a failing case."""
    from shardwise.runtime.job import Job
    from shardwise.runtime.launcher import LaunchError, launch

    out = []
    while cases:
        try:
            out += launch(Job(cases, 1, device, static_decode=static), deadline_s=240)
            break
        except LaunchError as e:
            done = len(e.results)
            bad = cases[done]
            log(f"FAILED {bad.model.name} {bad.plan} (static={static}): {e}\n"
                f"{e.traceback_text[-3000:]}")
            out += e.results + [{"model": bad.model.name, "plan": bad.plan, "ok": False,
                                 "static_decode": static, "error": str(e)[:300]}]
            cases = cases[done + 1:]
    return out


def verify(args) -> list[str]:
    from shardwise.bench.records import provenance
    from shardwise.runtime.job import Case
    from shardwise.spec import Workload

    wl = Workload(batch=2, seq_len=args.verify_seq, decode_steps=4)
    cases = []
    for name in args.models:
        spec = model(name, args.verify_layers, args.dtype)
        cases += [Case(spec, wl, plan) for plan in ONE_GPU_PLANS
                  if spec.is_moe or not plan.startswith("ep")]
    lines = []
    for static in (False, True):
        recs = _launch_all(list(cases), static, args.device)
        recs = [{**provenance(args.device, 1), "command": " ".join(sys.argv), **r} for r in recs]
        write(args.out, "verify.jsonl", recs)
        for r in recs:
            extra = ""
            if "max_rel_err_without_flips" in r:
                extra = f" (without routing flips {r['max_rel_err_without_flips']:.2e})"
            lines.append(f"verify {r['model']:>14} {r['plan']:<18} static={str(r.get('static_decode')):<5} "
                         f"{'PASS' if r.get('ok') else 'FAIL'} max_rel_err "
                         f"{r.get('max_rel_err', float('nan')):.2e}{extra}")
    return lines


# -- bench -------------------------------------------------------------------------------

def bench(args) -> list[str]:
    from shardwise.bench.records import provenance
    from shardwise.models import CHECK_WORKLOAD
    from shardwise.runtime.job import Case, Job
    from shardwise.runtime.launcher import LaunchError, launch
    from shardwise.runtime.timing import BenchSettings
    from shardwise.spec import Workload

    lines = []
    for name, layers in args.models.items():
        spec = model(name, layers, args.dtype)
        cases = [Case(spec, CHECK_WORKLOAD, "tp_pp:1x1")]
        for phase, b, seq in SMALL_WORKLOADS if args.small else BENCH_WORKLOADS:
            s = BenchSettings(phase=phase, trace=os.path.join(args.out, "traces")
                              if args.trace else None)
            wl = Workload(batch=b, seq_len=seq, decode_steps=s.decode_positions)
            cases.append(Case(spec, wl, "tp_pp:1x1", verify=False, bench=vars(s)))
        try:
            results = launch(Job(cases, 1, args.device, warmup=1),
                             deadline_s=args.section_timeout)
        except LaunchError as e:
            log(f"FAILED bench {name}: {e}\n{e.traceback_text[-3000:]}")
            results = e.results
        check = next((r for r in results if "ok" in r), {})
        recs = [{**provenance(args.device, 1), "command": " ".join(sys.argv), "model_name": name,
                 **r, "max_rel_err": check.get("max_rel_err"), "numerics_ok": check.get("ok")}
                for r in results if "phase" in r]
        write(args.out, "bench.jsonl", recs)
        if args.trace:  # every table in one file (host ops, then kernels)
            tdir = os.path.join(args.out, "traces")
            with open(os.path.join(args.out, "trace-tables.txt"), "a") as f:
                for t in sorted(os.listdir(tdir)):
                    if t.startswith(name) and t.endswith(".txt"):
                        with open(os.path.join(tdir, t)) as g:
                            f.write(f"== {t}\n{g.read()}\n")
        for r in recs:
            if r["phase"] == "decode":
                fig = (f"step {r['tpot_ms']:.3f} ms, floor {_f(r['hbm_floor_ms'])} ms, "
                       f"x floor {_f(r['floor_ratio'])}, graphs {r['cuda_graphs']}")
            else:
                fig = f"{r['tps']:,.0f} tok/s, MFU {_f(r['mfu'])}"
            lines.append(f"bench {name} {layers}L {r['phase']:>7} {r['batch']:>2} x {r['seq_len']:<5} "
                         f"{fig} (peak {_f(r['matmul_peak_tflops'], 0)} TFLOP/s, "
                         f"copy {_f(r['hbm_peak_gbps'], 0)} GB/s; numerics ok {r['numerics_ok']})")
    return lines


def _f(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sections", nargs="*", help=f"some of {', '.join(SECTIONS)} (default: all)")
    ap.add_argument("--out", default="results/llama")
    ap.add_argument("--models", default=MODELS, help=f"NAME:BENCH_LAYERS,... (default {MODELS})")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--small", action="store_true", help="tiny bench workloads (a CPU check of the script)")
    ap.add_argument("--verify-layers", type=int, default=2)
    ap.add_argument("--verify-seq", type=int, default=1100)
    ap.add_argument("--trace", action="store_true", help="profiler traces of the bench steps")
    ap.add_argument("--section-timeout", type=float, default=240)
    args = ap.parse_args()
    bad = [x for x in args.sections if x not in SECTIONS]
    if bad:
        ap.error(f"unknown section(s) {', '.join(bad)}; choose among {', '.join(SECTIONS)}")
    args.models = {m.split(":")[0]: int(m.split(":")[1]) for m in args.models.split(",")}
    os.makedirs(args.out, exist_ok=True)
    summary = []
    for section in args.sections or SECTIONS:
        t0 = time.time()
        log(f"+ {section}")
        try:
            summary += globals()[section](args)
        except Exception as e:  # report the section and go on with the next
            import traceback

            traceback.print_exc()
            summary.append(f"{section}: FAILED {type(e).__name__}: {str(e)[:200]}")
        log(f"  ({section}: {time.time() - t0:.0f} s)")
    log("\n== summary ==")
    for line in summary:
        log(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
