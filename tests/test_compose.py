"""Composed plans (parallel/compose.py): the syntax, the errors before launch,
and every kind of composition against the single-device reference on CPU
with gloo (fp32) at 4, 6 and 8 ranks.

Each world size runs its plans in one launch (eager decode) and a second,
smaller one whose decode steps run at a device-tensor position (the static
step bench replays in a CUDA graph); both are shared with other modules'
cases of that world size (helpers.SharedLaunch). Models: GPT-style (the tiny presets:
LayerNorm, GELU, hidden states in and out) and Llama-style (RMSNorm,
SwiGLU, rotary with Llama 3.1's scaling, 4 query heads over 2 KV heads,
q/k/v biases, a vocabulary with tied embeddings), dense and MoE.
"""
import math

import pytest
import torch

from helpers import SharedLaunch, assert_verified, with_real_features
from shardwise.model.load import ShardLoader
from shardwise.model.weights import WeightSource
from shardwise.parallel.registry import validate_plan
from shardwise.parallel.comm import Comm
from shardwise.parallel.stages import AnyComposed
from shardwise.parallel.plans import composition_candidates
from shardwise.presets import get_preset
from shardwise.runtime.job import Case
from shardwise.spec import ModelSpec, Plan, ShardwiseError, Workload

GPT = get_preset("tiny-dense").model  # 4 layers, 4 heads x 16, d_ff 256
GPT_MOE = get_preset("tiny-moe").model  # 2 layers, 4 experts, top-2
LLAMA = with_real_features(ModelSpec(
    name="llama", n_layers=4, d_model=48, n_heads=4, head_dim=12, d_ff=96, n_kv_heads=2,
    dtype="fp32", vocab_size=101, norm="rmsnorm", activation="swiglu", rope_theta=1e4))
# 12 experts: ep over 2, 3, 4 and 6 ranks; each expert's d_ff splits over tp.
LLAMA_MOE = LLAMA.replace(name="llama-moe", n_layers=3, d_ff=48, n_experts=12, top_k=2)
# Batch 4 (shares of 2, 1 and 1 over dp:3; empty micro-batches under ep),
# 9 prompt positions (uneven zig-zag chunks and helix sequence chunks).
WL = Workload(batch=4, seq_len=9, decode_steps=3)

# world size -> (model, plan); every kind of stage at every world size:
# pp x {tp, helix, ring}, ring x tp, ep with data- and tensor-parallel
# attention, dp over each, one stage with micro-batches.
PLANS = {
    4: [(LLAMA, "pp:2/tp:2"), (LLAMA, "pp:2/helix:1x2"), (LLAMA, "pp:2/ring:2,mb=2"),
        (LLAMA, "ring:2/tp:2"), (LLAMA, "dp:2/helix:2x1"), (LLAMA, "dp:2/pp:2,mb=2"),
        (LLAMA, "tp_pp:4x1,mb=2"), (GPT, "dp:2/tp:2"), (GPT, "pp:2/helix:2x1"),
        (GPT, "dp:2/ring:2"), (LLAMA_MOE, "ep:2/tp:2"), (LLAMA_MOE, "pp:2/ep:2,mb=2"),
        (GPT_MOE, "dp:2/ep:2"), (GPT_MOE, "ring:2/tp:2"),
        # overlap=2: the stage as two halves of the batch whose all-reduces
        # overlap the other half (with ring's exchanges inside each half).
        (GPT, "ring:2/tp:2,overlap=2"), (GPT, "pp:2/tp:2,overlap=2,mb=2")],
    6: [(LLAMA, "pp:3/tp:2,mb=2"), (LLAMA, "pp:2/helix:1x3"), (LLAMA, "pp:2/ring:3"),
        (LLAMA, "ring:3/tp:2"), (LLAMA, "dp:3/tp:2"), (GPT, "dp:2/ring:3"),
        (GPT, "pp:3/tp:2"), (LLAMA_MOE, "ep:3/tp:2"), (LLAMA_MOE, "pp:2/ep:3"),
        (GPT_MOE, "dp:3/ep:2"), (LLAMA_MOE, "dp:2/ep:3")],
    8: [(LLAMA, "pp:2/ring:2/tp:2"), (LLAMA, "dp:2/pp:2/tp:2,mb=2"),
        (LLAMA, "pp:2/helix:2x2,reduce=flat"), (LLAMA, "dp:2/ring:2/tp:2"),
        (GPT, "pp:2/helix:2x2"), (GPT, "dp:2/pp:2/ring:2"), (LLAMA_MOE, "ep:4/tp:2"),
        (LLAMA_MOE, "pp:2/ep:2/tp:2"), (GPT_MOE, "dp:2/ep:4"), (LLAMA_MOE, "dp:2/ep:2/tp:2")],
}
# Decode steps at a device-tensor position: the plans whose stages can be
# captured in a CUDA graph (helix's heads path, ring's static step, ep's
# static form, pipelines' hops).
STATIC = {
    4: [(LLAMA, "pp:2/tp:2"), (LLAMA, "pp:2/helix:1x2"), (LLAMA, "ring:2/tp:2,mb=2"),
        (LLAMA, "dp:2/pp:2"), (LLAMA_MOE, "ep:2/tp:2"), (GPT_MOE, "dp:2/ep:2")],
    6: [(LLAMA, "pp:3/tp:2"), (LLAMA, "pp:2/ring:3"), (LLAMA_MOE, "ep:3/tp:2")],
    8: [(LLAMA, "pp:2/ring:2/tp:2"), (LLAMA_MOE, "pp:2/ep:2/tp:2"),
        (GPT, "dp:2/pp:2/tp:2")],
}


