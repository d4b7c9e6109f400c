"""ring: the zig-zag layout (no processes) and the strategy against the
single-device reference on CPU with gloo (fp32)."""
import pytest

from helpers import SharedLaunch, assert_verified, with_real_features
from shardwise.parallel.registry import validate_plan
from shardwise.parallel.ring import ZigZag
from shardwise.presets import get_preset
from shardwise.runtime.job import Case
from shardwise.spec import ModelSpec, ShardwiseError, Workload

TINY = get_preset("tiny-dense").model
# Every optional feature at once: grouped-query attention, rotary embeddings
# (which need each token's true position), token ids in, logits out.
FULL = ModelSpec(name="t", n_layers=3, d_model=48, n_heads=4, head_dim=12, d_ff=96,
                 n_kv_heads=2, dtype="fp32", vocab_size=101, norm="rmsnorm",
                 activation="swiglu", rope_theta=10000.0)
MOE = get_preset("tiny-moe").model
# What published models add: q/k/v biases, tied embeddings, Llama 3.1's rope
# scaling (each zig-zag chunk rotated at its own absolute positions).
REAL = with_real_features(FULL)
# Half precision exercises the dtype plumbing (bf16 blocks merged into a float32
# accumulator, lse bits packed beside a bf16 output); tolerance 2e-2, see job.py.
BF16 = TINY.replace(name="tiny-bf16", dtype="bf16")


# -- the layout: pure arithmetic ---------------------------------------------
LAYOUTS = [(P, L) for P in (1, 2, 3, 4, 8) for L in (1, 2 * P - 1, 2 * P, 2 * P + 3, 8 * P, 37)]


@pytest.mark.parametrize("P,L", LAYOUTS)
def test_zigzag_blocks_are_exactly_the_causal_pairs(P, L):
    zz = ZigZag(P, L, decode_steps=5)
    owned = [zz.positions(r) for r in range(P)]
    assert sorted(p for pos in owned for p in pos) == list(range(L))  # nothing dropped
    for r in range(P):
        assert [zz.where(p) for p in owned[r]] == [(r, i) for i in range(len(owned[r]))]
    seen = []
    for r in range(P):
        mine = []
        for s, q0, q1, k0, k1, causal in zz.blocks(r):
            keys = owned[(r - s) % P]
            for i in range(q0, q1):
                mine += [(owned[r][i], keys[j]) for j in range(k0, (i + 1) if causal else k1)]
        assert len(mine) == zz.pairs(r)
        seen += mine
    # Each causal (query, key) pair computed once, on the query's rank, and no other.
    assert sorted(seen) == [(q, k) for q in range(L) for k in range(q + 1)]


@pytest.mark.parametrize("P", [2, 3, 4, 8])
def test_zigzag_balances_work_and_cache(P):
    zz = ZigZag(P, 6 * P, decode_steps=2 * P + 1)
    assert len({zz.pairs(r) for r in range(P)}) == 1  # 2P divides L: equal causal work
    final = [zz.kv_len(r, zz.prompt + zz.decode_steps) for r in range(P)]
    assert max(final) - min(final) <= 1 and sum(final) == 6 * P + 2 * P + 1
    slots = {zz.where(p) for p in range(zz.prompt + zz.decode_steps)}
    assert len(slots) == zz.prompt + zz.decode_steps  # every position has its own slot
    # A contiguous split (rank r holding the r-th P-th) would give the last rank
    # ~(2P-1)x the first rank's work; zig-zag with uneven chunks stays close.
    uneven = ZigZag(P, 10000, 0)
    pairs = [uneven.pairs(r) for r in range(P)]
    assert max(pairs) / min(pairs) < 1.001


def test_ring_plan_errors_name_the_fix():
    wl = Workload(batch=2, seq_len=8)
    with pytest.raises(ShardwiseError, match="ring:4"):
        validate_plan(TINY, wl, "ring:2x2", 4)
    with pytest.raises(ShardwiseError, match="no option 'tp'"):
        validate_plan(TINY, wl, "ring:4,tp=2", 4)
    with pytest.raises(ShardwiseError, match="--nproc 4"):
        validate_plan(TINY, wl, "ring:4", 2)
    cls, topo = validate_plan(TINY, wl, "ring", 3)  # no degree: every rank
    assert topo.axes == ("seq",) and topo.shape == (3,)


