"""Input fuzzing: random models, workloads, plans and world sizes, end to end.

``python -m shardwise.fuzz --cases N --seed S --summary FILE`` draws N cases
(case i of seed S is the same whatever N is), and holds each to the promise
of the README: a case is either refused before any process starts with a
one-line :class:`ShardwiseError`, or it runs and matches the single-device
reference within tolerance (fp32: 1e-5). Anything else is a failure: a wrong
answer, another exception while validating, a rank that crashes or hangs
after launch, or a refusal whose message is empty or spans several lines.

``--cli`` fuzzes the command line instead (shardwise/fuzz_cli.py).

The cases that pass validation run grouped by world size, as many to a
launch as possible (``runtime.launcher.launch``, one ``Job`` per world size);
a launch that fails is resumed after the failing case (the heartbeat names
it). A hang is caught by the watchdog, with the job deadline behind it. The
summary (JSON, written atomically) counts refusals by reason, verified cases
and failures, each failure with what reproduces it
(``python -m shardwise.fuzz --seed S --only I``). The exit status is 1 when
any case failed.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import shlex
import sys
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass

from .spec import ModelSpec, Plan, ShardwiseError, Workload

TOLERANCE = 1e-5  # fp32: the strategies only reorder additions (see runtime/job.py)
MAX_WORLD = 8  # compositions: up to 8 ranks; single strategies: up to 4

# Why a plan was refused, from its message (first match wins).
REASONS = (
    ("model spec", r"^model '"),
    ("replicas beyond the batch", r"replicas but the batch"),
    ("workload", r"^workload needs|^a decode run needs|^phase must"),
    ("unknown strategy", r"unknown strategy|not implemented"),
    ("option", r"has no option|unknown option|is not known|chunks must|takes the options"),
    ("malformed plan", r"malformed plan|must be a positive integer"),
    ("composition form", r"not a mesh dimension|is a whole plan|names \w+ twice|outermost first"
                         r"|do not compose in one stage"),
    ("world size mismatch", r"ranks? but the job has|would leave \d+ idle|adapts to any number"),
    ("not divisible", r"is not divisible by"),
    ("kv heads neither split nor replicated", r"neither divides the other"),
    ("micro-batches", r"micro-batches but the batch|micro-batch|remove mb=|drop mb="),
    ("degrees", r"takes .*degree|takes NxM|TPxPP|\(one degree\)|write helix:NxM"),
    ("pipeline deeper than the model", r"pipeline stages"),
    ("sequence too short", r"seq_len is"),
    ("dense model under ep", r"dense model"),
    ("capacity", r"capacit"),
)


@dataclass
class FuzzCase:
    index: int
    model: dict  # ModelSpec keyword arguments (may be invalid)
    workload: dict  # Workload keyword arguments
    plan: str
    world: int

    @property
    def strategy(self) -> str:
        """The strategy as written (a malformed plan may name none, or a wrong
        one); ``compose`` for mesh dimensions joined by ``/`` or one of
        dp, pp or tp alone."""
        from .spec import COMPOSE_ONLY

        name = self.plan.partition(":")[0]
        return "compose" if "/" in self.plan or name in COMPOSE_ONLY else name or "(none)"


# -- generation ----------------------------------------------------------------

def _degrees(rng: random.Random, world: int, parts: int) -> list[int]:
    """``parts`` degrees whose product is ``world`` (most of the time), else random."""
    if rng.random() < 0.12:
        return [rng.randint(1, 4) for _ in range(parts)]
    out, left = [], world
    for _ in range(parts - 1):
        d = rng.choice([d for d in range(1, left + 1) if left % d == 0])
        out.append(d)
        left //= d
    out.append(left)
    rng.shuffle(out)
    return out


def _plan(rng: random.Random, strategy: str, world: int, batch: int) -> str:
    opts: list[str] = []
    if strategy == "tp_pp":
        shape = _degrees(rng, world, 2)
        if rng.random() < 0.1:
            shape = shape[:1] if rng.random() < 0.7 else shape + [1]
    elif strategy == "helix":
        shape = _degrees(rng, world, 2)
        if rng.random() < 0.3:
            opts.append(f"reduce={rng.choice(['hier', 'flat', 'flat', 'tree'])}")
    elif strategy == "ring":
        shape = [] if rng.random() < 0.15 else [world if rng.random() < 0.85 else rng.randint(1, 4)]
    elif strategy == "layerwise":
        shape = []
        cap = rng.choice(["HBM", "L2", "1KB", "4KB", "16KB", "64KB", "256KB", "1MB", "2MB",
                          "10B", "80GB", "HBM*0.5", "lots"])
        if rng.random() > 0.05:
            opts.append(f"cap={cap}")
    else:  # ep
        shape = _degrees(rng, world, 1)
        if rng.random() < 0.3:
            opts.append(f"chunks={rng.choice(['1', '2', '3', '5', '0', 'x'])}")
    if rng.random() < 0.25:
        opts.append(f"mb={rng.choice([1, 2, 2, 3, batch, batch + 1])}")
    head = "x".join(map(str, shape))
    text = ",".join(([head] if head else []) + opts)
    return strategy + (":" + text if text else "")


# A stage's kinds (compose.py) and their dimensions, innermost last.
STAGES = ((), ("tp",), ("helix",), ("ring",), ("ring", "tp"), ("ep",), ("ep", "tp"))
# Compositions that must be refused for their form, whatever the model.
MALFORMED_COMPOSED = ("tp:2/pp:2", "pp:2/pp:2", "pp:2/tp_pp:2x1", "pp:2/sp:2", "ring:2/ep:2",
                      "helix:2x1/tp:2", "pp:2x2/tp:2", "pp:2,mb=2/tp:2,mb=2", "pp:2/",
                      "ring:2/helix:1x2", "dp:2/layerwise:cap=HBM")


def _composed(rng: random.Random, batch: int) -> tuple[str, int]:
    """A composition and its world size: dp and pp (each present or not),
    then one kind of stage, the degrees' product the world size most of the
    time."""
    world = rng.choice([2, 3, 4, 4, 6, 8, 8])
    dims = [d for d in ("dp", "pp") if rng.random() < 0.5] + list(rng.choice(STAGES))
    if not dims:
        dims = ["pp"]
    widths = [2 if d == "helix" else 1 for d in dims]
    degrees = _degrees(rng, world, sum(widths))
    parts, at = [], 0
    for d, w in zip(dims, widths):
        parts.append(f"{d}:" + "x".join(map(str, degrees[at : at + w])))
        at += w
        if d == "tp" and rng.random() < 0.15:
            parts[-1] += f",overlap={rng.choice(['1', '2', 'auto'])}"
        if d == "helix" and rng.random() < 0.3:
            parts[-1] += ",reduce=flat"
        if d == "ep" and rng.random() < 0.2:
            parts[-1] += f",chunks={rng.choice(['1', '2', '3'])}"
    text = "/".join(parts)
    if rng.random() < 0.3:
        text += f",mb={rng.choice([2, 2, 3, batch, batch + 1])}"
    if rng.random() < 0.05:
        text = rng.choice(MALFORMED_COMPOSED)
    return text, world


# Position interpolation, and Llama 3.1's scaling with original_max_position_embeddings
# shrunk to 64 so that a tiny head's wavelengths reach its smoothed and stretched bands.
ROPE_SCALINGS = ({"rope_type": "linear", "factor": 4.0},
                 {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64})

MALFORMED = ("tp_pp:2x", "helix:0x2", "pipeline:2", "tp_pp:2x2,,mb=", "ring:2,mb=-1",
             "tp_pp:2x1x", "Ring:2", "ep:two", "helix:2x2,reduce=", ":2", "tp_pp:2x2,2x1")


def generate(seed: int, index: int) -> FuzzCase:
    """Case ``index`` of ``seed`` (independent of how many cases are drawn)."""
    rng = random.Random(f"shardwise-fuzz:{seed}:{index}")
    kv, group = rng.choice([1, 1, 2, 2, 3, 4]), rng.choice([1, 1, 2, 3])
    n_heads = kv * group
    n_kv_heads = None if group == 1 and rng.random() < 0.5 else kv
    if rng.random() < 0.03:
        n_kv_heads = kv + 1  # not a divisor of n_heads in most draws
    rope = rng.random() < 0.5
    head_dim = rng.choice([2, 4, 4, 6, 8, 8, 12, 16] + ([] if rope else [3, 5]))
    if rng.random() < 0.03:
        head_dim = 3  # odd under rope is refused
    model = dict(
        name=f"fuzz-s{seed}-c{index}", n_layers=rng.randint(1, 4),
        d_model=rng.choice([8, 12, 16, 24, 32]), n_heads=n_heads, head_dim=head_dim,
        d_ff=rng.choice([4, 6, 8, 12, 16, 24, 32, 48]), n_kv_heads=n_kv_heads, dtype="fp32",
        norm=rng.choice(["layernorm", "rmsnorm"]), activation=rng.choice(["gelu", "swiglu"]),
        vocab_size=rng.choice([None, None, 16, 37]),
        rope_theta=rng.choice([10000.0, 500.0]) if rope else None,
    )
    strategy = rng.choice(["tp_pp", "tp_pp", "helix", "helix", "ring", "layerwise", "ep"])
    if rng.random() < 0.35 or (strategy == "ep" and rng.random() < 0.8):
        n_experts = rng.choice([2, 3, 4, 4, 6, 8])
        top_k = rng.randint(1, min(3, n_experts)) if rng.random() > 0.03 else n_experts + 1
        model.update(n_experts=n_experts, top_k=top_k)
    workload = dict(batch=rng.randint(1, 4), seq_len=rng.randint(1, 12),
                    decode_steps=rng.randint(1, 3))
    world = rng.choice([1, 2, 2, 3, 4, 4])
    plan = _plan(rng, strategy, world, workload["batch"])
    if rng.random() < 0.04:
        plan = rng.choice(MALFORMED)
    # Published models' features, drawn last so that every earlier draw (and
    # the cases recorded before they were drawn) stays as it was. More ranks
    # than KV heads (replicated KV heads) comes from the draws above.
    if rng.random() < 0.3:
        model["qkv_bias"] = True
    if model["vocab_size"] is not None and rng.random() < 0.3:
        model["tie_embeddings"] = True
    if rope and rng.random() < 0.3:
        model["rope_scaling"] = rng.choice(ROPE_SCALINGS)
    if rng.random() < 0.02:  # refused: no vocabulary to tie, or no rotary to scale
        model.update(rng.choice([{"tie_embeddings": True, "vocab_size": None},
                                 {"rope_scaling": ROPE_SCALINGS[0], "rope_theta": None}]))
    # Compositions, drawn last for the same reason: a third of the cases
    # become one (on up to 8 ranks), the model as drawn; more of them MoE,
    # where ep can run.
    if rng.random() < 0.35:
        # Deeper models and larger batches than the draws above: room for
        # pipeline stages and data-parallel replicas.
        model["n_layers"], workload["batch"] = rng.randint(1, 6), rng.randint(1, 6)
        plan, world = _composed(rng, workload["batch"])
        if "ep:" in plan and not model.get("n_experts") and rng.random() < 0.7:
            n_experts = rng.choice([2, 4, 4, 6, 8, 12])
            model.update(n_experts=n_experts, top_k=rng.randint(1, min(3, n_experts)))
    return FuzzCase(index, model, workload, plan, world)


# -- checking before launch ------------------------------------------------------

def reason_of(message: str) -> str:
    for name, pattern in REASONS:
        if re.search(pattern, message):
            return name
    return "other"


def prelaunch(fc: FuzzCase):
    """("refused", message) | ("valid", Case) | ("failed", details): what the
    CLI's checks make of the case, without starting any process."""
    from .parallel.registry import check_plan
    from .runtime.job import Case

    try:
        spec = ModelSpec(**fc.model)
        wl = Workload(**fc.workload)
        plan = Plan.parse(fc.plan)
        check_plan(spec, wl, plan, fc.world)
    except ShardwiseError as e:
        message = str(e)
        if not message.strip() or "\n" in message:
            return "failed", {"kind": "bad refusal (empty or several lines)", "error": message}
        return "refused", message
    except Exception as e:  # noqa: BLE001 - exactly what the fuzzer looks for
        return "failed", {"kind": "exception during validation (not ShardwiseError)",
                          "error": f"{type(e).__name__}: {e}",
                          "traceback": traceback.format_exc()}
    return "valid", Case(spec, wl, str(plan), seed=fc.index)