# Registered at import: each world size's launches are shared with other
# modules' cases of that size and job options (helpers.SharedLaunch).
RUNS = {world: SharedLaunch([Case(m, WL, p) for m, p in plans], world)
        for world, plans in PLANS.items()}
STATIC_RUNS = {world: SharedLaunch([Case(m, WL, p) for m, p in plans], world, static_decode=True)
               for world, plans in STATIC.items()}


@pytest.mark.parametrize("world", sorted(PLANS))
def test_compositions_match_reference(world):
    cases, results = RUNS[world].cases, RUNS[world].results()
    assert_verified(results, [c.plan for c in cases])  # prefill and every decode step
    for c, r in zip(cases, results):
        mesh = r["report"].get("mesh")
        if mesh is not None:  # composed plans report their mesh, outermost first
            assert math.prod(mesh.values()) == world, (c.plan, mesh)
    # ep's data-parallel attention with dp: rank 0 holds the first of 4 shares.
    dpep = results[[c.plan for c in cases].index("dp:2/ep:4")] if world == 8 else None
    if dpep is not None:
        assert dpep["report"]["batch_rows"] == [0, 1]
        routed = WL.batch * WL.seq_len * GPT_MOE.top_k  # every rank sees every routed row
        assert sum(map(sum, dpep["report"]["tokens_per_rank"])) == routed * GPT_MOE.n_layers // 2


@pytest.mark.parametrize("world", sorted(STATIC))
def test_compositions_decode_at_a_device_position(world):
    cases, results = STATIC_RUNS[world].cases, STATIC_RUNS[world].results()
    assert all(r["static_decode"] for r in results), [r["plan"] for r in results]
    assert_verified(results, [c.plan for c in cases])


# -- no processes -------------------------------------------------------------------

@pytest.mark.parametrize("text", ["pp:2/tp:2", "dp:2/pp:2/ring:2/tp:2,mb=4", "tp:4",
                                  "pp:2/helix:2x2,reduce=flat", "ep:4/tp:2,overlap=2",
                                  "dp:2/ep:4,chunks=2,mb=2"])
def test_plan_round_trip(text):
    plan = Plan.parse(text)
    assert plan.strategy == "compose" and str(plan) == text and Plan.parse(str(plan)) == plan
    assert [p.strategy for p in plan.parts] == [s.split(":")[0] for s in text.split("/")]


def test_mb_anywhere_is_the_plans():
    assert str(Plan.parse("pp:2,mb=3/tp:2")) == "pp:2/tp:2,mb=3"
    with pytest.raises(ShardwiseError, match="write it once"):
        Plan.parse("pp:2,mb=2/tp:2,mb=2")


def test_shorthands_run_their_composition():
    # tp_pp:TxP is pp:P/tp:T on the same mesh; layerwise is dp:R/pp:G.
    for short, composed, world in (("tp_pp:2x2", "pp:2/tp:2", 4), ("helix:2x2", "helix:2x2", 4),
                                   ("ring:4", "ring:4", 4), ("ep:4", "ep:4", 4)):
        spec = GPT_MOE if short.startswith("ep") else GPT
        _, a = validate_plan(spec, WL, short, world)
        _, b = validate_plan(spec, WL, composed, world)
        assert (a.axes, a.shape) == (b.axes, b.shape), short
    _, topo = validate_plan(GPT, WL, "layerwise:cap=1GB", 2)
    assert topo.axes == ("dp", "pp")


