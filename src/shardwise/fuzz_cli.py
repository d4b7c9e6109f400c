"""Command-line fuzzing: random flags and values for every subcommand.

``python -m shardwise.fuzz --cli --cases N --seed S [--launch K] [--summary FILE]``
draws N command lines from the CLI's own parser (every subcommand and every
flag it declares, so a new flag is fuzzed as soon as it exists) with values
of the right type and of every wrong kind: zero, negative, not a number,
infinite, huge, empty, text for a number; missing files, directories,
malformed JSON lines, a last line cut short, records without their keys,
profiles that are not JSON, a file where a directory is meant and the other
way round. Each command line is held to the CLI's promise:

* never a traceback: it is refused before anything runs, with one line
  (exit code 2; argparse's own usage errors count), or it runs and exits 0;
* never a launch that a check could have stopped: the launcher is replaced by
  a stub that records the job and ends the command there, so hundreds of
  cases take seconds; the first K launched jobs that are small (CPU, tiny
  model and workload) then run for real and must succeed. Likewise the
  planner (plan, reproduce) prices a few of its candidates, one of each
  strategy and one composition, each at its own micro-batch count, not the
  hundreds a cluster has: every table it prints is still made and checked.

Case i of seed S is the same whatever N is (``--only I`` repeats it); each
case runs in a fresh scratch directory holding the files its paths name.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import traceback
from collections import Counter

# Values by kind: (good, odd, wrong). Good ones keep a launch small; odd ones
# are valid somewhere (another model, a GPU) or harmless; a wrong one must be
# refused before anything runs, whatever the command. No small positive time
# is drawn: a deadline of a millisecond ends a job by design.
INTS = (["1", "2", "3", "4"], ["64"], ["0", "-1", "-7", "x", "", "1.5"])
ZERO_OK = {"steps", "warmup", "seed"}  # integer flags where 0 is a value, not an error
FLOATS = (["60", "300", "600"], ["0.5"], ["0", "-1", "nan", "inf", "-inf", "1e400", "x", ""])
SETTLE = (["0", "0.25", "1"], ["60"], ["-1", "61", "nan", "inf", "x", ""])  # seconds, 0 to 60
PRESETS = (["tiny-dense", "tiny-moe"], ["small-l2", "seed-helix-2l"], ["nope", ""])
PLANS = (["tp_pp:1x1", "tp_pp:2x1", "tp_pp:1x2", "tp_pp:2x2", "tp_pp:2x1,mb=2", "helix:2x1",
          "helix:1x2", "ring:2", "layerwise:cap=1MB", "ep:2", "torch_eager:1", "torch_tp:2"],
         ["ring:1", "layerwise:cap=HBM", "ep:4", "ep:3", "torch_cp:2", "tp_pp:3x1"],
         ["tp_pp:2x", "helix:0x2", "pipeline:2", "tp_pp:2x2,,mb=", "ring:2,mb=-1", "Ring:2",
          ":2", ""])
CAPACITIES = (["1MB", "80GB", "HBM@h100"], ["L2", "HBM", "HBM*0.5"], ["lots", "0", "-1MB", ""])
PROMPT_IDS = (["1,2,3", "5"], ["1,,2", "-1", "1, 2"], ["", "x"])
SEEDS = (["000", "001", "002", "003", "004", "seed-helix-2l"], [], ["tiny-dense", "nope", ""])
CLUSTERS = (["h200-x2", "h100-sxm-8"], [], ["nope", "@not_json", "@json_array", "@dir",
                                            "@missing"])
# --profile matters to report only with --fidelity: a wrong one is otherwise unused.
PROFILES = (["@profile"], ["@not_json", "@json_array", "@dir", "@missing"], [])
REPORTED = (["@good"], ["@empty"], ["@malformed", "@cut", "@nokeys", "@array", "@binary",
                                    "@missing", "@dir"])
# reproduce shows the records that match a seed's runs: one without the keys
# to match on is not one of them.
RESULTS = (["@good"], ["@empty", "@nokeys"], ["@malformed", "@cut", "@array", "@binary",
                                              "@missing", "@dir"])
OUTPUT_FILES = (["@new", "@good"], ["@malformed"], ["@dir", "@under_file"])
OUTPUT_DIRS = (["@new_dir", "@dir"], [], ["@good", "@under_file"])
# --model: a preset or zoo name (no checkpoint here, so no path is right).
MODELS = (["tiny-dense", "tiny-moe"], ["llama-3.1-8b", "mixtral-8x7b"],
          ["@missing", "@dir", "nope"])
BY_DEST = {"preset": PRESETS, "plan": PLANS, "plans": PLANS, "capacity": CAPACITIES,
           "prompt_ids": PROMPT_IDS, "seed": SEEDS, "cluster": CLUSTERS, "profile": PROFILES,
           "files": REPORTED, "results": RESULTS, "out": OUTPUT_FILES, "json": OUTPUT_FILES,
           "trace": OUTPUT_DIRS, "plots": OUTPUT_DIRS, "model": MODELS, "settle": SETTLE}
OTHER = (["x", "tiny-dense"], [""], [])  # a string flag not named above
WRONG_CHOICES = ["", "x", "gpu", "all"]

# A bench record as `shardwise bench` writes it (the keys `report` reads).
BENCH_RECORD = {"model": "tiny-dense", "preset": "tiny-dense", "dtype": "fp32", "n_layers": 4,
                "batch": 4, "seq_len": 32, "device": "cpu", "n_devices": 2,
                "plan": "tp_pp:2x1", "phase": "prefill", "tps": 1000.0, "median_ms": 1.0,
                "p10_ms": 0.9, "p90_ms": 1.1, "n": 3}


class _Launched(BaseException):
    """Raised by the stub launcher: the command passed every check before launch."""


class _TooLong(BaseException):
    """A command line that ran past its time (checks that never end are a failure too)."""


# Seconds one command line may take: with launches stubbed, checks, tables
# and plots take a few; a real launch of a small job, tens.
STUB_S, REAL_S = 60, 600


def _workspace(root: str) -> dict[str, str]:
    """The files and folders a case's paths may name, made afresh under ``root``."""
    def path(name, text=None, binary=None):
        p = os.path.join(root, name)
        if text is not None:
            with open(p, "w") as f:
                f.write(text)
        if binary is not None:
            with open(p, "wb") as f:
                f.write(binary)
        return p

    from importlib import resources

    good = json.dumps(BENCH_RECORD) + "\n"
    os.makedirs(os.path.join(root, "adir"))
    profile = (resources.files("shardwise.perf") / "profiles" / "h200-x2.json").read_text()
    return {
        "good": path("good.jsonl", good),
        "malformed": path("bad.jsonl", good + "{bad\n" + good),
        "cut": path("cut.jsonl", good + good[:20]),
        "nokeys": path("nokeys.jsonl", json.dumps({"phase": "prefill", "tps": 1.0}) + "\n"),
        "array": path("array.jsonl", "[1, 2]\n"),
        "empty": path("empty.jsonl", ""),
        "binary": path("binary.jsonl", binary=bytes(range(256))),
        "missing": path("missing.jsonl"),
        "dir": path("adir"),
        "under_file": os.path.join(root, "good.jsonl", "x.jsonl"),
        "new": path("new.jsonl"),
        "new_dir": path("newdir"),
        "profile": path("profile.json", profile),
        "not_json": path("notjson.json", "not json\n"),
        "json_array": path("array.json", "[]\n"),
    }