# -- running -------------------------------------------------------------------

def run_world(world: int, cases: list[FuzzCase], valid: dict, watchdog_s: float,
              per_case_s: float, log=print, fault: str | None = None
              ) -> tuple[dict[int, dict], int]:
    """Run ``cases`` (all of world size ``world``) in as few launches as
    failures allow; returns ({case index: outcome}, launches). ``fault``
    (``Job.fault``, tests only) is injected into the first launch."""
    from .runtime.job import Job
    from .runtime.launcher import LaunchError, launch

    outcome: dict[int, dict] = {}
    pending, launches = list(cases), 0
    by_name = {fc.model["name"]: fc for fc in cases}
    while pending:
        launches += 1
        job = Job([valid[fc.index] for fc in pending], world, "cpu", timeout_s=watchdog_s * 4,
                  watchdog_s=watchdog_s, fault=fault if launches == 1 else None)
        log(f"launch {launches} on {world} rank(s): {len(pending)} case(s)")
        try:
            results, failure = launch(job, deadline_s=60 + per_case_s * len(pending)), None
        except LaunchError as e:
            results, failure = e.results, e
        for r in results:
            fc = by_name[r["model"]]
            errs = [r["prefill_rel_err"], *r["decode_rel_err"]]
            if r.get("ok") and max(errs) <= TOLERANCE:
                outcome[fc.index] = {"status": "verified", "max_rel_err": max(errs)}
            else:
                outcome[fc.index] = {"status": "failed", "kind": "wrong answer",
                                     "error": f"relative errors {errs} (tolerance {TOLERANCE})"}
        if failure is None:
            missing = [fc for fc in pending if fc.index not in outcome]
            for fc in missing:
                outcome[fc.index] = {"status": "failed", "kind": "no result",
                                     "error": "the job ended without a record for this case"}
            break
        k = failure.case if failure.case is not None else len(results)
        k = min(k, len(pending) - 1)
        text = str(failure)
        kind = ("hang (watchdog)" if text.startswith("watchdog") else
                "hang (deadline)" if "deadline" in text.splitlines()[0] else "crash after launch")
        outcome[pending[k].index] = {"status": "failed", "kind": kind,
                                     "error": text.splitlines()[0],
                                     "traceback": (failure.traceback_text or text)[-3000:]}
        pending = pending[k + 1:]
    return outcome, launches


