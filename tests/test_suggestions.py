"""Every suggestion of a pre-launch refusal is accepted when followed.

A refusal names its fix in a few forms: values of a degree (``choose tp among
[1, 2, 4]``), a flag and its value (``(--nproc 4)``, ``use --layers 4``,
``use --device cpu``), a plan or an option (``cap=1.04MB with --nproc 2``,
``remove mb=2``, ``e.g. helix:1x4``), a flag to leave out. ``suggestions``
reads every one of them from a message; each is applied to what was refused
and the result must pass every check before launch (the launcher is stubbed:
it records the job and ends the command there, no process starts).

Two sources of refusals: command lines wrong in one way each, one per kind
of fix the CLI gives, which must then be accepted outright; and the input
fuzzer's random models, plans and world sizes (shardwise/fuzz.py), which may
be wrong in several ways at once: there, following a suggestion must at
least remove the refusal's reason (the case is accepted, or refused for
another reason that the suggestion did not address).
"""
import dataclasses
import json
import os
import re
from collections import Counter
from importlib import resources

import pytest

from shardwise import fuzz, fuzz_cli
from shardwise.parallel.registry import get_strategy
from shardwise.spec import Plan, ShardwiseError


@dataclasses.dataclass
class Fix:
    kind: str  # which form of suggestion (coverage is checked)
    plan: str | None = None  # the plan to use instead, if it changes
    flags: dict = dataclasses.field(default_factory=dict)  # flag -> value, None: leave it out
    own_ranks: bool = False  # the new plan runs on the ranks it implies (drop --nproc)


def _with_options(plan: Plan, **options) -> str:
    opts = dict(plan.options)
    for k, v in options.items():
        if k == "mb":
            plan = dataclasses.replace(plan, micro_batches=int(v))
        elif v is None:
            opts.pop(k, None)
        else:
            opts[k] = v
    return str(dataclasses.replace(plan, options=tuple(opts.items())))


def _set_degree(plan: Plan, name: str, value: int) -> str:
    """``plan`` with its degree ``name`` (tp, pp, N, M, ep, ring...) set to ``value``; in
    a composition, in the dimension that has it."""
    def named(p: Plan) -> tuple[str, ...]:
        return ("N", "M") if p.strategy == "helix" else (p.strategy,)

    def with_value(p: Plan, names: tuple[str, ...]) -> Plan:
        i = names.index(name)
        return dataclasses.replace(p, shape=p.shape[:i] + (value,) + p.shape[i + 1:])

    if not plan.is_composed:
        return str(with_value(plan, get_strategy(plan.strategy).degree_names))
    k = next(k for k, p in enumerate(plan.parts) if name in named(p))
    parts = list(plan.parts)
    parts[k] = with_value(parts[k], named(parts[k]))
    return str(dataclasses.replace(plan, parts=tuple(parts)))


def _plan_fixes(fix: str, plan_text: str | None) -> list[Fix]:
    try:
        plan = Plan.parse(plan_text) if plan_text else None
    except ShardwiseError:
        plan = None
    out = []
    m = re.search(r"choose (\w+) among \[([\d, ]*)\]", fix)
    if m and plan:
        assert m.group(2), f"an empty list of values: {fix}"
        out += [Fix("degree", _set_degree(plan, m.group(1), v), own_ranks=True)
                for v in map(int, m.group(2).split(", "))]
    m = re.search(r"\(cap=([^ )]+)(?: with (--nproc) (\d+))?\)", fix)
    if m and plan:
        out.append(Fix("capacity", _with_options(plan, cap=m.group(1)),
                       {m.group(2): m.group(3)} if m.group(2) else {}))
    if re.search(r"(?:remove|drop) mb=", fix) and plan:
        out.append(Fix("no micro-batches", _with_options(plan, mb=1)))
    m = re.search(r"use mb <= (\d+)", fix)
    if m and plan:
        out.append(Fix("micro-batches", _with_options(plan, mb=m.group(1))))
    m = re.search(r"use pp <= (\d+)", fix)
    if m and plan:
        out.append(Fix("stages", _set_degree(plan, "pp", int(m.group(1))), own_ranks=True))
    m = re.search(r"write (\w+:\d+)\b", fix)
    if m:
        out.append(Fix("plan", m.group(1), own_ranks=True))
    m = re.search(r"write (\w+)=(\w+) or \1=(\w+)", fix)
    if m and plan:
        out += [Fix("option", _with_options(plan, **{m.group(1): v})) for v in m.group(2, 3)]
    m = re.search(r", e\.g\. ([a-z_]+:\S+(?:, [a-z_]+:\S+)*)$", fix)
    if m:
        out += [Fix("near plans", p, own_ranks=True) for p in m.group(1).split(", ")]
    m = re.search(r"give bytes \(e\.g\. (\w+)\) or name the device \((\S+), (\S+)\)", fix)
    if m and plan:
        out += [Fix("capacity", _with_options(plan, cap=c)) for c in m.group(1, 2, 3)]
    return out