def _values(rng: random.Random, action: argparse.Action, ws: dict[str, str],
            wrong_rate: float, drawn: dict) -> list[str]:
    """Values for one flag. ``drawn`` keeps the command line's count of values
    (``n``), the one that must be wrong (``force``, by that count, or None)
    and the wrong and odd values drawn (``wrong``, ``odd``: ``dest=value``)."""
    if action.nargs == 0:
        return []
    if action.choices:
        pools = (list(action.choices), [], [c for c in WRONG_CHOICES if c not in action.choices])
    elif action.type in (int, float) and action.dest not in BY_DEST:
        good, odd, bad = INTS if action.type is int else FLOATS
        if action.dest in ZERO_OK:
            odd, bad = odd + ["0"], [v for v in bad if v != "0"]
        pools = (good, odd, bad)
    else:
        pools = BY_DEST.get(action.dest, OTHER)

    def one():
        good, odd, bad = pools
        roll = rng.random()
        drawn["n"] += 1
        forced = bad and drawn["n"] == drawn["force"]
        pool = (bad if forced or (bad and roll < wrong_rate) else
                odd if odd and roll > 0.9 else good or bad)
        value = rng.choice(pool)
        if pool is not good:
            drawn["wrong" if pool is bad else "odd"].append(f"{action.dest}={value}")
        return ws[value[1:]] if value.startswith("@") else value

    count = {"+": rng.randint(1, 3), "*": rng.randint(0, 2)}.get(action.nargs, 1)
    return [one() for _ in range(count)]