def fuzz(seed: int, indices: list[int], watchdog_s: float = 30.0, per_case_s: float = 20.0,
         log=print, faults: dict[int, str] | None = None) -> dict:
    """Draw, check and run the cases; return the summary (not yet written).
    ``faults`` maps a world size to a ``Job.fault`` for its first launch (tests)."""
    import torch

    t0 = time.monotonic()
    drawn = [generate(seed, i) for i in indices]
    refused: dict[str, list] = {}
    valid, failures, verified = {}, [], []
    for fc in drawn:
        status, detail = prelaunch(fc)
        if status == "refused":
            refused.setdefault(reason_of(detail), []).append((fc, detail))
        elif status == "valid":
            valid[fc.index] = detail
        else:
            failures.append((fc, detail))
    by_world: dict[int, list[FuzzCase]] = {}
    for fc in drawn:
        if fc.index in valid:
            by_world.setdefault(fc.world, []).append(fc)
    launches, max_err = 0, 0.0
    for world in sorted(by_world):
        outcome, n = run_world(world, by_world[world], valid, watchdog_s, per_case_s, log,
                               (faults or {}).get(world))
        launches += n
        for fc in by_world[world]:
            o = outcome[fc.index]
            if o["status"] == "verified":
                verified.append(fc)
                max_err = max(max_err, o["max_rel_err"])
            else:
                failures.append((fc, {k: v for k, v in o.items() if k != "status"}))

    per_strategy: dict[str, Counter] = {}
    for status, group in (("verified", verified), ("failed", [f for f, _ in failures]),
                          ("refused", [f for v in refused.values() for f, _ in v])):
        for fc in group:
            per_strategy.setdefault(fc.strategy, Counter())[status] += 1
    return {
        "seed": seed,
        "cases": len(drawn),
        "torch": torch.__version__,
        "counts": {"refused": sum(len(v) for v in refused.values()),
                   "verified": len(verified), "failed": len(failures)},
        "refused_by_reason": {k: len(v) for k, v in sorted(refused.items())},
        "refusal_examples": {k: f"case {v[0][0].index} ({v[0][0].plan} on {v[0][0].world} "
                                f"ranks): {v[0][1]}" for k, v in sorted(refused.items())},
        "by_strategy": {k: dict(v) for k, v in sorted(per_strategy.items())},
        "verified_by_world": dict(Counter(str(fc.world) for fc in verified)),
        "max_rel_err_verified": max_err,
        "tolerance": TOLERANCE,
        "launches": launches,
        "elapsed_s": round(time.monotonic() - t0, 1),
        "failures": [{**asdict(fc), **detail,
                      "reproduce": f"python -m shardwise.fuzz --seed {seed} --only {fc.index}"}
                     for fc, detail in sorted(failures, key=lambda f: f[0].index)],
        "failed_indices": sorted(fc.index for fc, _ in failures),
    }