# -- the strategy against the reference --------------------------------------
def shared_cases(nproc, cases):
    """The cases' launch: one per world size, shared with other modules' cases
    of that size (helpers.SharedLaunch); the ranks start once and run every case."""
    return SharedLaunch([Case(model, Workload(batch=batch, seq_len=L, decode_steps=4), plan)
                         for model, plan, batch, L in cases], nproc)


def run_cases(nproc, cases):
    """Every case run and verified; the results, in order."""
    results = RUNS[nproc].results()
    assert [r["plan"] for r in results] == [plan for _, plan, _, _ in cases]
    for r in results:  # fp32: 1e-5 (see helpers.assert_verified); bf16: the engine's 2e-2
        assert_verified([r], [r["plan"]], tol=1e-5 if r["dtype"] == "fp32" else r["tolerance"])
    assert [r["seq_len"] for r in results] == [L for *_, L in cases]
    return results


# Prompt lengths per world size: divisible by 2P, not divisible, shorter than 2P.
CASES = [
    (1, [(TINY, "ring:1", 2, 7), (FULL, "ring:1", 2, 5)]),
    (2, [(TINY, "ring:2", 2, 8), (TINY, "ring:2", 3, 5), (TINY, "ring:2", 2, 3),
         (FULL, "ring:2", 2, 11), (TINY, "ring:2,mb=2", 3, 9), (MOE, "ring:2", 2, 10),
         (REAL, "ring:2,mb=2", 3, 9)]),
    (3, [(TINY, "ring:3", 2, 12), (TINY, "ring:3", 2, 16), (TINY, "ring:3", 2, 4)]),
    (4, [(TINY, "ring:4", 2, 16), (TINY, "ring:4", 2, 13), (TINY, "ring:4", 2, 5),
         (FULL, "ring:4", 2, 19), (BF16, "ring:4", 2, 14), (REAL, "ring:4", 2, 13)]),
    (8, [(TINY, "ring:8", 2, 32), (TINY, "ring:8", 2, 21), (FULL, "ring:8", 2, 6),
         (MOE, "ring:8", 2, 6)]),
]
RUNS = {nproc: shared_cases(nproc, cases) for nproc, cases in CASES}


@pytest.mark.parametrize("nproc,cases", CASES)
def test_ring_matches_reference(nproc, cases):
    results = run_cases(nproc, cases)
    for r, (_, _, _, L) in zip(results, cases):
        rep = r["report"]
        assert sum(rep["kv_tokens_prompt_per_rank"]) == L
        assert sum(rep["attn_pairs_per_rank"]) == L * (L + 1) // 2
        assert sum(rep["kv_tokens_per_rank"]) == L + r["decode_steps"]
        if L % (2 * nproc) == 0:
            assert rep["attn_pairs_max_over_mean"] == 1.0


def static_cases(nproc):
    """Decode at a device-tensor position (what bench replays in a CUDA graph):
    each rank writes its slot or its spare one, attends its whole shard with
    the positions it does not hold masked; rotary GQA and a prompt not
    divisible by 2P, and a prompt shorter than P (ranks that hold no prompt
    token attend an empty shard until a decoded token lands there); the
    same job checks tp_pp's (pipelines included) and helix's static steps."""
    wl = Workload(batch=2, seq_len=2 * nproc + 1, decode_steps=5)
    plans = [f"ring:{nproc}", f"ring:{nproc},mb=2"] + (
        ["tp_pp:2x1", "helix:1x2", "tp_pp:1x2,mb=2"] if nproc == 2 else
        ["tp_pp:2x2"] if nproc == 4 else [])
    cases = [Case(m, wl, p) for m in (TINY, FULL) for p in plans]
    if nproc > 2:
        cases.append(Case(FULL, wl.replace(seq_len=nproc - 1), f"ring:{nproc}"))
    if nproc == 2:  # MoE decode steps take the dense path: no host synchronisation
        cases += [Case(MOE, wl, p) for p in ("ring:2", "tp_pp:2x1", "helix:1x2")]
    return cases


STATIC_RUNS = {nproc: SharedLaunch(static_cases(nproc), nproc, static_decode=True)
               for nproc in (2, 3, 4)}


@pytest.mark.parametrize("nproc", [2, 3, 4])
def test_ring_static_decode_matches_reference(nproc):
    results = STATIC_RUNS[nproc].results()
    for r in results:
        assert r["static_decode"], r["plan"]
        assert_verified([r], [r["plan"]])
