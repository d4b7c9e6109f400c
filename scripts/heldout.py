"""Held-out fidelity: predict first, commit, then measure exactly those cases.

Add ``--round N`` before the command for an earlier round. The cases are zoo models cut to a few layers at batch x length pairs that no
calibration probes and no earlier record used. Three steps, each its own
command, so the history shows the predictions committed before the
measurements exist:

    python scripts/heldout.py predict --profile P.json --out results/predictions/NAME.jsonl
    python scripts/heldout.py commands                 # the bench command lines, one a line
    python scripts/heldout.py compare --predictions results/predictions/NAME.jsonl RECORDS.jsonl ...

``predict`` writes one JSON line per (case, plan, metric): prefill tokens/s,
the decode step replayed from a CUDA graph (where the strategy captures it,
as ``shardwise bench`` runs it) and the eager decode step (``--no-graphs``),
each with the bench command whose record it is to be held against.
``compare`` matches every measured record to its prediction by that command
and plan, and prints each error and, per strategy and metric, the median and
largest |predicted / measured - 1| against the bar ``report --fidelity``
holds (median 10%, max 20%).
"""
import argparse
import json
import os
import sys

from shardwise.bench.records import read_records
from shardwise.models import resolve
from shardwise.perf.clusters import load_cluster
from shardwise.perf.costmodel import predict
from shardwise.output import render
from shardwise.perf.reproduce import summary_sheet
from shardwise.spec import Workload

# Per round, (model, layers, batch, prompt length): shapes no preset has, at
# workloads no record measured before the round's predictions were committed
# (round 1's time: 4 x 6000, 1 x 2048, 16 x 4096, 2 x 1100 and the seeds' own;
# round 2 adds round 1's three). Round 2 was added after the model priced the
# split-key decode kernel and recorded every strategy's calls, to hold it out
# again on models none of its revisions saw measured.
ROUNDS = {
    1: [("mistral-7b", 4, 3, 2500),
        ("qwen2.5-72b", 2, 1, 5000),
        ("mixtral-8x7b", 2, 6, 1500)],
    2: [("llama-3.1-70b", 2, 2, 3300),
        ("mixtral-8x22b", 1, 5, 1300),
        ("llama-3.1-8b", 3, 12, 900)],
}
ITERS, WARMUP = 10, 3


def plans(model: str) -> list[str]:
    """Every strategy that runs on one GPU."""
    out = ["tp_pp:1x1", "helix:1x1", "ring:1", "layerwise:cap=HBM"]
    return out + (["ep:1"] if model.startswith("mixtral") else [])


def commands(out_dir: str, rnd: int) -> list[tuple[str, str, int, int, int, str]]:
    """(command, model, layers, batch, seq, kind) per bench invocation of round
    ``rnd``; kind 'both' (prefill and graph decode) or 'eager' (decode,
    --no-graphs). Round 1's commands stay as they were committed."""
    rows = []
    stem = "heldout" if rnd == 1 else f"round{rnd}"
    for model, layers, batch, seq in ROUNDS[rnd]:
        base = (f"shardwise bench --out {out_dir}/{stem}-{model}.jsonl --model {model} "
                f"--layers {layers} --dtype bf16 --batch {batch} --seq {seq} "
                f"--iters {ITERS} --warmup {WARMUP} " + " ".join(f"--plan {p}" for p in plans(model)))
        rows.append((base + " --phase both", model, layers, batch, seq, "both"))
        rows.append((base + " --phase decode --no-graphs", model, layers, batch, seq, "eager"))
    return rows


def cmd_predict(args) -> None:
    cl = load_cluster(args.profile)
    lines = []
    for command, model, layers, batch, seq, kind in commands(args.records_dir, args.round):
        spec = resolve(model, layers=layers, dtype="bf16").spec
        wl = Workload(batch=batch, seq_len=seq, decode_steps=WARMUP + ITERS + 1)
        for plan in plans(model):
            p = predict(spec, wl, plan, cl, 1, graphs=None if kind == "both" else False)
            figures = ([("prefill tok/s", p.prefill_tps), ("decode ms (graph)", p.decode_step_ms)]
                       if kind == "both" else [("decode ms (eager)", p.decode_step_ms)])
            for metric, value in figures:
                lines.append({"command": command, "plan": plan, "model": model, "layers": layers,
                              "batch": batch, "seq_len": seq, "metric": metric,
                              "predicted": value, "profile": cl.name, "fits": p.fits})
            print(f"{model:14s} {plan:20s} {kind:6s} "
                  + "  ".join(f"{m} {v:,.4g}" for m, v in figures), file=sys.stderr)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        f.write(f'{{"predicted_by": {json.dumps(" ".join(["python", *sys.argv]))}}}\n')
        for line in lines:
            f.write(json.dumps(line) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {len(lines)} predictions to {args.out}", file=sys.stderr)


def _metric(r: dict) -> list[tuple[str, float]]:
    if r.get("phase") == "prefill" and r.get("tps"):
        return [("prefill tok/s", r["tps"])]
    if r.get("phase") == "decode" and r.get("tpot_ms"):
        return [("decode ms (graph)" if r.get("cuda_graphs") else "decode ms (eager)", r["tpot_ms"])]
    return []


def cmd_compare(args) -> None:
    # A prediction is the bench command, plan and metric it was made for.
    preds = {}
    for r in read_records(args.predictions):
        if "metric" in r:
            preds[(r["command"], r["plan"], r["metric"])] = r["predicted"]
    errors: dict = {}
    rows, unmatched = [], []
    for path in args.records:
        for r in read_records(path):
            for metric, measured in _metric(r):
                key = (r.get("command"), r.get("plan"), metric)
                if key not in preds:
                    unmatched.append(f"{r.get('plan')} {metric} ({r.get('command')})")
                    continue
                err = preds.pop(key) / measured - 1
                errors.setdefault((key[1].split(":")[0], metric), []).append(err)
                rows.append((r["plan"], r.get("model"), f"{r['batch']}x{r['seq_len']}", metric,
                             measured, measured * (1 + err), err, r.get("numerics_ok")))
    print(f"{'plan':20s} {'model':14s} {'b x s':8s} {'metric':18s} {'measured':>12s} "
          f"{'predicted':>12s} {'error':>7s}  numerics")
    for plan, model, bs, metric, meas, pred, err, ok in rows:
        print(f"{plan:20s} {model:14s} {bs:8s} {metric:18s} {meas:12,.4g} {pred:12,.4g} "
              f"{err:+7.1%}  {'ok' if ok else ok}")
    print("\n" + render([summary_sheet(errors)]), end="")
    if preds:
        print("\npredicted, never measured:\n" + "\n".join(f"- {k[1]} {k[2]} ({k[0]})" for k in preds))
    if unmatched:
        print("\nmeasured, never predicted:\n" + "\n".join(f"- {u}" for u in unmatched))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--round", type=int, default=max(ROUNDS), choices=sorted(ROUNDS),
                    help="which round of cases (default: the latest)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("predict")
    p.add_argument("--profile", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--records-dir", default="results/heldout",
                   help="where the bench commands will write their records")
    c = sub.add_parser("commands")
    c.add_argument("--records-dir", default="results/heldout")
    m = sub.add_parser("compare")
    m.add_argument("--predictions", required=True)
    m.add_argument("records", nargs="+")
    args = ap.parse_args()
    if args.cmd == "predict":
        cmd_predict(args)
    elif args.cmd == "commands":
        for command, *_ in commands(args.records_dir, args.round):
            print(command)
    else:
        cmd_compare(args)


if __name__ == "__main__":
    main()