@pytest.mark.parametrize("plan,world,model,message", [
    ("tp:2/pp:2", 4, GPT, "outermost first (dp, pp, then ring or ep, then tp or helix): pp:2/tp:2"),
    ("pp:2/tp_pp:2x1", 4, GPT, "inside a composition write its dimensions (pp:P/tp:T)"),
    ("pp:2/sp:2", 4, GPT, "'sp' is not a mesh dimension; write one of dp, pp, ring, ep, tp, helix"),
    ("pp:2/pp:2", 4, GPT, "names pp twice"),
    ("pp:2x2/tp:1", 4, GPT, "write pp:N (one degree)"),
    ("pp:2/helix:4", 8, GPT, "write helix:NxM"),
    ("ring:2/ep:2", 4, GPT_MOE, "ring splits a stage's sequence and ep its batch"),
    ("helix:2x1/tp:2", 4, GPT, "do not compose in one stage"),
    ("ring:2/helix:2x1", 4, GPT, "write ring:C/tp:T"),
    ("pp:2/tp:2,overlap=x", 4, GPT, "tp takes the options overlap=K|auto"),
    ("pp:2/helix:2x1,reduce=tree", 4, GPT, "write reduce=hier or reduce=flat"),
    ("pp:2/ep:2,chunks=0", 4, GPT_MOE, "chunks must be a positive integer"),
    ("pp:2/ring:2,cap=L2", 4, GPT, "ring has no option 'cap'"),
    ("pp:2/tp:2", 8, GPT, "needs pp=2 x tp=2 = 4 ranks"),
    ("dp:8/tp:1", 8, GPT, "use dp <= 4"),
    ("pp:8/tp:1", 8, GPT, "use pp <= 4"),
    ("pp:2/ep:2", 4, GPT, "dense model"),
    ("pp:2/tp:3", 6, GPT, "choose tp among [1, 2, 4]"),
    ("ep:2/tp:3", 6, GPT_MOE.replace(n_heads=3), "d_ff (128) is not divisible by tp"),
    ("pp:2/helix:1x3", 6, GPT, "head_dim (16) is not divisible by head-dim slices M"),
    ("pp:2/tp:2,mb=5", 4, GPT, "use mb <= 4"),
])
def test_composition_errors_name_the_fix(plan, world, model, message):
    with pytest.raises(ShardwiseError) as err:
        validate_plan(model, WL, plan, world)
    text = str(err.value)
    assert message in text and "\n" not in text, text
    fixes = ("choose", "write", "use", "start", "remove", "e.g.", "takes the options")
    assert any(w in text for w in fixes), text


@pytest.mark.parametrize("plan,model", [
    ("ring:2/tp:3", GPT), ("pp:2/helix:1x3", GPT), ("dp:2/ep:3", GPT_MOE),
    ("pp:2/helix:2x2", GPT.replace(d_ff=250)),  # N*M: no one degree named
])
def test_a_compositions_fix_works_when_followed(plan, model):
    # The values a refusal suggests for a dimension's degree (or the plans it
    # names) are checked: none of them is refused for the same reason (another
    # degree may still need changing, and its refusal says how).
    import re

    with pytest.raises(ShardwiseError) as err:
        validate_plan(model, WL, plan)
    text = str(err.value)
    assert "no composed plan" not in text, text
    m = re.search(r"choose (\w+) among \[([\d, ]+)\]", text)
    if m:
        name, values = m.group(1), [int(v) for v in m.group(2).split(",")]
        part = next(p for p in plan.split("/") if p.startswith("helix" if name in "NM" else name))
        degrees = part.split(":")[1].split("x")
        tried = []
        for v in values:
            if name in "NM":
                d = list(degrees)
                d["NM".index(name)] = str(v)
                tried.append(plan.replace(part, "helix:" + "x".join(d)))
            else:
                tried.append(plan.replace(part, f"{name}:{v}"))
    else:
        tried = re.search(r"e\.g\. (.*)$", text).group(1).split(", ")
    assert tried, text
    reason = text.split(" of plan ")[0]  # e.g. "gpt: n_heads (4) is not divisible by tp"
    for variant in tried:
        try:
            validate_plan(model, WL, variant)
        except ShardwiseError as again:
            assert reason not in str(again), (variant, str(again))


