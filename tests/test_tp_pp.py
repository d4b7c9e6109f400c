"""tp_pp against the single-device reference on CPU with gloo (fp32)."""
import pytest

from helpers import assert_verified, run_plans
from shardwise.spec import ModelSpec, Workload


@pytest.mark.parametrize("nproc,plans", [
    (1, ["tp_pp:1x1"]),
    # tp_pp:2x1 runs prefill as two overlapped halves; overlap=1 is the plain schedule.
    (2, ["tp_pp:2x1", "tp_pp:2x1,overlap=1", "tp_pp:1x2", "tp_pp:1x2,mb=2"]),
    (4, ["tp_pp:2x2", "tp_pp:4x1", "tp_pp:1x4,mb=4", "tp_pp:2x2,mb=3"]),
])
def test_tp_pp_matches_reference(nproc, plans):
    assert_verified(run_plans("tiny-dense", plans, nproc), plans)


def test_tp_pp_gqa_uneven_layers_and_vocab():
    # 5 layers over 2 stages (3 + 2), grouped-query attention, token ids in and
    # logits out (embedding on the first stage, LM head on the last).
    spec = ModelSpec(name="t", n_layers=5, d_model=48, n_heads=4, head_dim=12, d_ff=96,
                     n_kv_heads=2, dtype="fp32", vocab_size=101, norm="rmsnorm",
                     activation="swiglu", rope_theta=10000.0)
    plans = ["tp_pp:2x2", "tp_pp:1x4"]
    assert_verified(run_plans(spec, plans, 4, Workload(batch=3, seq_len=7, decode_steps=4)),
                    plans)


def test_tp_pp_moe_spreads_experts():
    plans = ["tp_pp:2x1", "tp_pp:1x2"]
    assert_verified(run_plans("tiny-moe", plans, 2), plans)
