"""The recorder against real runs: for every strategy on GPT-, Llama- and
Mixtral-style models (with q/k/v biases, tied embeddings, rope scaling,
KV heads held by several ranks, and heads wide enough for the flash kernel;
compositions of the strategies over one mesh too), what the recorder finds from the code alone (calls by
kind, collectives with their bytes, weights and KV cache per rank) equals
what a real run on CPU ranks (gloo, along the GPU branches) counts. Nothing
here is a hand-written list: both sides come from the same code."""
import pytest
import torch

from shardwise.perf.counting import count_calls
from shardwise.perf.record import record_rank
from shardwise.perf.events import CALL_KINDS, Coll, Repeat
from shardwise.perf.lowering import sdp_backend
from shardwise.perf.trace import Routing
from shardwise.presets import get_preset
from shardwise.runtime.job import Case
from shardwise.spec import ModelSpec, Plan, Workload
from helpers import with_real_features

TINY, TINY_MOE = get_preset("tiny-dense").model, get_preset("tiny-moe").model
# GPT-style: LayerNorm, the two-matrix MLP; in bf16 with the tanh GELU the GPU
# path fuses the residual adds into the norms and the GELU into the GEMM.
GPT = TINY.replace(n_layers=3, dtype="bf16", activation="gelu_tanh")
GPT_MOE = TINY_MOE.replace(n_layers=3, dtype="bf16", activation="gelu_tanh")
LLAMA = ModelSpec(name="llama", n_layers=3, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16,
                  d_ff=128, dtype="bf16", norm="rmsnorm", activation="swiglu",
                  rope_theta=10000.0, vocab_size=97)
MIXTRAL = LLAMA.replace(name="mixtral", n_experts=4, top_k=2, vocab_size=None)
# q/k/v biases, tied embeddings and Llama 3.1's rope scaling; heads of 512,
# which take shardwise's flash kernel (model/flash.py) in prefill.
REAL = with_real_features(LLAMA)
WIDE = GPT.replace(name="wide", n_heads=2, head_dim=512)
MODELS = {"tiny-dense": TINY.replace(n_layers=3), "tiny-moe": TINY_MOE.replace(n_layers=3),
          "gpt": GPT, "gpt-moe": GPT_MOE, "llama": LLAMA, "mixtral": MIXTRAL,
          "real": REAL, "wide": WIDE,
          # weights that outweigh the working set: layerwise cuts it into a pipeline
          "gpt-wide": GPT.replace(name="gpt-wide", d_ff=8192)}
# 8 sequences of 16: a MoE prefill (128 tokens) takes the routed paths, a
# decode step (8 tokens) the dense, static ones.
WL = Workload(batch=8, seq_len=16, decode_steps=2)


def _two_groups(model: str) -> str:
    """layerwise on 2 ranks at a capacity that cuts the model into two groups
    (a pipeline): the first of a few, largest first, the partitioner takes."""
    from shardwise.parallel.partition import plan_partition
    from shardwise.parallel.partition import layer_costs, min_capacity
    from shardwise.spec import ShardwiseError

    spec = MODELS[model]
    one = min_capacity(lambda b: layer_costs(spec, WL, b), spec.n_layers, 1, WL.batch)
    for frac in (0.9, 0.8, 0.7, 0.65, 0.6):
        plan = Plan.parse(f"layerwise:cap={int(one * frac)}B,mb=2")
        try:
            part = plan_partition(spec, WL, plan, 2)
        except ShardwiseError:
            continue
        if len(part.groups) == 2 and not part.idle_ranks:
            return str(plan)
    raise AssertionError(f"no two-group layerwise plan for {model}")