def parse_indices(text: str) -> list[int]:
    """``3,7,10-12`` -> [3, 7, 10, 11, 12]."""
    out = []
    for part in filter(None, text.split(",")):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b or a) + 1))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shardwise.fuzz", description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=50, help="cases 0 .. N-1 of the seed")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", help="run just these case indices, e.g. 3,7,10-12")
    ap.add_argument("--summary", help="JSON summary to write (atomically)")
    ap.add_argument("--watchdog", type=float, default=30.0,
                    help="seconds without progress before a launch is called hung")
    ap.add_argument("--cli", action="store_true",
                    help="fuzz the command line instead (random flags and values for every "
                         "subcommand; see shardwise/fuzz_cli.py)")
    ap.add_argument("--launch", type=int, default=0,
                    help="--cli: run this many of the small launched jobs for real")
    args = ap.parse_args(argv)
    indices = parse_indices(args.only) if args.only else list(range(args.cases))
    command = shlex.join(["python", "-m", "shardwise.fuzz",
                          *(argv if argv is not None else sys.argv[1:])])
    if args.cli:
        return _cli_main(args, indices, command)
    from .bench.records import git_rev

    rev = git_rev()  # the code the cases run, before they run
    summary = {"command": command, "git_rev": rev, **fuzz(args.seed, indices, args.watchdog)}
    c = summary["counts"]
    print(f"fuzz seed {args.seed}: {summary['cases']} cases, {c['refused']} refused, "
          f"{c['verified']} verified, {c['failed']} failed ({summary['launches']} launches, "
          f"{summary['elapsed_s']} s)")
    for f in summary["failures"]:
        print(f"  FAILED case {f['index']} ({f['plan']} on {f['world']} ranks): {f['kind']}: "
              f"{f['error'][:300]}")
    _write_summary(args.summary, summary)
    return 1 if c["failed"] else 0


def _cli_main(args, indices: list[int], command: str) -> int:
    from .bench.records import git_rev
    from .fuzz_cli import fuzz_cli

    rev = git_rev()
    summary = {"command": command, "git_rev": rev, **fuzz_cli(args.seed, indices, args.launch)}
    c = summary["counts"]
    print(f"fuzz --cli seed {args.seed}: {summary['cases']} command lines: "
          + ", ".join(f"{v} {k}" for k, v in c.items())
          + f" ({summary['launched_for_real']} launched for real, {summary['elapsed_s']} s)")
    for f in summary["failures"]:
        print(f"  FAILED case {f['index']}: shardwise {f['argv']}: {f['kind']}: "
              f"{f['error'][:300]}")
    _write_summary(args.summary, summary)
    return 1 if c.get("failed") else 0


def _write_summary(path: str | None, summary: dict) -> None:
    if path:
        from .runtime.worker import write_atomic

        write_atomic(path, json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
