"""What a pipelined rank holds during a step (parallel/pipeline.py): one
micro-batch's activations, not the batch's.

Measured by the recorder of the strategies' own code (perf/record.py: every
tensor a step allocates, followed to its peak, and the inputs a run hands
the rank), on meta tensors, so no process starts. At one sequence per
micro-batch a rank's held bytes must not grow with the batch, but for what
persists per sequence: the first stage's decode token and the last stage's
outputs (a prefill's last position, a decode step's token). Before the pipeline streamed, the first
stage was handed the whole prompt and the last stage kept every
micro-batch's output and joined them: both grew with the batch.
"""
import pytest

from shardwise.perf.record import record_plan
from shardwise.presets import get_preset
from shardwise.spec import Plan, Workload

GPT = get_preset("tiny-dense").model  # 4 layers, d_model 64, hidden states in and out
LLAMA = GPT.replace(name="vocab", vocab_size=1000)  # logits out: the widest output
SEQ = 16
# pp:2 is tp_pp:1x2; dp:2/pp:2 is what layerwise:cap=C runs (replicas of a
# pipeline of whole layers); pp:2/ring:2 keeps the last position on the
# sequence shard that holds it.
PLANS = [("tp_pp:1x2", 2, 1), ("dp:2/pp:2", 4, 2), ("pp:2/ring:2", 4, 1), ("pp:2/tp:2", 4, 1)]


def held(spec, plan: str, world: int, batch: int, mb: int) -> list[int]:
    """Each rank's bytes held at a step's peak: its inputs and its steps'
    own tensors (the activations term of a prediction)."""
    wl = Workload(batch=batch, seq_len=SEQ, decode_steps=1)
    traces = record_plan(spec, wl, Plan.parse(f"{plan},mb={mb}"), world, backend="gloo")
    return [t.inputs + max(s.peak_bytes for s in t.steps.values()) for t in traces]


@pytest.mark.parametrize("spec", [GPT, LLAMA], ids=["hidden", "logits"])
@pytest.mark.parametrize("plan,world,replicas", PLANS, ids=[p for p, _, _ in PLANS])
def test_a_pipelined_rank_holds_a_micro_batch_not_the_batch(spec, plan, world, replicas):
    width = spec.vocab_size or spec.d_model
    itemsize = 4  # fp32
    small, large = 4 * replicas, 8 * replicas  # sequences; a replica's share is 4 or 8
    # One sequence per micro-batch: the batch grows, the micro-batch does not.
    a = held(spec, plan, world, small, small // replicas)
    b = held(spec, plan, world, large, large // replicas)
    # In: the decode token. Out: the prefill's last position, or the decode
    # step's output (the step's result, whole), its micro-batches' parts and
    # their join alive together for one kernel.
    per_sequence = (spec.d_model + 2 * width) * itemsize
    extra = (large - small) // replicas
    for rank, (x, y) in enumerate(zip(a, b)):
        assert y - x <= extra * per_sequence, (plan, rank, x, y)
    # The measure sees activations: one micro-batch of the whole share holds
    # at least the extra sequences' hidden states more on every rank.
    whole_a = held(spec, plan, world, small, 1)
    whole_b = held(spec, plan, world, large, 1)
    share = extra * SEQ * spec.d_model * itemsize // (2 if "ring" in plan else 1)
    for rank, (x, y) in enumerate(zip(whole_a, whole_b)):
        assert y - x >= share, (plan, rank, x, y)