CASES = {
    2: [(m, p) for m in ("tiny-dense", "gpt", "llama", "tiny-moe", "gpt-moe", "mixtral")
        for p in ("tp_pp:2x1", "tp_pp:1x2,mb=2", "helix:1x2", "ring:2", "layerwise:cap=HBM@h100")]
       + [(m, "ep:2") for m in ("tiny-moe", "gpt-moe", "mixtral")]
       + [("gpt", "tp_pp:2x1,overlap=3"), ("gpt", "helix:2x1,reduce=flat"),
          ("gpt", "tp_pp:1x2,mb=4"), ("llama", "ring:2,mb=4"),  # micro-batch runs, compressed
          ("gpt-wide", _two_groups("gpt-wide"))]
       + [("real", p) for p in ("tp_pp:2x1", "tp_pp:1x2", "helix:2x1", "ring:2")]
       + [("wide", p) for p in ("tp_pp:2x1", "helix:1x2", "ring:2")],
    4: [("llama", "helix:1x4"), ("llama", "helix:2x2"), ("gpt", "ring:4"),
        ("mixtral", "tp_pp:2x2,mb=2"), ("mixtral", "ep:4"),
        # more parts than LLAMA's 2 KV heads: each KV head held twice
        ("llama", "tp_pp:4x1"), ("llama", "helix:4x1"), ("real", "tp_pp:4x1"),
        # compositions over one mesh (parallel/compose.py)
        ("gpt", "dp:2/tp:2"), ("llama", "pp:2/helix:1x2,mb=2"), ("llama", "ring:2/tp:2"),
        ("mixtral", "ep:2/tp:2"), ("gpt-moe", "dp:2/ep:2"),
        # a flat reduce over a stage's ranks: a flattened span, not the world
        ("llama", "pp:2/helix:1x2,reduce=flat")],
}


@pytest.fixture(scope="module")
def real():
    out = {}
    for nproc, cases in CASES.items():
        res = count_calls([Case(MODELS[m], WL, p, verify=False) for m, p in cases], nproc,
                          deadline_s=600)
        out.update({(m, p, nproc): r for (m, p), r in zip(cases, res)})
    return out


def _routed(plan: str, phase: str) -> bool:
    """An ep prefill exchanges the rows its router picked: data the recorder
    draws (uniformly) instead of knowing."""
    return any(part.startswith("ep:") for part in plan.split("/")) and phase == "prefill"


@pytest.mark.parametrize("case", [(m, p, n) for n, cs in CASES.items() for m, p in cs],
                         ids=lambda c: f"{c[0]}-{c[1]}")
def test_recorded_steps_equal_real_runs(real, case):
    model, plan, nproc = case
    spec = MODELS[model]
    ranks = real[case]
    totals = {}
    for r, counted in enumerate(ranks):
        rec = record_rank(spec, WL, Plan.parse(plan), nproc, r, "gloo")
        assert (rec.weights, rec.kv) == (counted["weights"], counted["kv"]), (plan, r)
        assert set(rec.steps) == {p for p in ("prefill", "decode", "static") if p in counted}
        for phase, step in rec.steps.items():
            want = counted[phase]
            got_calls, want_calls = dict(step.calls), dict(want["calls"])
            if _routed(plan, phase):
                # The routing decides which (chunk, expert) groups are empty
                # (no GEMMs run) and how many rows go to each rank: the
                # recorder's draw and the run's router agree on the totals.
                assert abs(got_calls.pop("kernels") - want_calls.pop("kernels")) <= 2 * spec.n_layers
                for key in ("all_to_all/ep",):
                    g, w = step.comm.get(key), want["comm"].get(key)
                    assert g["calls"] == w["calls"]
                    totals.setdefault(key, [0, 0])
                    totals[key][0] += g["bytes"]
                    totals[key][1] += w["bytes"]
                    assert g["bytes"] == pytest.approx(w["bytes"], rel=0.15)
                assert {k: v for k, v in step.comm.items() if k != "all_to_all/ep"} == {
                    k: v for k, v in want["comm"].items() if k != "all_to_all/ep"}
            else:
                assert step.comm == want["comm"], (plan, r, phase)
            assert got_calls == want_calls, (plan, r, phase)
    for got, want in totals.values():
        assert got == want  # every routed row is sent once and comes back once