def test_candidates_are_compositions_that_validate():
    # composition_candidates lists each layout once, none a single strategy;
    # the planner keeps those that validate.
    cands = composition_candidates(8)
    assert len(cands) == len(set(cands)) and "pp:2/tp:4" not in cands
    assert {"pp:2/ring:2/tp:2", "dp:2/pp:2/tp:2", "pp:2/helix:2x2", "ep:4/tp:2"} <= set(cands)
    valid = []
    for text in cands:
        try:
            validate_plan(LLAMA_MOE, WL, text, 8)
            valid.append(text)
        except ShardwiseError:
            pass
    assert "ep:4/tp:2" in valid and "dp:2/ep:2/tp:2" in valid
    # A dense model gets no ep dimension (validate would refuse every one).
    dense = composition_candidates(8, experts=False)
    assert not any("ep:" in c for c in dense) and set(dense) < set(cands)


def _rank(spec, wl, plan, world, rank, device="meta"):
    cls, topo = validate_plan(spec, wl, plan, world)
    topo.rank = rank
    loader = ShardLoader(WeightSource(spec, 0), torch.float32 if device != "meta" else
                         torch.bfloat16, device)
    return cls(spec, wl, Plan.parse(plan), topo, Comm(topo), loader)


def test_a_composed_30b_rank_builds_its_own_shard_only():
    # pp:2/ring:2/tp:4 on the 30B preset (16 ranks): a rank holds its stage's
    # 8 layers, a quarter of each (norms replicated), on the meta device.
    preset = get_preset("seed-layerwise-30b")
    spec = preset.model
    rank = _rank(spec, preset.reduced, "pp:2/ring:2/tp:4", 16, rank=9)  # stage 1
    assert all(p.is_meta for p in rank.parameters())
    params = sum(p.numel() for p in rank.parameters())
    norms = spec.norm_params()
    assert params == 8 * ((spec.layer_params() - norms) // 4 + norms) + norms // 2
    assert rank.report()["stage_layers"] == [8, 16]


def test_a_composed_step_runs_on_meta_tensors():
    # Shapes only, no data: what a recorder of the strategies' own code
    # executes. One rank (every axis of size 1: no collective runs), a
    # prefill and a decode step at an int and at a device-tensor position.
    spec = LLAMA
    rank = _rank(spec, WL, "dp:1/pp:1/ring:1/tp:1", 1, rank=0)
    prompt = torch.zeros(WL.batch, WL.seq_len, dtype=torch.long, device="meta")
    with torch.inference_mode():
        out = rank.step(prompt, 0, every_position=True)
        assert out.shape == (WL.batch, WL.seq_len, spec.vocab_size) and out.is_meta
        # A timed prefill keeps the last position's logits, all a decode step needs.
        assert rank.step(prompt, 0).shape == (WL.batch, 1, spec.vocab_size)
        token = torch.zeros(WL.batch, 1, dtype=torch.long, device="meta")
        assert rank.step(token, WL.seq_len).shape == (WL.batch, 1, spec.vocab_size)
        assert rank.supports_graphs
        pos = torch.tensor(WL.seq_len + 1, device="meta")
        assert rank.step(token, pos).shape == (WL.batch, 1, spec.vocab_size)


def test_composed_strategy_is_found_by_name():
    from shardwise.parallel.registry import available_strategies, get_strategy

    assert get_strategy("compose") is AnyComposed
    assert "compose" not in available_strategies()  # not ranked by the cost model yet


def test_group_ranks_of_a_span_of_axes():
    # A span's group (the one Topology.build flattens it into, and the
    # recorder stands in for): the ranks that differ from this one only
    # along the span's axes; a single axis as before.
    from shardwise.parallel.topology import Topology

    topo = Topology(("pp", "group", "slice"), (2, 2, 3), rank=8)  # pp 1, group 0, slice 2
    assert topo.group_ranks(("group", "slice")) == [6, 7, 8, 9, 10, 11]
    assert topo.group_ranks(("pp", "slice")) == [0, 1, 2, 6, 7, 8]
    assert topo.group_ranks(("slice",)) == topo.group_ranks("slice") == [6, 7, 8]
    assert topo.group_ranks(("pp", "group", "slice")) == list(range(12))
