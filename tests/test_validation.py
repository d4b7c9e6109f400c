"""Bad input is refused before any process starts, with a message naming the fix."""
import pytest
import torch

from shardwise import cli
from shardwise.parallel.base import validate_plan
from shardwise.presets import PRESETS, get_preset
from shardwise.spec import ModelSpec, Plan, ShardwiseError, Workload, parse_bytes

TINY = get_preset("tiny-dense")


def refused(plan, world=None, model=TINY.model, wl=TINY.reduced) -> str:
    with pytest.raises(ShardwiseError) as e:
        validate_plan(model, wl, plan, world)
    msg = str(e.value)
    assert "\n" not in msg  # one line
    return msg


def test_world_size_mismatch_names_the_nproc():
    msg = refused("tp_pp:2x2", 2)
    assert "needs" in msg and "--nproc 4" in msg


def test_heads_not_divisible_by_tp():
    msg = refused("tp_pp:3x1")
    assert "n_heads (4)" in msg and "choose tp among [1, 2, 4]" in msg


def test_d_ff_not_divisible_by_tp():
    model = TINY.model.replace(d_ff=250, n_heads=8, head_dim=8)
    msg = refused("tp_pp:4x1", model=model)
    assert "d_ff (250)" in msg and "choose tp" in msg


def test_kv_heads_split_or_replicated_by_tp():
    # tp divides the KV heads (each rank its share) or is a multiple of them
    # (each KV head replicated over the ranks that share it); nothing between.
    model = TINY.model.replace(n_heads=12, head_dim=4, n_kv_heads=4, d_ff=240)
    msg = refused("tp_pp:6x1", model=model)
    assert "n_kv_heads (4)" in msg and "neither divides" in msg and "replicate" in msg
    assert "choose tp among [1, 2, 4, 12]" in msg
    for tp in (2, 4, 12):
        validate_plan(model, TINY.reduced, f"tp_pp:{tp}x1", tp)
    validate_plan(TINY.model.replace(n_kv_heads=1), TINY.reduced, "tp_pp:4x1", 4)


def test_more_stages_than_layers():
    msg = refused("tp_pp:1x5")
    assert "5 pipeline stages" in msg and "pp <= 4" in msg


def test_more_micro_batches_than_sequences():
    assert "mb <= 4" in refused("tp_pp:1x2,mb=5")


@pytest.mark.parametrize("text", ["tp_pp:2y", "tp_pp:0x2", "tp_pp:2x2,mb=", "TP:2", "tp_pp:2x2,4x1", ":3"])
def test_malformed_plan_strings(text):
    with pytest.raises(ShardwiseError) as e:
        Plan.parse(text)
    assert "plan" in str(e.value) or "degree" in str(e.value)


def test_plan_round_trip():
    p = Plan.parse("tp_pp:8x2,mb=4")
    assert (p.strategy, p.shape, p.micro_batches, str(p)) == ("tp_pp", (8, 2), 4, "tp_pp:8x2,mb=4")
    assert Plan.parse("layerwise:cap=L2").option("cap") == "L2"


def test_unknown_strategy_and_preset():
    assert "choose one of: tp_pp" in refused("warp:2")
    with pytest.raises(ShardwiseError, match="choose one of: seed-helix-2l"):
        get_preset("seed-helix-3l")


def test_bad_model_and_workload():
    with pytest.raises(ShardwiseError, match="multiple of n_kv_heads"):
        ModelSpec(name="m", n_layers=1, d_model=8, n_heads=3, head_dim=4, d_ff=8, n_kv_heads=2)
    with pytest.raises(ShardwiseError, match="top_k"):
        ModelSpec(name="m", n_layers=1, d_model=8, n_heads=2, head_dim=4, d_ff=8, n_experts=2, top_k=3)
    with pytest.raises(ShardwiseError, match="batch >= 1"):
        Workload(batch=0, seq_len=4)


def test_more_ranks_than_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ShardwiseError, match="needs 4 ranks but this machine has 2 GPU"):
        cli.check_ranks(4, "cuda")
    cli.check_ranks(2, "cuda")


def test_cli_errors_exit_2_with_one_line(capsys):
    assert cli.main(["verify", "--preset", "tiny-dense", "--plan", "tp_pp:3x1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shardwise: error:") and "choose tp among" in err
    assert cli.main(["verify", "--preset", "nope", "--plan", "tp_pp:1"]) == 2
    assert cli.main(["verify", "--preset", "tiny-dense", "--plan", "tp_pp:2x2", "--nproc", "3"]) == 2


def test_seed_presets_have_the_seed_dimensions():
    h = PRESETS["seed-helix-4l"].model
    assert (h.n_layers, h.n_heads, h.head_dim, h.d_model, h.d_ff) == (4, 32, 128, 4096, 16384)
    r = PRESETS["seed-ring-4l"].model
    assert (r.n_heads, r.head_dim, r.d_model, r.d_ff) == (16, 512, 8192, 32768)
    assert PRESETS["seed-ring-4l"].workload.batch == 1024
    # DESIGN.md section 6: the stated dims give ~201M per layer; 30B needs d_model 12288.
    assert PRESETS["seed-layerwise-3b"].model.layer_params() == 201_342_976
    assert abs(PRESETS["seed-layerwise-30b"].model.total_params() / 1e9 - 29.0) < 0.1
    moe = PRESETS["seed-moe-16l"].model
    assert moe.expert_params() * 2 == 256 * 2**20  # a two-matrix expert is 256 MiB in bf16


def test_parse_bytes():
    assert parse_bytes("80GB") == 80 * 10**9
    assert parse_bytes("40GiB") == 40 * 2**30
    with pytest.raises(ShardwiseError):
        parse_bytes("lots")


def test_unknown_tp_pp_option():
    assert "overlap=K|auto" in refused("tp_pp:2x1,overlap=0", 2)
    assert "overlap=K|auto" in refused("tp_pp:2x1,overlap=two", 2)
    assert "overlap=K|auto" in refused("tp_pp:2x1,chunks=2", 2)


def test_zero_batch_is_refused_not_ignored(capsys):
    assert cli.main(["verify", "--preset", "tiny-dense", "--plan", "tp_pp:1", "--batch", "0"]) == 2
    assert "batch >= 1" in capsys.readouterr().err