def test_layer_loops_record_two_layers_for_any_depth():
    # A 6-layer stack records its first layer and one repeat of the second,
    # taken five times (so do the views of their KV caches a step takes); its
    # counts grow by one layer's per layer added.
    plan = Plan.parse("tp_pp:1x1")
    recs = {n: record_rank(GPT.replace(n_layers=n), WL, plan, 1, 0) for n in (3, 4, 6)}
    repeats = [e for e in recs[6].steps["prefill"].events if isinstance(e, Repeat)]
    assert [r.times for r in repeats] == [5, 5]
    for phase in ("prefill", "decode", "static"):
        c3, c4, c6 = (recs[n].steps[phase].calls for n in (3, 4, 6))
        assert all(c6[k] - c3[k] == 3 * (c4[k] - c3[k]) for k in CALL_KINDS), phase
        # QKV, W_o and the MLP's two: a prompt's GEMMs; a decode step's 8 rows by
        # kernels.linear's Triton kernel but the up-projection, whose GELU is
        # cuBLASLt's epilogue
        assert c4["gemms"] - c3["gemms"] == (4 if phase == "prefill" else 1), phase


def test_gpu_runs_fuse_small_all_reduces_with_the_add_and_norm():
    # On NCCL a decode step's all-reduce, residual add and norm are one kernel
    # (parallel/reduce_norm.py); on gloo they are an all-reduce and the add + norm.
    nccl = record_rank(GPT, WL, Plan.parse("tp_pp:2x1"), 2, 0, "nccl")
    gloo = record_rank(GPT, WL, Plan.parse("tp_pp:2x1"), 2, 0, "gloo")
    for phase in ("decode", "static"):
        colls = [e for e in nccl.steps[phase].events if isinstance(e, Coll)]
        assert colls and all(c.fused for c in colls)
        assert gloo.steps[phase].calls["all_reduce"] == 2 * GPT.n_layers
        assert nccl.steps[phase].calls["all_reduce"] == 0
    assert nccl.symmetric > 0 and gloo.symmetric == 0


def test_attention_backend_as_the_gpu_picks_it():
    m = dict(device="meta")
    q = torch.empty(2, 4, 16, 128, dtype=torch.bfloat16, **m)
    assert sdp_backend(q, q, None, True, False) == "cudnn"
    assert sdp_backend(q, q, None, True, True) == "cudnn"  # grouped-query as it is
    assert sdp_backend(q, q, torch.empty(16, 16, **m), False, False) == "cudnn"  # masked
    assert sdp_backend(q[:, :, :1], q, None, False, False) == "cudnn"
    one = q[:, :, :1]  # a key: cuDNN plans no such shape
    assert sdp_backend(q, one, None, False, False) == "flash"
    assert sdp_backend(q, one, torch.empty(16, 1, **m), False, False) == "efficient"
    assert sdp_backend(q, one, None, False, True) == "flash"  # FA2 takes grouped heads too
    wide = torch.empty(2, 4, 16, 512, dtype=torch.bfloat16, **m)
    assert sdp_backend(wide, wide, None, True, False) == "efficient"
    assert sdp_backend(q.float(), q.float(), None, True, False) == "efficient"


def test_routing_draws_are_shared_by_ranks_and_skewed_by_a_measured_balance():
    a, b = Routing(), Routing()
    assert torch.equal(a.draw(100, 8, 2), b.draw(100, 8, 2))  # every rank draws the same
    picks = Routing().draw(20000, 8, 2)
    counts = torch.bincount(picks.flatten(), minlength=8)
    assert int(counts.max() - counts.min()) <= 4  # each expert its share of the slots
    half = torch.bincount(picks[:10000].flatten(), minlength=8)
    assert int(half.max() - half.min()) <= 4  # and of any run of them
    skewed = Routing(balance=1.2, groups=2).draw(20000, 8, 2)
    assert (skewed < 4).float().mean().item() == pytest.approx(0.6, abs=0.005)


@pytest.mark.parametrize("case", [(m, p, n) for n, cs in CASES.items() for m, p in cs]
                         + [("gpt", "tp_pp:4x2,mb=2", 8), ("llama", "helix:2x4", 8),
                            ("gpt", "layerwise:cap=HBM@h100", 4)],
                         ids=lambda c: f"{c[0]}-{c[1]}")