def suggestions(message: str, plan_text: str | None = None) -> list[Fix]:
    """Every suggestion of ``message`` (one refusal), as edits to the command
    line or case refused; ``plan_text``: the plan it was about."""
    fix = message.split("; ", 1)[1] if "; " in message else message
    out = _plan_fixes(fix, plan_text)
    for m in re.finditer(r"\((--[a-z-]+) ([^\s)]+)\)", fix):  # start 4 ranks (--nproc 4)
        out.append(Fix("flag", flags={m.group(1): m.group(2)}))
    for m in re.finditer(r"(?:use|give|try) (--[a-z-]+) ([^\s,;)]+)", fix):
        out.append(Fix("flag", flags={m.group(1): m.group(2)}))
    m = re.search(r"use seq_len >= (\d+)", fix)
    if m:
        out.append(Fix("flag", flags={"--seq": m.group(1)}))
    m = re.match(r"(--[a-z-]+) .*; leave it out", message)
    if m:
        out.append(Fix("leave out", flags={m.group(1): None}))
    m = re.match(r"(--[a-z-]+) \S+ is a directory; give a file in it, e\.g\. (\S+)$", message)
    if m:
        out.append(Fix("flag", flags={m.group(1): m.group(2)}))
    return out


# -- command lines ---------------------------------------------------------------

def _apply(argv: list[str], fix: Fix) -> list[str]:
    argv = list(argv)
    flags = dict(fix.flags)
    if fix.plan is not None:
        flags["--plan"] = fix.plan
        if fix.own_ranks and "--nproc" not in flags:
            flags["--nproc"] = None
    for flag, value in flags.items():
        if flag in argv:
            i = argv.index(flag)
            del argv[i:i + 2]
        if value is not None:
            argv += [flag, value]
    return argv


# Command lines wrong in one way, one for each kind of fix the checks give
# (on this machine: CPU only, so not the fixes that need a GPU).
REFUSED = {
    "a degree the heads cannot be split by":
        ["verify", "--model", "tiny-dense", "--plan", "tp_pp:3x1"],
    "experts not divisible by ep": ["verify", "--model", "tiny-moe", "--plan", "ep:3"],
    "head-dim slices": ["verify", "--model", "tiny-dense", "--plan", "helix:1x3"],
    "degrees for other ranks": ["verify", "--model", "tiny-dense", "--plan", "tp_pp:2x2",
                                "--nproc", "2"],
    "more stages than layers": ["verify", "--model", "tiny-dense", "--plan", "tp_pp:1x8"],
    "more micro-batches than sequences": ["verify", "--model", "tiny-dense", "--plan",
                                          "tp_pp:1x2,mb=8", "--batch", "4"],
    "micro-batches where there is no pipeline": ["verify", "--model", "tiny-dense", "--plan",
                                                 "helix:2x1,mb=2"],
    "ring with two degrees": ["verify", "--model", "tiny-dense", "--plan", "ring:2x2"],
    "an unknown option value": ["verify", "--model", "tiny-dense", "--plan",
                                "helix:2x1,reduce=tree"],
    "a layer larger than the capacity": ["verify", "--model", "tiny-dense", "--plan",
                                         "layerwise:cap=100KB", "--nproc", "3"],
    "a capacity that fits no partition": ["verify", "--model", "tiny-dense", "--plan",
                                          "layerwise:cap=1MB", "--nproc", "3"],
    "a capacity that leaves ranks idle": ["verify", "--model", "tiny-dense", "--plan",
                                          "layerwise:cap=1.04MB", "--nproc", "3"],
    "a capacity read from a GPU": ["verify", "--model", "tiny-dense", "--plan",
                                   "layerwise:cap=HBM"],
    "more layers than the model": ["verify", "--model", "tiny-dense", "--layers", "9",
                                   "--plan", "tp_pp:2x1"],
    "a model too large for this machine": ["verify", "--model", "seed-layerwise-30b",
                                           "--plan", "tp_pp:1x1", "--device", "cpu"],
    "a GPU that is not here": ["verify", "--model", "tiny-dense", "--plan", "tp_pp:2x1",
                               "--device", "cuda"],
    "a count of 0": ["run", "--nproc", "0"],
    "a prompt of 0 tokens": ["bench", "--model", "tiny-dense", "--plan", "tp_pp:2x1",
                             "--seq", "0"],
    "a deadline that is not a number": ["verify", "--model", "tiny-dense", "--plan",
                                        "tp_pp:2x1", "--deadline", "nan"],
    "an output that is a directory": ["verify", "--model", "tiny-dense", "--plan", "tp_pp:2x1",
                                      "--json", "adir"],
    "a partition that does not fit": ["partition", "--model", "seed-layerwise-30b",
                                      "--capacity", "20GB", "--ranks", "16"],
    "a cluster without the model's dtype": ["predict", "--model", "tiny-dense", "--plan",
                                            "tp_pp:2x1", "--cluster", "bf16-only.json",
                                            "--dtype", "fp16"],
    "more ranks than the cluster": ["plan", "--model", "tiny-dense", "--ranks", "32"],
}


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "adir").mkdir()
    # A profile measured in bf16 only (float32 is derived from bf16, fp16 is not).
    profile = json.loads((resources.files("shardwise.perf") / "profiles" / "h200-x2.json")
                         .read_text())
    profile["matmul_tflops"] = {"bf16": profile["matmul_tflops"]["bf16"]}
    profile["measurements"]["matmul"] = {"bf16": profile["measurements"]["matmul"]["bf16"]}
    (tmp_path / "bf16-only.json").write_text(json.dumps(profile))
    return tmp_path