def commands(parser: argparse.ArgumentParser) -> dict[str, list[argparse.Action]]:
    """Every subcommand and the flags it shows (argparse's own help and hidden
    test flags left out)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: [a for a in p._actions if not isinstance(a, argparse._HelpAction)
                   and a.help is not argparse.SUPPRESS]
            for name, p in sub.choices.items()}


def generate(seed: int, index: int, ws: dict[str, str]) -> tuple[list[str], list[str], bool]:
    """Command line ``index`` of ``seed`` (paths point into ``ws``), the wrong
    values it holds (``dest=value``), and whether it is clean (no wrong or odd
    value: what a real launch runs)."""
    from .cli import build_parser

    rng = random.Random(f"shardwise-fuzz-cli:{seed}:{index}")
    table = commands(build_parser())
    cmd = rng.choice(sorted(table))
    # From clean command lines (what runs), and clean ones but for one value
    # (what a missing check lets through), to ones full of wrong values.
    mode = rng.choice(["clean", "clean", "one", "one", 0.05, 0.15, 0.4])
    wrong_rate = mode if isinstance(mode, float) else 0.0
    drawn = {"n": 0, "force": rng.randint(1, 8) if mode == "one" else None, "wrong": [],
             "odd": []}
    wrong = drawn["wrong"]
    argv, options = [cmd], []
    for action in table[cmd]:
        if not action.option_strings:  # a positional
            if rng.random() < 0.97:
                argv += _values(rng, action, ws, wrong_rate, drawn)
            elif action.nargs != "*":
                wrong.append(f"{action.dest} missing")
            continue
        repeats = rng.randint(1, 3) if isinstance(action, argparse._AppendAction) else 1
        given = 0
        for _ in range(repeats):
            if rng.random() < (0.97 if action.required else 0.25):
                given += 1
                options.append([rng.choice(action.option_strings),
                                *_values(rng, action, ws, wrong_rate, drawn)])
        if action.required and not given:
            wrong.append(f"{action.dest} missing")
    rng.shuffle(options)
    if rng.random() < 0.03:
        flag = rng.choice(["--bogus", "-x"])  # not a flag of any command
        options.append([flag])
        wrong.append(flag)
    return (argv + [word for option in options for word in option], wrong,
            not wrong and not drawn["odd"])


@contextlib.contextmanager
def _few_candidates():
    """The planner's candidates cut to the first of each strategy and of the
    compositions, each priced at its own micro-batch count only, with no
    search over counts (what the fuzzer checks is the command, not every
    price: a seed's baseline searched over counts is a dozen recordings).
    A first ranking's workers price the families as the planner does
    (``perf/prerecord.py``), so they record only these too."""
    from .perf import planner, reproduce

    real = planner.base_plans, planner.micro_batch_family, reproduce.micro_batch_family

    def few(*args, **kwargs):
        firsts: dict = {}
        for plan in real[0](*args, **kwargs):
            firsts.setdefault(plan.strategy, plan)
        return list(firsts.values())

    def as_given(spec, workload, base, cluster, ranks, *args, **kwargs):
        return [planner.evaluate(spec, workload, base, cluster, ranks)]

    planner.base_plans = few
    planner.micro_batch_family = reproduce.micro_batch_family = as_given
    try:
        yield
    finally:
        planner.base_plans, planner.micro_batch_family, reproduce.micro_batch_family = real


@contextlib.contextmanager
def _stub_launcher(launched: list):
    """Every launch records its job and ends the command (``_Launched``)."""
    from .runtime import launcher

    def stub(job, *args, module="shardwise.runtime.worker", **kwargs):
        launched.append((job, module))
        raise _Launched()

    real, launcher.launch = launcher.launch, stub
    try:
        yield
    finally:
        launcher.launch = real


def run_cli(argv: list[str], stub: bool = True) -> dict:
    """One command line in this process: {"status": "refused" | "ran" |
    "launched" | "failed", ...}, with what it printed."""
    from .cli import main
    from .runtime.launcher import STOP_SIGNALS

    out, err, launched = io.StringIO(), io.StringIO(), []
    handlers = {s: signal.getsignal(s) for s in STOP_SIGNALS}  # main installs its own
    limit = STUB_S if stub else REAL_S
    timed = hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()
    if timed:
        handlers[signal.SIGALRM] = signal.signal(signal.SIGALRM, _too_long)
        signal.alarm(limit)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
                (_stub_launcher(launched) if stub else contextlib.nullcontext()), \
                (_few_candidates() if stub else contextlib.nullcontext()):
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse's usage errors
                rc = e.code
            except _Launched:
                rc = None
            except _TooLong:
                return {"status": "failed", "kind": f"still running after {limit} s",
                        "error": (err.getvalue() or out.getvalue())[-3000:]}
            except BaseException as e:  # noqa: BLE001 - exactly what the fuzzer looks for
                return {"status": "failed", "kind": "traceback",
                        "error": f"{type(e).__name__}: {e}",
                        "traceback": traceback.format_exc()[-3000:]}
    finally:
        if timed:
            signal.alarm(0)
        for s, h in handlers.items():
            signal.signal(s, h)
    text = err.getvalue().strip()
    if rc in {128 + s for s in STOP_SIGNALS}:  # the fuzzer itself was sent a stop signal
        raise KeyboardInterrupt(text)
    if rc is None:
        job, module = launched[0]
        return {"status": "launched", "job": job, "module": module}
    if rc == 0:
        return {"status": "ran"}
    lines = text.splitlines()
    if rc == 2 and lines and re.match(r"^shardwise( [a-z]+)?: error: \S", lines[-1]) and (
            len(lines) == 1 or lines[0].startswith("usage:")):
        return {"status": "refused", "message": lines[-1]}
    return {"status": "failed", "kind": f"exit code {rc} without a one-line refusal",
            "error": text[-3000:] or out.getvalue()[-3000:]}


def _too_long(signum, frame):
    raise _TooLong()


# What a launch may hold to be run for real by the fuzzer: seconds on CPU.
SMALL = {"ranks": 2, "cases": 4, "params": 5e6, "tokens": 512, "decode_steps": 16,
         "iters": 10, "warmup": 5}


def _small(job, module: str) -> bool:
    if (module != "shardwise.runtime.worker" or job.device != "cpu"
            or job.nproc > SMALL["ranks"] or len(job.cases) > SMALL["cases"]):
        return False
    for c in job.cases:
        bench = c.bench or {}
        if (c.checkpoint or c.model.total_params() > SMALL["params"]
                or c.workload.batch * c.workload.seq_len > SMALL["tokens"]
                or c.workload.decode_steps > SMALL["decode_steps"]
                or bench.get("iters", 0) > SMALL["iters"]
                or bench.get("warmup", 0) > SMALL["warmup"]):
            return False
    return True


def fuzz_cli(seed: int, indices: list[int], launch: int = 0, log=print) -> dict:
    """Draw and check the command lines (launches stubbed), then run the
    first ``launch`` small launched jobs of clean command lines for real. A command line holding a
    wrong value must be refused; one that is not must run, or launch. Returns
    the summary (not yet written)."""
    import time

    t0 = time.monotonic()
    outcomes: dict[int, tuple[list[str], list[str], bool, dict]] = {}
    root = tempfile.mkdtemp(prefix="shardwise-fuzz-cli-")

    def in_case_dir(i, fn):
        """``fn(workspace, folder)`` run in the case's own folder: a default
        output path (bench's results/bench.jsonl) lands there too."""
        case_dir = os.path.join(root, str(i))
        os.makedirs(case_dir)
        here = os.getcwd()
        os.chdir(case_dir)
        try:
            return fn(_workspace(case_dir), case_dir)
        finally:
            os.chdir(here)
            shutil.rmtree(case_dir, ignore_errors=True)

    def draw_and_check(i):
        def body(ws, case_dir):
            argv, wrong, clean = generate(seed, i, ws)
            return ([a.replace(case_dir + os.sep, "") for a in argv], wrong, clean,
                    run_cli(argv))
        return in_case_dir(i, body)

    def launch_for_real(i):
        def body(ws, case_dir):
            argv, _, _ = generate(seed, i, ws)
            log(f"case {i}: running shardwise {shlex.join(argv)}")
            real = run_cli(argv, stub=False)
            return ({"status": "launched and ran"} if real["status"] == "ran" else
                    {**real, "status": "failed",
                     "kind": "launch failed: " + real.get("kind", real["status"])})
        return in_case_dir(i, body)

    # Paths on the module search path (here and in the ranks) must not depend
    # on the working directory, which each case changes.
    saved_path, saved_env = list(sys.path), os.environ.get("PYTHONPATH")
    sys.path[:] = [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
    if saved_env:
        os.environ["PYTHONPATH"] = os.pathsep.join(
            os.path.abspath(p) for p in saved_env.split(os.pathsep) if p)
    try:
        for i in indices:
            outcomes[i] = draw_and_check(i)
        chosen = [i for i, (_, _, clean, o) in outcomes.items() if clean
                  and o["status"] == "launched" and _small(o["job"], o["module"])][:launch]
        for i in chosen:
            argv, wrong, clean, _ = outcomes[i]
            outcomes[i] = (argv, wrong, clean, launch_for_real(i))
    finally:
        sys.path[:] = saved_path
        if saved_env:
            os.environ["PYTHONPATH"] = saved_env
        shutil.rmtree(root, ignore_errors=True)

    statuses: Counter = Counter()
    per_command: dict[str, Counter] = {}
    refusals: dict[str, str] = {}
    failures = []
    for i, (argv, wrong, _, o) in outcomes.items():
        if wrong and o["status"] != "refused" and o["status"] != "failed":
            o = {"status": "failed", "kind": f"{o['status']} with a wrong value",
                 "error": ", ".join(wrong)}
        statuses[o["status"]] += 1
        per_command.setdefault(argv[0], Counter())[o["status"]] += 1
        if o["status"] == "refused":
            refusals.setdefault(argv[0] + ": " + _first_words(o["message"]), shlex.join(argv))
        if o["status"] == "failed":
            failures.append({"index": i, "argv": shlex.join(argv),
                             **{k: v for k, v in o.items() if k != "status"},
                             "reproduce": f"python -m shardwise.fuzz --cli --seed {seed} "
                                          f"--only {i} --launch 1"})
    return {
        "seed": seed, "cases": len(indices), "counts": dict(sorted(statuses.items())),
        "launched_for_real": len(chosen),
        "with_a_wrong_value": sum(1 for _, wrong, _, _ in outcomes.values() if wrong),
        "by_command": {k: dict(v) for k, v in sorted(per_command.items())},
        "refusal_kinds": len(refusals),
        "refusal_examples": dict(sorted(refusals.items())),
        "elapsed_s": round(time.monotonic() - t0, 1),
        "failures": failures,
    }


def _first_words(message: str) -> str:
    """A refusal's kind: its message without the values (numbers, paths, quoted text)."""
    text = re.sub(r"^shardwise( [a-z]+)?: error: ", "", message)
    text = re.sub(r"'[^']*'|\"[^\"]*\"|/\S+|-?\d[\d.e+-]*", "_", text)
    return " ".join(text.split()[:8])