def test_twins_record_as_themselves(case):
    # A rank the strategy names another's twin (Strategy.twin) is recorded once,
    # its ranks renamed: the same as recording it on its own, event for event.
    from shardwise.parallel.registry import validate_plan
    from shardwise.perf.record import record_alone

    model, plan, nproc = case
    spec, p = MODELS[model], Plan.parse(plan)
    cls, topo = validate_plan(spec, WL, p, nproc)
    twins = [r for r in range(nproc) if cls.twin(spec, WL, p, topo, r) != r]
    for r in twins:
        got, want = record_rank(spec, WL, p, nproc, r), record_alone(spec, WL, p, nproc, r)
        assert (got.rank, got.weights, got.kv, got.inputs, got.symmetric) == (
            want.rank, want.weights, want.kv, want.inputs, want.symmetric)
        for phase, step in want.steps.items():
            assert got.steps[phase].events == step.events, (plan, r, phase)
            assert got.steps[phase].peak_bytes == step.peak_bytes


@pytest.fixture
def first_in_process(monkeypatch):
    """The process-wide tables a first call makes (rope's angles, the decode
    kernel's arrival counts, the GELU epilogue's zero bias) not made yet."""
    from shardwise.model import decode, reference, rope

    monkeypatch.setattr(rope, "_TABLES", {})
    monkeypatch.setattr(decode, "_COUNTS", {})
    reference._zeros.cache_clear()