@pytest.mark.parametrize("what", sorted(REFUSED))
def test_every_suggestion_of_a_refused_command_line_is_accepted(what, scratch):
    argv = REFUSED[what]
    first = fuzz_cli.run_cli(argv)
    assert first["status"] == "refused", (what, first)
    message = re.sub(r"^shardwise( [a-z]+)?: error: ", "", first["message"])
    plan = argv[argv.index("--plan") + 1] if "--plan" in argv else None
    fixes = suggestions(message, plan)
    assert fixes, f"no suggestion read from: {message}"
    for fix in fixes:
        fixed = _apply(argv, fix)
        after = fuzz_cli.run_cli(fixed)
        assert after["status"] in ("launched", "ran"), (
            f"{message}\nfollowed ({fix.kind}): shardwise {' '.join(fixed)}\n-> {after}")


# -- the fuzzer's cases ---------------------------------------------------------------

def _apply_case(fc: fuzz.FuzzCase, fix: Fix) -> fuzz.FuzzCase:
    plan, world, workload = fc.plan, fc.world, dict(fc.workload)
    if fix.plan is not None:
        plan = fix.plan
        if fix.own_ranks:
            world = get_strategy(Plan.parse(plan).strategy).ranks_needed(Plan.parse(plan)) \
                or world
    for flag, value in fix.flags.items():
        if flag == "--nproc":
            world = int(value)
        elif flag == "--seq":
            workload["seq_len"] = int(value)
        else:
            raise AssertionError(f"a flag the fuzzer's cases have no counterpart for: {flag}")
    return dataclasses.replace(fc, plan=plan, world=world, workload=workload)


CASES = 2000  # of seed 0: about 2 s (validation only)


def test_following_a_suggestion_removes_the_refusals_reason():
    followed, kinds, unfixed = Counter(), Counter(), []
    for i in range(CASES):
        fc = fuzz.generate(0, i)
        status, message = fuzz.prelaunch(fc)
        if status != "refused":
            continue
        for fix in suggestions(message, fc.plan):
            kinds[fix.kind] += 1
            try:
                status2, message2 = fuzz.prelaunch(_apply_case(fc, fix))
            except ShardwiseError as e:  # a plan that does not parse
                status2, message2 = "refused", str(e)
            followed[status2] += 1
            if status2 != "valid" and fuzz.reason_of(message2) == fuzz.reason_of(message):
                unfixed.append(f"case {i} ({fc.plan} on {fc.world}): {message}\n  followed "
                               f"({fix.kind}): {message2}")
    assert not unfixed, "\n".join(unfixed[:10])
    # The forms of suggestion the strategies give were met and followed (ring's
    # one degree for several: the command lines above).
    assert {"degree", "capacity", "no micro-batches", "micro-batches", "stages", "option",
            "near plans", "flag"} <= set(kinds), kinds
    assert followed["valid"] > 500, followed
