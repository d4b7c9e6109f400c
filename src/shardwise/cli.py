"""Command line: ``shardwise run | verify | bench | generate | plan | predict | ...``.

Every command validates its plans against the model and the machine before
any process starts, and prints a one-line error naming the fix otherwise.
Results go to standard output (``--format table|json|csv|markdown``),
progress and notes to standard error. Under ``torchrun`` (several nodes) the
same commands run in-process on every rank; rank 0 prints.

Nothing here imports torch at module level: ``--help``, the listings and
the checks of flags and model names run without it.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys

from . import __version__
from .argcheck import check_args
from .output import FORMATS, emit, plural
from .presets import PRESETS
from .spec import Plan, ShardwiseError, Workload

DEFAULT_RUN_PRESET = "tiny-dense"
DEFAULT_RUN_NPROC = 4


MODEL_HELP = ("a preset (`shardwise presets`), a zoo name (llama-3.1-8b, mixtral-8x7b, ...: "
              "`shardwise models`), a Hugging Face checkpoint directory, or a config.json "
              "(its shape with synthetic weights)")


def _model_args(p: argparse.ArgumentParser, default: str | None = None,
                dtype: bool = True) -> None:
    """``--model`` (and ``--preset``, its older name) and ``--layers``: one way
    to name a model in every command (models.resolve)."""
    p.add_argument("--model", metavar="MODEL", default=None, help=MODEL_HELP +
                   (f" (default: {default})" if default else ""))
    p.add_argument("--preset", metavar="MODEL", default=None,
                   help="the same as --model (kept for presets)")
    p.set_defaults(default_model=default)
    p.add_argument("--layers", type=int, help="use only the first N layers of the model")
    if dtype:
        p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"],
                       help="override the model's dtype (CPU runs default to fp32)")


def _common(p: argparse.ArgumentParser, model_default: str | None = None,
            device_default: str = "auto", verified: bool = True) -> None:
    """The flags of the commands that launch ranks; ``verified`` (run,
    verify): --steps and --json, which bench has not (it decodes as many
    steps as it times, and writes --out)."""
    _model_args(p, model_default)
    p.add_argument("--batch", type=int,
                   help="sequences per step (default: a small workload that verifies in seconds)")
    p.add_argument("--seq", type=int, help="prompt length in tokens")
    if verified:
        p.add_argument("--steps", type=int, help="decode steps after the prompt")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=device_default,
                   help=f"cuda: NCCL, one rank per GPU; cpu: gloo; auto: cuda if present "
                        f"(default: {device_default})")
    p.add_argument("--seed", type=int, default=0, help="weight and input seed")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds a collective may wait before the job fails")
    p.add_argument("--deadline", type=float, default=None,
                   help="end the whole job after this many seconds")
    p.add_argument("--watchdog", type=float, default=None, metavar="SECONDS",
                   help="end the job when no rank makes progress for this long and name the "
                        "rank that hung (local launcher only; off by default)")
    if verified:
        p.add_argument("--json", metavar="FILE", help="append one JSON record per plan to FILE")
    p.add_argument("--inject-fault", metavar="RANK:POINT", help=argparse.SUPPRESS)


def _format(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=FORMATS, default="table",
                   help="how results print: tables fitted to the terminal (default), or JSON, "
                        "CSV or Markdown on standard output (progress goes to standard error)")


def _cluster(p: argparse.ArgumentParser, default: str | None = "h100-sxm-16",
             what: str = "") -> None:
    from .perf.clusters import available_clusters

    p.add_argument("--cluster", default=default, metavar="CLUSTER",
                   help=f"cluster profile: {', '.join(available_clusters())} (`shardwise "
                        f"clusters`), or a JSON file from `shardwise calibrate`"
                        + (f" (default: {default})" if default else "") + what)


def _static_decode(p: argparse.ArgumentParser) -> None:
    p.add_argument("--static-decode", action="store_true",
                   help="decode at a device-tensor position: the static-shape step that "
                        "bench captures in a CUDA graph (plans that support graphs; the "
                        "others decode as usual)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="shardwise",
        description="Run transformer inference partitioned across GPUs, verified against one device.",
    )
    ap.add_argument("--version", action="version", version=f"shardwise {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("run", help="run and verify every plan that fits the ranks (the main job)")
    _common(p, DEFAULT_RUN_PRESET, device_default="cpu")  # the embedded default job runs on CPU
    _static_decode(p)
    p.add_argument("--nproc", type=int, default=None,
                   help=f"ranks to start (default {DEFAULT_RUN_NPROC} on CPU, every GPU on CUDA)")
    p.add_argument("--plan", action="append", dest="plans",
                   help="plan to run (repeatable; default: every valid plan)")
    _format(p)

    p = sub.add_parser("verify", help="run one plan and the reference on the same weights")
    _common(p)
    _static_decode(p)
    p.add_argument("--plan", required=True, help="e.g. tp_pp:2x1, helix:4x4, ring:8, ep:4")
    p.add_argument("--nproc", type=int, default=None,
                   help="ranks to start (default: what the plan needs; a layerwise plan: the "
                        "fewest ranks whose layer groups fit its capacity)")
    _format(p)

    p = sub.add_parser("bench", help="time plans after checking their numerics")
    _common(p, verified=False)
    p.add_argument("--plan", action="append", dest="plans", required=True,
                   help="plan to time (repeatable); peers: torch_eager:1, torch_tp:T, torch_cp:P (prefill)")
    p.add_argument("--phase", choices=["prefill", "decode", "both"], default="both")
    p.add_argument("--iters", type=int, default=10, help="timed iterations (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed iterations first")
    p.add_argument("--no-graphs", action="store_true",
                   help="time decode steps and prompts eagerly, without CUDA graphs")
    p.add_argument("--settle", type=float, default=0.25, metavar="SECONDS",
                   help="untimed decode steps on a GPU for this long before the timed ones, "
                        "so that they run at the clocks a steady decode gets (0: none)")
    p.add_argument("--trace", metavar="DIR", default=None,
                   help="after timing, profile one more step per phase on every rank: a Chrome "
                        "trace and a table of host ops per rank in DIR, and the device-busy "
                        "share in the record (a step timed from a CUDA graph is profiled as "
                        "one more replay of it)")
    p.add_argument("--out", default="results/bench.jsonl", help="JSON lines file to append to")
    p.add_argument("--resume", action="store_true",
                   help="skip (plan, phase) records already in --out for this workload")
    p.add_argument("--nproc", type=int, default=None,
                   help="ranks for plans that adapt to any number (layerwise; default: the "
                        "most that another plan of the command takes, else the fewest its "
                        "capacity allows)")
    _format(p)

    p = sub.add_parser("generate", help="generate text (or token ids) from a checkpoint under "
                                        "one or more plans, verified against the reference")
    p.add_argument("--model", metavar="PATH", required=True,
                   help="Hugging Face checkpoint directory (its own tokenizer reads --prompt)")
    p.add_argument("--plan", action="append", dest="plans", required=True,
                   help="plan to generate under (repeatable: each runs and is verified)")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", action="append", dest="prompts", metavar="TEXT",
                        help="prompt text, tokenized by the checkpoint's tokenizer; the new "
                             "text streams to stdout (repeatable: a batch; any lengths)")
    prompt.add_argument("--prompt-ids", action="append", metavar="IDS",
                        help="comma-separated token ids, e.g. 1,15043,29892 (repeatable; no "
                             "tokenizer needed): prints the new ids")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="0 (default): greedy; > 0: sample from softmax(logits / T)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample from the fewest most likely tokens that hold this probability "
                        "(with --temperature)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (one sample per seed, "
                                                       "whatever the plan)")
    p.add_argument("--ignore-eos", action="store_true",
                   help="generate --max-new-tokens tokens even past an end-of-sequence token")
    p.add_argument("--nproc", type=int, help="ranks to start (default: what the plan needs)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--no-verify", action="store_true", help="skip the reference replay")
    p.add_argument("--json", metavar="FILE",
                   help="append one JSON record per plan: prompts, token ids, text, errors")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="seconds a collective may wait before the job fails")
    p.add_argument("--deadline", type=float, default=None,
                   help="end the whole job after this many seconds")

    p = sub.add_parser("presets", help="list the model presets")
    _format(p)
    p = sub.add_parser("models", help="list every model shardwise names: the zoo of published "
                                      "architectures and the presets")
    _format(p)
    p = sub.add_parser("clusters", help="list the cluster profiles that --cluster names")
    _format(p)

    p = sub.add_parser("predict", help="predict one plan with the cost model (no processes)")
    _model_args(p)
    p.add_argument("--plan", required=True)
    _cluster(p)
    p.add_argument("--ranks", type=int,
                   help="GPUs the plan runs on (default: as many as it needs; layerwise: the "
                        "cluster's), as plan --ranks ranked it")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--phase", choices=["prefill", "decode", "both"])
    _format(p)

    p = sub.add_parser("plan", help="rank every valid plan for a model on a cluster")
    _model_args(p)
    _cluster(p)
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--phase", choices=["prefill", "decode", "both"], default="prefill")
    p.add_argument("--top", type=int, help="show only the best N")
    p.add_argument("--ranks", type=int, help="plans using exactly this many GPUs")
    p.add_argument("--all", action="store_true",
                   help="list every candidate: plans whose figures repeat a listed one's, and "
                        "every invalid plan with its reason (by default summarised)")
    p.add_argument("--validate", action="store_true",
                   help="run the best --top (default 3) fitting plans with shardwise bench here "
                        "and print each one's measurement beside its prediction on --cluster "
                        "(use a profile calibrated on this machine)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where --validate and --run run (default: cuda if present)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations for --validate")
    p.add_argument("--out", help="append the --validate / --run records to this file")
    p.add_argument("--run", action="store_true",
                   help="run the best plan that fits here: verify it against the reference, "
                        "then benchmark it (on --device; prints the command it runs)")
    _format(p)

    p = sub.add_parser("reproduce", help="a seed's claims beside shardwise's prediction")
    p.add_argument("seed", help="preset name (seed-helix-2l) or seed document id (000..004)")
    _cluster(p)
    p.add_argument("--results", nargs="*", metavar="FILE",
                   help="results files with measured runs of the seed's preset to show")
    p.add_argument("--profile", help="profile calibrated where those results were measured "
                                     "(predictions beside them)")
    _format(p)

    p = sub.add_parser("calibrate", help="measure this machine and write a cluster profile")
    p.add_argument("--out", required=True, help="profile JSON to write")
    p.add_argument("--nproc", type=int,
                   help="ranks to measure collectives on (default: every GPU, 2 on CPU)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--quick", action="store_true", help="small sizes (a functional check)")
    p.add_argument("--name", help="profile name (default from the device)")

    p = sub.add_parser("report", help="tables and plots of results files, or prediction fidelity")
    p.add_argument("files", nargs="+", help="results JSON lines files (bench --out, run --json, "
                                            "verify --json, generate --json)")
    p.add_argument("--fidelity", action="store_true",
                   help="compare each record with the cost model's prediction")
    p.add_argument("--profile", help="cluster profile for --fidelity (calibrated on the same machine)")
    p.add_argument("--plots", metavar="DIR",
                   help="write PNG plots of the bench records to DIR (prefill.png, decode.png)")
    _format(p)

    p = sub.add_parser("partition", help="show layerwise groups for a capacity")
    _model_args(p)
    p.add_argument("--capacity", required=True,
                   help="bytes (80GB, 50MB) or L2 / HBM of --cluster (HBM*0.9: a fraction; "
                        "HBM@h100, L2@h200: a named device)")
    p.add_argument("--ranks", type=int, required=True)
    _cluster(p, what="; L2 and HBM are read from it")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    _format(p)
    return ap


# -- building cases --------------------------------------------------------

def gpu_possible() -> bool:
    """False where no GPU driver is present (Linux without NVIDIA's or AMD's
    device files): then ``auto`` means CPU without importing torch."""
    if not sys.platform.startswith("linux"):
        return True
    return any(os.path.exists(p) for p in ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd"))


def resolve_device(choice: str) -> str:
    if choice == "cpu" or (choice == "auto" and not gpu_possible()):
        return "cpu"
    import torch

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise ShardwiseError("--device cuda but no CUDA GPU is visible; use --device cpu")
    return choice


CPU_RANKS_PER_CORE = 8


def check_ranks(nproc: int, device: str) -> None:
    if nproc < 1:
        raise ShardwiseError(f"--nproc must be >= 1 (got {nproc})")
    if device == "cuda":
        import torch

        n = torch.cuda.device_count()
        if nproc > n:
            raise ShardwiseError(
                f"the job needs {plural(nproc, 'rank')} but this machine has "
                f"{plural(n, 'GPU')}; use a plan of at most {plural(n, 'rank')}, or --device cpu "
                f"for a functional check"
            )
    else:
        # CPU ranks share the host's cores: a few per core only slows the job
        # (_cpu_note says so at launch), far more spends the memory and the
        # minutes of the whole machine.
        cores = _cores()
        most = max(CPU_RANKS_PER_CORE * cores, 16)
        if nproc > most:
            raise ShardwiseError(
                f"--nproc {nproc} CPU ranks on {cores} core(s) is more than {most}; use a plan of "
                f"at most {most} ranks (--nproc {most} or fewer)")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _cpu_note(job) -> None:
    """At launch, after every check (a refusal stays one line): CPU ranks
    beyond the cores share them."""
    if job.device == "cpu" and job.nproc > _cores():
        print(f"note: {job.nproc} CPU ranks share {_cores()} core(s); each step is slower, the "
              f"answer is the same", file=sys.stderr)


def check_fits(model, wl, plans, world: int, device: str, verify: bool = True) -> None:
    """Refuse, before launch, a run that cannot fit the devices at hand (perf/fits.py)."""
    from .perf.fits import check_fits as fits

    fits(model, wl, plans, world, device, verify)


def model_ref(args, device: str | None = None):
    """The model ``--model`` / ``--preset`` name (models.resolve), with
    ``--layers`` and ``--dtype``; on CPU the dtype defaults to fp32 (CPU
    half-precision matmuls are slow and not what GPUs do)."""
    from .models import resolve_args

    name = args.model or (None if args.preset else getattr(args, "default_model", None))
    dtype = getattr(args, "dtype", None)
    ref = resolve_args(args.preset, name, layers=args.layers, dtype=dtype)
    if dtype is None and device == "cpu" and ref.spec.dtype != "fp32":
        ref = resolve_args(args.preset, name, layers=args.layers, dtype="fp32")
    return ref


def make_case_parts(args, device: str):
    """(model reference, model spec, workload) from --model / --preset and the
    workload flags. A checkpoint is fully checked here, before any launch."""
    ref = model_ref(args, device)
    wl = _workload(args, ref.check_workload)
    if ref.checkpoint is not None:
        from .model.checkpoint import checkpoint_spec

        checkpoint_spec(ref.checkpoint, wl, dtype=ref.spec.dtype, spec=ref.spec)
    return ref, ref.spec, wl


def make_case(ref, model, wl, plan: str, args, **kw):
    """A :class:`Case` of the model ``ref`` names (its weights: the checkpoint
    or the seed's synthetic ones)."""
    from .runtime.job import Case

    return Case(model, wl, plan, seed=args.seed, preset=ref.preset and ref.name,
                checkpoint=ref.checkpoint, source=ref.source, **kw)


def _workload(args, default: Workload) -> Workload:
    """The default workload with the flags given (0 is refused, not ignored)."""
    pick = lambda flag, d: d if flag is None else flag  # noqa: E731
    return Workload(batch=pick(args.batch, default.batch), seq_len=pick(args.seq, default.seq_len),
                    decode_steps=pick(getattr(args, "steps", None), default.decode_steps))


def _progress(total: int, what: str = ""):
    """The live display of a command's jobs (their ``total`` cases), or
    nothing under torchrun (each rank runs its part in-process)."""
    import contextlib

    if "TORCHELASTIC_RUN_ID" in os.environ:
        return contextlib.nullcontext()
    from .runtime.progress import Display

    return Display(total, what)


@contextlib.contextmanager
def _plan_progress():
    """A progress bar on standard error while the planner prices its
    candidates (recording each one's ranks takes most of a first ranking:
    seconds to minutes), where standard error is a terminal; else nothing."""
    if not sys.stderr.isatty() or os.environ.get("TERM") == "dumb":
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
        TimeElapsedColumn

    with Progress(TextColumn("ranking plans"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.description}"),
                  console=Console(file=sys.stderr), transient=True) as bar:
        task = bar.add_task("", total=None)

        def on_plan(done: int, total: int, plan: str) -> None:
            bar.update(task, completed=done, total=total, description=plan)

        yield on_plan


def _run_job(job, args, show=None):
    """Launch locally (``show``: the progress display), or run in-process
    when started by torchrun."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        from .runtime.worker import run_job

        return run_job(job)
    from .runtime.launcher import launch

    _cpu_note(job)
    return launch(job, deadline_s=args.deadline, on_progress=show)


def _keep_finished(args, e, device: str, nproc: int) -> None:
    """run and verify: the cases that finished before a failure, a deadline
    or a stop signal, printed and (with --json) saved."""
    if not e.results:
        return
    from .report import run_sheet

    emit([run_sheet(e.results)], args.format)
    if args.json:
        _save(args, e.results, device, nproc)
        e.saved = f"the {len(e.results)} finished case(s) above were appended to {args.json}"
    else:
        e.saved = f"the {len(e.results)} finished case(s) are printed above (--json FILE keeps them)"


# -- commands ----------------------------------------------------------------

def check_peer(cls, plan, device: str, phase: str | None = None) -> None:
    """Refuse, before launch, a peer where it cannot run: ``phase`` None
    means verify/run (prefill and decode)."""
    if getattr(cls, "needs_cuda", False) and device != "cuda":
        raise ShardwiseError(f"{plan} needs CUDA GPUs (--device cuda)")
    if getattr(cls, "prefill_only", False) and phase != "prefill":
        raise ShardwiseError(f"{plan} times prefill only; run it with shardwise bench --phase prefill")


def cmd_verify(args) -> int:
    from .runtime.job import Job
    from .runtime.launcher import LaunchError

    device = resolve_device(args.device)
    ref, model, wl = make_case_parts(args, device)
    plan = Plan.parse(args.plan)
    from .parallel.registry import check_plan  # no torch: a refusal does not wait for it

    cls, topo = check_plan(model, wl, plan, args.nproc)
    check_peer(cls, plan, device)
    nproc = topo.world_size
    check_ranks(nproc, device)
    check_fits(model, wl, [str(plan)], nproc, device)
    job = Job([make_case(ref, model, wl, str(plan), args)], nproc, device,
              timeout_s=args.timeout, fault=args.inject_fault, watchdog_s=args.watchdog,
              static_decode=args.static_decode)
    try:
        with _progress(len(job.cases), "verify") as show:
            results = _run_job(job, args, show)
    except LaunchError as e:
        _keep_finished(args, e, device, nproc)
        raise
    if not results:
        return 0  # a non-zero torchrun rank
    from .report import verify_parts

    emit(verify_parts(results[0]), args.format)
    _save(args, results, device, nproc)
    return 0 if results[0]["ok"] else 1


def cmd_run(args) -> int:
    from .runtime.job import Job
    from .runtime.launcher import LaunchError

    device = resolve_device(args.device)
    if args.nproc is None:
        if device == "cuda":
            import torch

            args.nproc = torch.cuda.device_count()
        else:
            args.nproc = DEFAULT_RUN_NPROC
    check_ranks(args.nproc, device)
    ref, model, wl = make_case_parts(args, device)
    from .parallel.plans import PLANS
    from .parallel.registry import check_plan

    if args.plans:
        plans = [str(Plan.parse(p)) for p in args.plans]
        for p in plans:
            check_peer(check_plan(model, wl, p, args.nproc)[0], p, device)
    else:
        plans = []
        for rules in PLANS.values():
            for cand in rules.candidates(model, wl, args.nproc):
                try:
                    check_plan(model, wl, cand, args.nproc)
                    plans.append(cand)
                except ShardwiseError:
                    pass
        if not plans:
            raise ShardwiseError(f"no plan fits {model.name} on {plural(args.nproc, 'rank')}; "
                                 f"try --nproc 2")
    check_fits(model, wl, plans, args.nproc, device)
    job = Job([make_case(ref, model, wl, p, args) for p in plans],
              args.nproc, device, timeout_s=args.timeout, fault=args.inject_fault,
              watchdog_s=args.watchdog, static_decode=args.static_decode)
    try:
        with _progress(len(job.cases), "run") as show:
            results = _run_job(job, args, show)
    except LaunchError as e:
        _keep_finished(args, e, device, args.nproc)
        raise
    if not results:
        return 0
    from .report import run_sheet

    emit([run_sheet(results)], args.format)
    _save(args, results, device, args.nproc)
    return 0 if all(r["ok"] for r in results) else 1


def cmd_bench(args, notes: list[str] | None = None) -> int:
    """``notes``: lines of a calling command (plan --run, --validate) that
    print with bench's own once every check has passed."""
    from .runtime.job import Job
    from .runtime.launcher import LaunchError

    device = resolve_device(args.device)
    ref, model, wl = make_case_parts(args, device)
    plans = [Plan.parse(text) for text in args.plans]
    from .bench.records import append_records, provenance, read_records
    from .parallel.registry import check_plan, plan_rules
    from .runtime.timing import BenchSettings

    settings = BenchSettings(phase=args.phase, iters=args.iters, warmup=args.warmup,
                             graphs=not args.no_graphs, trace=args.trace, settle_s=args.settle)
    timed = wl.replace(decode_steps=settings.decode_positions)
    small = ref.check_workload
    check = small.replace(batch=min(small.batch, timed.batch),
                          seq_len=min(small.seq_len, timed.seq_len))
    done = set()
    if args.resume and os.path.exists(args.out):
        from .bench.records import record_spec

        done = {(r["plan"], r["phase"]) for r in read_records(args.out)
                if (r.get("batch"), r.get("seq_len")) == (timed.batch, timed.seq_len)
                and record_spec(r) == model}
    by_world: dict[int, list[str]] = {}
    checks: dict[str, Workload] = {}
    notes = list(notes or [])  # printed once every check has passed: a refusal is one line
    adaptive = _adaptive_world(plans, args.nproc, notes)
    for plan in plans:
        fixed = plan_rules(plan.strategy).ranks_needed(plan)
        cls, topo = check_plan(model, timed, plan, fixed or adaptive)
        # The check runs the plan's own micro-batching, so it needs as many sequences.
        checks[str(plan)] = check.replace(batch=min(timed.batch, max(check.batch,
                                                                     plan.micro_batches)))
        check_peer(cls, plan, device, args.phase)
        if getattr(cls, "prefill_only", False):
            checks[str(plan)] = checks[str(plan)].replace(decode_steps=0, phase="prefill")
        check_plan(model, checks[str(plan)], plan, topo.world_size)
        phases = ["prefill", "decode"] if args.phase == "both" else [args.phase]
        if all((str(plan), ph) in done for ph in phases):
            notes.append(f"skipping {plan}: already in {args.out}")
            continue
        check_ranks(topo.world_size, device)
        by_world.setdefault(topo.world_size, []).append(str(plan))
    for world, plans in by_world.items():
        check_fits(model, timed, plans, world, device, verify=False)
        for p in plans:  # each verified on its own check workload, one after another
            check_fits(model, checks[p], [p], world, device)
    for note in notes:
        print(note, file=sys.stderr)

    def records_of(results: list[dict], world: int) -> list[dict]:
        """The bench records of a job's results, each with its numerics check; a
        phase already in the file (--resume of a plan timed in one phase) is not
        written again."""
        errs = {r["plan"]: r["max_rel_err"] for r in results if "max_rel_err" in r}
        oks = {r["plan"]: r["ok"] for r in results if "ok" in r}
        flips = {r["plan"]: r["max_rel_err_without_flips"] for r in results
                 if "max_rel_err_without_flips" in r}
        prov = provenance(device, world)
        return [{**prov, **r, "max_rel_err": errs.get(r["plan"]),
                 "numerics_ok": oks.get(r["plan"]),
                 **({"max_rel_err_without_flips": flips[r["plan"]]} if r["plan"] in flips
                    else {}),
                 "check_workload": [checks[r["plan"]].batch, check.seq_len, check.decode_steps]}
                for r in results if "phase" in r and (r["plan"], r["phase"]) not in done]

    # PyTorch's profiler (--trace) logs its start and stop at kineto's highest
    # level (USDT, above ERROR): only the level past it keeps the ranks quiet.
    quiet = {"KINETO_LOG_LEVEL": os.environ.get("KINETO_LOG_LEVEL", "6")} if args.trace else {}
    records = []
    total = sum(2 * len(p) for p in by_world.values())
    try:
        with _progress(total, "bench") as show:
            for world, plans in sorted(by_world.items()):
                cases = [make_case(ref, model, checks[p], p, args) for p in plans]
                cases += [make_case(ref, model, timed, p, args, verify=False,
                                    bench=vars(settings)) for p in plans]
                job = Job(cases, world, device, timeout_s=args.timeout, warmup=1,
                          fault=args.inject_fault, watchdog_s=args.watchdog, env=quiet)
                try:
                    results = _run_job(job, args, show)
                except LaunchError as e:  # keep the phases timed before it ended
                    new = records_of(e.results, world)
                    if new:
                        append_records(args.out, new)
                    records += new
                    raise
                if not results:
                    continue  # a non-zero torchrun rank
                new = records_of(results, world)
                append_records(args.out, new)  # per world size: an interrupted sweep keeps these
                records += new
    except LaunchError as e:
        if records:
            _print_bench(args, records)
        e.saved = (f"{len(records)} record(s) of this run were appended to {args.out}; "
                   f"--resume skips them")
        raise
    if records:
        _print_bench(args, records)
        print(f"appended {len(records)} record(s) to {args.out}", file=sys.stderr)
    bad = [r["plan"] for r in records if not r.get("numerics_ok")]
    if bad:
        print(f"shardwise: numerics check failed for {', '.join(sorted(set(bad)))}",
              file=sys.stderr)
        return 1
    return 0


def _print_bench(args, records: list[dict]) -> None:
    from .report import bench_sheet

    emit([bench_sheet(records)], args.format)


def _adaptive_world(plans: list[Plan], nproc: int | None,
                    notes: list[str] | None = None) -> int | None:
    """Ranks for the plans of one bench that adapt to any number (layerwise):
    ``--nproc`` when given, else the most that a fixed plan of the same
    command takes (so ``--plan tp_pp:2x1 --plan layerwise:cap=HBM`` compares
    them on the same GPUs); None when neither says (each then runs on the
    ranks it needs: check_plan). Fixed plans always take their own ranks.
    ``notes`` gets the line that says so."""
    from .parallel.registry import plan_rules

    sizes = [plan_rules(p.strategy).ranks_needed(p) for p in plans]
    if nproc is not None or None not in sizes:
        return nproc
    world = max((n for n in sizes if n is not None), default=None)
    if world is not None:
        names = ", ".join(str(p) for p, n in zip(plans, sizes) if n is None)
        if notes is not None:
            notes.append(f"{names}: {plural(world, 'rank')}, the most another plan here takes "
                         f"(--nproc sets it)")
    return world


def _save(args, results, device, nproc) -> None:
    if not args.json:
        return
    from .bench.records import append_records, provenance

    prov = provenance(device, nproc)
    append_records(args.json, [{**prov, **r} for r in results])
    print(f"wrote {len(results)} record(s) to {args.json}", file=sys.stderr)


def cmd_generate(args) -> int:
    from .runtime.generate import (Printer, check_sampling, continuation, eos_token_ids,
                                   generation_jobs, load_tokenizer, merge_records)
    from .runtime.launcher import launch

    device = resolve_device(args.device)
    path = os.path.abspath(args.model)
    if args.max_new_tokens < 1:
        raise ShardwiseError("--max-new-tokens must be >= 1")
    check_sampling(args.temperature, args.top_p)
    tokenizer = None
    if args.prompts is not None:
        tokenizer = load_tokenizer(path)
        ids = [tokenizer(text).input_ids for text in args.prompts]
        empty = [i for i, row in enumerate(ids) if not row]
        if empty:
            raise ShardwiseError(f"--prompt {args.prompts[empty[0]]!r} has no tokens; give text")
    else:
        ids = []
        for text in args.prompt_ids:
            try:
                ids.append([int(t) for t in text.replace(" ", "").split(",") if t])
            except ValueError:
                raise ShardwiseError(f"--prompt-ids must be comma-separated integers "
                                     f"(got {text!r})") from None
            if not ids[-1]:
                raise ShardwiseError("--prompt-ids is empty; give at least one token id")
    jobs = generation_jobs(
        path, args.plans, ids, args.max_new_tokens, args.nproc, device,
        dtype=args.dtype or ("fp32" if device == "cpu" else None), verify=not args.no_verify,
        timeout_s=args.timeout, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        eos_ids=() if args.ignore_eos else eos_token_ids(path, tokenizer),
        stream=tokenizer is not None)
    for job in jobs:
        check_ranks(job.nproc, device)
    records = []
    for job in jobs:
        if "TORCHELASTIC_RUN_ID" in os.environ:  # this process is a rank; rank 0 prints
            rank_records = _run_job(job, args)
        else:  # the ranks send their tokens here as they come, and the text is printed here
            _cpu_note(job)
            rank_records = launch(job, deadline_s=args.deadline,
                                  on_stream=Printer(tokenizer) if tokenizer else None)
        if not rank_records:
            return 0  # a non-zero torchrun rank
        records += merge_records(rank_records)
    if tokenizer is not None:
        for r in records:
            r["prompts"] = args.prompts
            r["text"] = [continuation(tokenizer, p, t)
                         for p, t in zip(r["prompt_ids"], r["tokens"])]
    for r in records:
        if tokenizer is None:  # the new ids are the output
            for row in r["tokens"]:
                print(",".join(map(str, row)))
        check = (f"max relative error {r['max_rel_err']:.2e} vs the reference "
                 f"({'ok' if r['ok'] else 'FAILED'})" if "ok" in r else "not verified")
        steps = sum(len(t) for t in r["tokens"])
        print(f"{r['plan']}: {steps} new token(s) for {len(r['tokens'])} prompt(s); {check}",
              file=sys.stderr)
    if args.json:
        from .bench.records import append_records, provenance

        append_records(args.json, [{**provenance(device, r["world_size"]), **r} for r in records])
        print(f"wrote {len(records)} record(s) to {args.json}", file=sys.stderr)
    return 0 if all(r.get("ok", True) for r in records) else 1


def cmd_presets(args) -> int:
    from .report import presets_sheet

    emit([presets_sheet(PRESETS)], args.format)
    return 0


def cmd_models(args) -> int:
    from .report import models_sheet

    emit([models_sheet()], args.format)
    return 0


def cmd_clusters(args) -> int:
    from .perf.clusters import clusters_sheet

    emit([clusters_sheet()], args.format)
    return 0


def cmd_partition(args) -> int:
    from .perf.planner import partition_parts

    emit(partition_parts(model_ref(args), args.capacity, args.ranks, args.batch, args.seq,
                         cluster=args.cluster), args.format)
    return 0


def cmd_predict(args) -> int:
    from .perf.planner import predict_parts

    emit(predict_parts(model_ref(args), args.plan, args.cluster, args.batch, args.seq,
                       args.phase, args.ranks), args.format)
    return 0


def cmd_plan(args) -> int:
    from .perf.planner import plan_parts, ranking

    ref = model_ref(args)
    steps = None
    if args.validate or args.run:  # ranked for the cache the benchmark allocates
        from .runtime.timing import BenchSettings

        steps = BenchSettings(iters=args.iters).decode_positions
    with _plan_progress() as on_plan:
        rk = ranking(ref, args.cluster, args.batch, args.seq, args.phase, args.ranks, steps,
                     on_plan=on_plan)
    parts = plan_parts(rk, args.top, args.all)
    best = rk.best(1)
    if best:
        parts.append(f"run the best plan: {_run_command(args, ref, rk, best[0])[1]}")
    emit(parts, args.format)
    if args.validate:
        return validate_plans(args, ref, rk)
    return run_best_plan(args, ref, rk) if args.run else 0


def _bench_argv(args, ref, spec, wl, plans: list[str], ranks: int,
                out: str | None = None) -> list[str]:
    """``shardwise bench`` arguments that time ``plans`` on the model and
    workload the planner ranked them for (``out`` None: bench's default file)."""
    argv = ["bench", "--model", ref.name, "--batch", str(wl.batch), "--seq", str(wl.seq_len),
            "--dtype", spec.dtype, "--phase", args.phase, "--iters", str(args.iters),
            "--nproc", str(ranks)]
    if args.device != "auto":
        argv += ["--device", args.device]
    if out:
        argv += ["--out", out]
    if args.layers:
        argv += ["--layers", str(args.layers)]
    for p in plans:
        argv += ["--plan", p]
    return argv


def _run_command(args, ref, rk, plan: str) -> tuple[list[str], str, int]:
    """(bench argv, the command line that runs it, ranks) for ``plan`` of
    the ranking ``rk``: ``shardwise bench ...``, under torchrun across the
    cluster's nodes where it needs more GPUs than one node has."""
    from .parallel.registry import plan_rules

    p = Plan.parse(plan)
    ranks = plan_rules(p.strategy).ranks_needed(p) or rk.ranks
    argv = _bench_argv(args, ref, rk.spec, rk.workload, [plan], ranks, args.out)
    per_node = rk.cluster.gpus_per_node
    if ranks <= per_node:
        return argv, "shardwise " + " ".join(argv), ranks
    nodes = -(-ranks // per_node)
    return argv, (f"torchrun --nnodes {nodes} --nproc-per-node {ranks // nodes} -m shardwise "
                  + " ".join(argv)), ranks


def _ranks_here(device: str) -> int | None:
    """How many ranks a job can start here: torchrun's world, or every GPU;
    None on CPU (any number of gloo ranks)."""
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if device == "cuda":
        import torch

        return torch.cuda.device_count()
    return None


def run_best_plan(args, ref, rk) -> int:
    """``plan --run``: verify and benchmark the best plan of the table that
    fits on ``--cluster``, here; or, where it needs more devices than this
    machine has, say so and print the command that runs it on the cluster."""
    best = rk.best(1)
    if not best:
        raise ShardwiseError(f"no plan fits {rk.spec.name} on {rk.cluster.name}: nothing to "
                             f"run; try --layers, a smaller --batch/--seq or a larger --cluster")
    argv, command, ranks = _run_command(args, ref, rk, best[0])
    if not args.out:
        argv += ["--out", "results/bench.jsonl"]
    device = resolve_device(args.device)
    here = _ranks_here(device)
    if here is not None and ranks > here:
        raise ShardwiseError(
            f"the best plan, {best[0]}, needs {ranks} GPUs and this machine has {here}; on the "
            f"cluster run: {command}; or rank the plans for the GPUs here: shardwise plan "
            f"--model {ref.name}{f' --layers {args.layers}' if args.layers else ''} --ranks "
            f"{here} --cluster PROFILE --run (PROFILE from shardwise calibrate)")
    return cmd_bench(build_parser().parse_args(argv + ["--format", args.format]),
                     [f"running the best plan: shardwise {' '.join(argv)}"])


def validate_plans(args, ref, rk) -> int:
    """``plan --validate``: time the best fitting plans of the table (the
    first --top, default 3) with ``bench`` on this machine, then compare each
    record with its prediction on ``--cluster``. The records are kept in
    ``--out`` when it is given (else in a file removed afterwards)."""
    import tempfile

    from .perf.reproduce import fidelity_parts

    plans = rk.best(args.top or 3)
    if not plans:
        raise ShardwiseError("no plan fits on the cluster: nothing to validate")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or os.path.join(tmp, "validate.jsonl")
        before = _count_lines(out)
        argv = _bench_argv(args, ref, rk.spec, rk.workload, plans, rk.ranks, args.out)
        kept = "" if args.out else " (its records are compared, not kept: --out FILE keeps them)"
        rc = cmd_bench(build_parser().parse_args(argv + ["--out", out, "--format", args.format]),
                       [f"validating {', '.join(plans)}: shardwise {' '.join(argv)}{kept}"])
        if _count_lines(out) == before:
            return rc or 1
        fresh = os.path.join(tmp, "fresh.jsonl")
        with open(out) as f, open(fresh, "w") as g:
            g.writelines(f.readlines()[before:])
        emit(fidelity_parts([fresh], args.cluster), args.format)
    return rc


def _count_lines(path: str) -> int:
    try:
        with open(path) as f:
            return sum(1 for line in f if line.strip())
    except OSError:
        return 0


def cmd_reproduce(args) -> int:
    from .perf.reproduce import reproduce_parts

    emit(reproduce_parts(args.seed, args.cluster, args.results, args.profile), args.format)
    return 0


def cmd_calibrate(args) -> int:
    from .perf.calibrate import calibrate_command

    with _progress(0, "calibrate") as show:
        text = calibrate_command(args.out, args.nproc, args.device, args.quick, args.name,
                                 on_progress=show)
    print(text, end="")
    return 0


def cmd_report(args) -> int:
    if args.fidelity:
        if not args.profile:
            raise ShardwiseError("--fidelity needs --profile (a profile calibrated on the "
                                 "machine that produced the results)")
        from .perf.reproduce import fidelity_parts

        emit(fidelity_parts(args.files, args.profile), args.format)
        return 0
    from .report import plot_records, read_all, report_parts

    emit(report_parts(args.files), args.format)
    if args.plots:
        for path in plot_records(read_all(args.files), args.plots):
            print(f"wrote {path}", file=sys.stderr)
    return 0


# The commands that price plans on the cost model (and run no model here).
PRICING = ("predict", "plan", "reproduce", "report")
COMMANDS = {"predict": cmd_predict, "plan": cmd_plan, "reproduce": cmd_reproduce,
            "calibrate": cmd_calibrate, "report": cmd_report,
            "run": cmd_run, "generate": cmd_generate, "verify": cmd_verify, "bench": cmd_bench,
            "presets": cmd_presets, "models": cmd_models, "clusters": cmd_clusters,
            "partition": cmd_partition}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # --help and usage errors end here, before any import
    from .runtime.launcher import LaunchError, raise_on_stop_signals

    if "TORCHELASTIC_RUN_ID" not in os.environ:  # under torchrun, torchrun's handling rules
        raise_on_stop_signals()
    try:
        check_args(args)
        if args.cmd in PRICING:
            from .perf import prerecord

            # Pricing records plans where the cache lacks them, on one thread
            # (prerecord.RECORD_THREADS); torch is loaded only to record.
            prerecord.RECORD_THREADS = 1
        return COMMANDS[args.cmd](args)
    except ShardwiseError as e:
        print(f"shardwise: error: {e}", file=sys.stderr)
        return 2
    except LaunchError as e:  # a failed rank or a stop signal: reported, not re-raised
        print(f"shardwise: {e}", file=sys.stderr)
        if e.saved:
            print(f"shardwise: {e.saved}", file=sys.stderr)
        return 128 + e.signum if e.signum else 1
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"shardwise: interrupted by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
