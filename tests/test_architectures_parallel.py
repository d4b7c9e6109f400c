"""Each architecture's own checkpoint under every strategy that applies (CPU,
gloo, fp32), against the single-device reference on the same checkpoint,
which itself computes what transformers computes (test_architectures.py).

The checkpoints (tests/hf_models.py) are Llama, Llama 3.1 (rope scaling),
Mistral, Mixtral (experts) and Qwen2 (q/k/v biases, tied embeddings), each
with 4 query heads over 2 KV heads, at 2, 3 and 4 ranks. Every plan of one
world size runs in one launch (shared with other modules' cases of that size,
helpers.SharedLaunch). At 4 ranks tp_pp:4x1 and helix:4x1 go past
the 2 KV heads (each KV head held by the 2 ranks whose query heads use it);
tp_pp:1x2, tp_pp:2x2 and the layerwise pipelines put Qwen2's tied LM head on
another rank than its embedding; helix slices Qwen2's biases with their dims.
"""
from __future__ import annotations

import pytest

from helpers import SharedLaunch, assert_verified
from hf_models import ARCHITECTURES, write_checkpoint
from shardwise.model.checkpoint import checkpoint_spec
from shardwise.parallel.registry import available_strategies, validate_plan
from shardwise.runtime.job import Case
from shardwise.spec import ShardwiseError, Workload

# 4 sequences (ep:4 gives each rank one), 11 positions: uneven zig-zag chunks
# for ring and uneven query chunks on helix's sequence path.
WL = Workload(batch=4, seq_len=11, decode_steps=3)
PLANS = {
    2: ["tp_pp:2x1", "tp_pp:1x2", "helix:2x1", "helix:1x2", "ring:2", "ep:2"],
    3: ["ring:3"],  # 3 divides no head, head dim, layer or expert count here
    4: ["tp_pp:4x1", "tp_pp:2x2", "helix:4x1", "helix:2x2", "helix:1x4", "ring:4", "ep:4"],
}
# layerwise per world size: (replicas, groups) and micro-batches, found by
# capacity (with one micro-batch a pipeline is slower than replicas).
LAYERWISE = {2: ((1, 2), 2), 3: ((3, 1), 1), 4: ((2, 2), 2)}


def layerwise_plan(spec, world: int) -> str:
    """A layerwise plan whose partition is ``LAYERWISE[world]`` on ``world``
    ranks: the capacity decides it, so try them from roomy to tight."""
    shape, mb = LAYERWISE[world]
    for k in range(120, 40, -1):
        plan = f"layerwise:cap={int(2 ** (k / 4))}" + (f",mb={mb}" if mb > 1 else "")
        try:
            _, topo = validate_plan(spec, WL, plan, world)
        except ShardwiseError:
            continue
        if topo.shape == shape:
            return plan
    raise AssertionError(f"no capacity gives {shape} on {world} ranks")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (directory, spec), each checkpoint written once."""
    root = tmp_path_factory.mktemp("arch")
    out = {}
    for name in sorted(ARCHITECTURES):
        write_checkpoint(name, root / name, with_tokenizer=False)
        out[name] = (str(root / name), checkpoint_spec(str(root / name)))
    return out


def plans_for(spec, world: int) -> list[str]:
    """The plans of ``world`` ranks that apply to ``spec`` (ep: MoE only)."""
    plans = [p for p in PLANS[world] if spec.is_moe or not p.startswith("ep:")]
    return plans + [layerwise_plan(spec, world)]


def test_every_strategy_runs_every_architecture(checkpoints):
    # Guards the launches below: every landed strategy on every checkpoint at
    # 2 and at 4 ranks (ep only where there are experts), each plan valid
    # before launch.
    for _, spec in checkpoints.values():
        for world in PLANS:
            plans = plans_for(spec, world)
            for plan in plans:
                validate_plan(spec, WL, plan, world)
            strategies = {p.split(":")[0] for p in plans}
            expected = set(available_strategies()) - (set() if spec.is_moe else {"ep"})
            assert world == 3 or strategies == expected, (spec.name, world)


@pytest.fixture(scope="module")
def runs(checkpoints):
    """world size -> its cases, registered for the launch of that size shared
    with other modules' cases (helpers.SharedLaunch) once the checkpoints are
    written, before a test asks for results."""
    return {world: SharedLaunch([Case(spec, WL, plan, checkpoint=path)
                                 for path, spec in checkpoints.values()
                                 for plan in plans_for(spec, world)], world)
            for world in PLANS}


@pytest.mark.parametrize("world", sorted(PLANS))
def test_checkpoints_match_reference(runs, world):
    cases, results = runs[world].cases, runs[world].results()
    assert [r["model"] for r in results] == [c.model.name for c in cases]
    assert_verified(results, [c.plan for c in cases])  # prefill and every decode step
    for c, r in zip(cases, results):
        if c.plan in ("tp_pp:4x1", "helix:4x1"):  # past the 2 KV heads: one each, replicated
            head = 2 * c.model.n_layers * WL.batch * WL.max_len * c.model.head_dim * 4
            assert r["kv_bytes_per_rank"] == [head] * world, (c.model.name, c.plan)