@pytest.mark.parametrize("case", [(m, p, n) for n, cs in CASES.items() for m, p in cs]
                         + [("gpt", "tp_pp:4x2,mb=2", 8), ("llama", "dp:2/ring:2/tp:2", 8),
                            ("mixtral", "ep:2/tp:4", 8), ("gpt-moe", "pp:2/ep:2,mb=2", 4)],
                         ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_a_first_call_records_what_a_later_one_does(case, first_in_process):
    # Each step is recorded at its first call, what the code makes once made
    # aside (once.made_once): the same recording as after a warm-up call,
    # every event, peak and byte count, for every rank, backend and routing.
    from shardwise.perf.record import record_alone

    model, plan, nproc = case
    spec, p = MODELS[model], Plan.parse(plan)
    for balance in (None, 1.5) if spec.is_moe else (None,):
        for backend in ("nccl", "gloo"):
            for r in range(nproc):
                got = record_alone(spec, WL, p, nproc, r, backend, balance)
                want = record_alone(spec, WL, p, nproc, r, backend, balance, warm_up=True)
                assert got == want, (plan, r, backend, balance)


def test_the_recorders_stable_sort_of_small_keys_is_argsorts():
    # The router's experts sorted stably on CPU (a shadow): one sort of
    # distinct keys, the same order as torch's stable argsort, ties in order.
    from shardwise.perf.trace import _run_on_cpu

    g = torch.Generator().manual_seed(0)
    for key in (torch.randint(-3, 9, (5000,), generator=g), torch.arange(4096) % 8,
                torch.zeros(7, dtype=torch.int32), torch.empty(0, dtype=torch.long)):
        got = _run_on_cpu(torch.ops.aten.argsort.stable, "argsort", (key,), {"stable": True})
        assert torch.equal(got, torch.argsort(key, stable=True))


@pytest.mark.parametrize("case", [("mixtral", "ep:2", 2), ("mixtral", "tp_pp:2x1", 2),
                                  ("gpt-moe", "tp_pp:1x2,mb=2", 2), ("mixtral", "ep:2/tp:2", 4)],
                         ids=lambda c: f"{c[0]}-{c[1]}")
def test_a_step_whose_routers_draw_is_recorded_once_from_the_draws_guessed(case, monkeypatch):
    # A step whose routers draw is run once, from as many draws on as the
    # last recording of it made: the recording a second call makes (every
    # event, kernel and collective; warm_up runs the first call and records
    # the second). No guess, or a wrong one, runs it again from the draws it
    # made: the same recording. Taking a run from a wrong guess as it is
    # records another step, which this comparison refuses.
    from shardwise.perf import record
    from shardwise.perf.record import record_alone

    model, plan, nproc = case
    spec, p = MODELS[model], Plan.parse(plan)
    runs = []
    real = record._recording
    monkeypatch.setattr(record, "_recording", lambda rec: runs.append(rec) or real(rec))
    for balance in (None, 1.5):
        want = [record_alone(spec, WL, p, nproc, r, "nccl", balance, warm_up=True)
                for r in range(nproc)]
        for guesses in ("none", "wrong", "right"):
            if guesses == "none":
                monkeypatch.setattr(record, "_DRAWS", {})
            elif guesses == "wrong":
                monkeypatch.setattr(record, "_DRAWS", {k: v + 1 for k, v in record._DRAWS.items()})
            for r in range(nproc):
                del runs[:]
                assert record_alone(spec, WL, p, nproc, r, "nccl", balance) == want[r], (
                    plan, r, balance, guesses)
                if guesses == "right" and "mb=" not in plan:  # ranks alike: each step run once
                    assert len(runs) == 1 + len(want[r].steps), (plan, r, balance)


def test_a_run_from_a_wrong_guess_taken_as_it_is_records_another_step(monkeypatch):
    # What the comparison above refuses: an ep step run from one draw more
    # than a second call's, taken as it is, routes other rows to each rank.
    from shardwise.perf import record
    from shardwise.perf.record import record_alone

    p = Plan.parse("ep:2")
    want = [record_alone(MIXTRAL, WL, p, 2, r, "nccl", 1.5, warm_up=True) for r in range(2)]
    assert [record_alone(MIXTRAL, WL, p, 2, r, "nccl", 1.5) for r in range(2)] == want
    monkeypatch.setattr(record, "_as_guessed", lambda drew, guess: True)
    monkeypatch.setattr(record, "_DRAWS", {k: v + 1 for k, v in record._DRAWS.items()})
    got = [record_alone(MIXTRAL, WL, p, 2, r, "nccl", 1.5) for r in range(2)]
    assert got != want and got[0].steps["prefill"].comm != want[0].steps["prefill"].comm


@pytest.mark.parametrize("case", [("gpt", "tp_pp:2x1,overlap=3", 2), ("gpt", "tp_pp:1x2,mb=3", 2),
                                  ("llama", "ring:2,mb=4", 2), ("mixtral", "tp_pp:2x2,mb=2", 4),
                                  ("llama", "pp:2/helix:1x2,mb=2", 4)],
                         ids=lambda c: f"{c[0]}-{c[1]}")
def test_a_caches_batch_views_made_from_the_first_of_their_shapes_are_what_the_code_makes(
        case, monkeypatch):
    # A KV cache's views of a micro-batch (KVCache.batch_view), asked again
    # with the same shapes, are made from the first's calls and strides
    # (perf/shortcuts.py): every rank records what it records with the
    # model's own batch_view, event for event.
    from shardwise.perf import shortcuts
    from shardwise.perf.record import record_alone

    model, plan, nproc = case
    spec, p = MODELS[model], Plan.parse(plan)
    monkeypatch.setattr(shortcuts, "_VIEWS", {})
    made = [record_alone(spec, WL, p, nproc, r) for r in range(nproc)]  # the first of each
    assert shortcuts._VIEWS
    taken = [record_alone(spec, WL, p, nproc, r) for r in range(nproc)]  # from the first
    monkeypatch.setattr(shortcuts, "batch_views", lambda real, active: real)
    own = [record_alone(spec, WL, p, nproc, r) for r in range(nproc)]
    assert made == own and taken == own


def test_batch_views_taken_for_other_bounds_record_another_step(monkeypatch):
    # What the comparison above refuses: one micro-batch's views taken for
    # every bounds (8 sequences in micro-batches of 3, 3 and 2).
    from shardwise.perf import shortcuts
    from shardwise.perf.record import record_alone

    p = Plan.parse("tp_pp:1x2,mb=3")
    own = [record_alone(GPT, WL, p, 2, r) for r in range(2)]

    class AnyBounds(dict):
        def get(self, key, default=None):
            alike = [v for k, v in self.items() if k[:5] == key[:5]]
            return alike[0] if alike else default

    monkeypatch.setattr(shortcuts, "_VIEWS", AnyBounds())
    try:
        wrong = [record_alone(GPT, WL, p, 2, r) for r in range(2)]
    except RuntimeError:  # a micro-batch's view of another's size: the step fails
        return
    assert wrong != own
