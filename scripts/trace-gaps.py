"""Where a profiled step leaves the GPU idle: read a Chrome trace that
``shardwise bench --trace DIR`` wrote and list each gap between kernels
longer than ``--min-us``, with the kernel after it, the host op that
launched that kernel, when the launch came (after the GPU had gone idle: the
host was late), and the host calls between the gap's start and the launch
that took longest (a device-to-host read, a synchronisation). Ends with the
idle time by the host op that launched the kernel after each gap.

Usage: python scripts/trace-gaps.py TRACE.json [--min-us 5] [--top 40]
"""
import argparse
import bisect
import collections
import json

DEVICE = {"kernel", "gpu_memcpy", "gpu_memset"}
LAUNCH = {"cuda_runtime", "cuda_driver"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--min-us", type=float, default=5.0)
    ap.add_argument("--top", type=int, default=40)
    args = ap.parse_args()
    events = [e for e in json.load(open(args.trace))["traceEvents"] if e.get("ph") == "X"]
    gpu = sorted((e for e in events if e.get("cat") in DEVICE), key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") in LAUNCH and "correlation" in e.get("args", {})}
    host = sorted((e for e in events if e.get("cat") in ("cpu_op", "cuda_runtime", "cuda_driver")),
                  key=lambda e: e["ts"])
    starts = [e["ts"] for e in host]
    ops = [e for e in host if e.get("cat") == "cpu_op"]
    if not gpu:
        raise SystemExit(f"{args.trace}: no device events")
    span = gpu[-1]["ts"] + gpu[-1]["dur"] - gpu[0]["ts"]
    busy = end = 0.0
    gaps = []
    for prev, nxt in zip(gpu, gpu[1:]):
        end = max(end, prev["ts"] + prev["dur"])
        gap = nxt["ts"] - end
        if gap < args.min_us:
            continue
        launch = launches.get(nxt.get("args", {}).get("correlation"))
        op = _innermost(ops, launch["ts"]) if launch else None
        late = launch["ts"] - end if launch else None
        lo = bisect.bisect_left(starts, end)
        hi = bisect.bisect_left(starts, launch["ts"]) if launch else lo
        slow = sorted(host[lo:hi], key=lambda e: -e.get("dur", 0))[:3]
        gaps.append((gap, nxt["name"], op["name"] if op else "?", late,
                     [(e["name"], round(e.get("dur", 0), 1)) for e in slow]))
    for e in gpu:
        busy += e["dur"]
    idle = sum(g[0] for g in gaps)
    print(f"{args.trace}: device span {span:.0f} us, kernels {len(gpu)}, "
          f"idle in gaps >= {args.min_us:g} us: {idle:.0f} us in {len(gaps)} gaps")
    print(f"{'gap us':>8} {'launched late us':>16}  kernel after / host op that launched it / "
          f"longest host calls before the launch")
    for gap, name, op, late, slow in sorted(gaps, key=lambda g: -g[0])[:args.top]:
        late_s = f"{late:.1f}" if late is not None else "?"
        print(f"{gap:8.1f} {late_s:>16}  {name[:60]} / {op} / {slow}")
    by_op = collections.Counter()
    for gap, _, op, _, _ in gaps:
        by_op[op] += gap
    print("idle by the host op launching the kernel after it:")
    for op, us in by_op.most_common(15):
        print(f"  {us:8.1f} us  {op}")


def _innermost(ops, ts):
    """The shortest host op whose interval holds ``ts``."""
    best = None
    for e in ops:
        if e["ts"] > ts:
            break
        if e["ts"] + e.get("dur", 0) >= ts and (best is None or e["dur"] < best["dur"]):
            best = e
    return best


if __name__ == "__main__":
    main()
