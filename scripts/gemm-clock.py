"""The GEMM rate over time under load: how long a GPU holds its burst clock.

After ``--idle`` seconds idle, runs back-to-back bf16 GEMMs (``--n`` cubed)
for ``--seconds`` and writes the rate of each window of ``--window``
seconds (CUDA events around each GEMM), with the SM clock read by NVML
where available; then the same with the GPU busy only ``--duty`` of each
50 ms period (sleeps between GEMMs), as a prefill with host gaps is. One
JSON line per window to ``--out``.

    python scripts/gemm-clock.py --out results/diag/gemm-clock.jsonl
"""
import argparse
import json
import os
import subprocess
import time

import torch


def sm_clock():
    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
        return lambda: pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM)
    except Exception:
        return lambda: None


def run(a, b, seconds: float, window: float, duty: float, clock, label: str) -> list[dict]:
    flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
    rows, t0 = [], time.perf_counter()
    w_start, w_flops, w_gpu_s = t0, 0, 0.0
    period = 0.05
    while time.perf_counter() - t0 < seconds:
        p0 = time.perf_counter()
        while time.perf_counter() - p0 < period * duty:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            torch.mm(a, b)
            e.record()
            e.synchronize()
            w_flops += flops
            w_gpu_s += s.elapsed_time(e) / 1e3
        if duty < 1:
            time.sleep(max(0.0, period - (time.perf_counter() - p0)))
        now = time.perf_counter()
        if now - w_start >= window:
            rows.append({"run": label, "duty": duty, "t_s": round(now - t0, 3),
                         "tflops": w_flops / w_gpu_s / 1e12 if w_gpu_s else None,
                         "busy": w_gpu_s / (now - w_start), "sm_mhz": clock()})
            w_start, w_flops, w_gpu_s = now, 0, 0.0
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--window", type=float, default=0.1)
    ap.add_argument("--idle", type=float, default=5.0)
    ap.add_argument("--duty", type=float, default=0.8)
    args = ap.parse_args()
    a = torch.randn(args.n, args.n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(args.n, args.n, device="cuda", dtype=torch.bfloat16)
    torch.mm(a, b)
    torch.cuda.synchronize()
    clock = sm_clock()
    rows = []
    for duty in (1.0, args.duty):
        time.sleep(args.idle)
        rows += run(a, b, args.seconds, args.window, duty, clock, f"duty {duty}")
    head = {"command": "python scripts/gemm-clock.py " + " ".join(
        f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "git_rev": os.environ.get("SHARDWISE_GIT_REV") or subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()}
    with open(args.out, "w") as f:
        for r in rows:
            f.write(json.dumps({**head, **r}) + "\n")
    for r in rows:
        print(r["run"], r["t_s"], round(r["tflops"] or 0, 1), round(r["busy"], 2), r["sm_mhz"])


if __name__ == "__main__":
    main()
