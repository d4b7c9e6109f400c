"""Bad input is refused before any process starts, with a message naming the fix."""
import pytest
import torch

from shardwise import cli
from shardwise.parallel.registry import validate_plan
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
    assert "--batch must be >= 1 (got 0)" in capsys.readouterr().err


# -- every number and path of the command line, checked before launch ------------------

TINY_VERIFY = ["verify", "--preset", "tiny-dense", "--plan", "tp_pp:1x1", "--device", "cpu"]
TINY_BENCH = ["bench", "--preset", "tiny-dense", "--plan", "tp_pp:1x1", "--device", "cpu"]


@pytest.fixture
def no_launch(monkeypatch):
    """Any launch fails the test: these inputs must be refused before one."""
    from shardwise.runtime import launcher

    def launch(*a, **k):
        raise AssertionError("launched")

    monkeypatch.setattr(launcher, "launch", launch)


def refused_line(argv, capsys) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("shardwise: error: "), err
    return err


@pytest.mark.parametrize("argv, says", [
    (TINY_VERIFY + ["--timeout", "0"], "--timeout must be a number of seconds, at least 1"),
    (TINY_VERIFY + ["--timeout", "-1"], "--timeout must be"),
    (TINY_VERIFY + ["--timeout", "nan"], "--timeout must be"),
    (TINY_BENCH + ["--iters", "0"], "--iters must be >= 1 (got 0)"),
    (TINY_BENCH + ["--warmup", "-1"], "--warmup must be >= 0 (got -1)"),
    (TINY_VERIFY + ["--deadline", "0"], "--deadline must be a number of seconds, more than 0"),
    (TINY_VERIFY + ["--deadline", "-3"], "leave it out for no deadline"),
    (TINY_VERIFY + ["--watchdog", "inf"], "leave it out to turn the watchdog off"),
    (TINY_VERIFY + ["--layers", "0"], "--layers must be >= 1 (got 0); leave it out to use every layer"),
    (["run", "--preset", "tiny-dense", "--layers", "0"], "--layers must be >= 1"),
    (["predict", "--preset", "tiny-dense", "--plan", "tp_pp:2x1", "--batch", "0"],
     "--batch must be >= 1 (got 0); leave it out for the preset's batch"),
    (["plan", "--preset", "tiny-dense", "--top", "0"],
     "--top must be >= 1 (got 0); leave it out to show every plan"),
    (["plan", "--preset", "tiny-dense", "--ranks", "0"],
     "--ranks must be >= 1 (got 0); give the number of GPUs to use (plan: leave it out"),
    (TINY_VERIFY + ["--nproc", "0"], "--nproc must be >= 1 (got 0)"),
])
def test_numbers_are_checked_before_launch(argv, says, no_launch, capsys):
    assert says in refused_line(argv, capsys)


@pytest.mark.parametrize("argv, says", [
    (["run", "--preset", ""], "--preset is empty"),  # was: the default model ran
    (["predict", "--model", "tiny-dense", "--plan", "", "--cluster", "h200-x2"],
     "--plan is empty"),
    (["report", "r.jsonl", ""], "files is empty"),
])
def test_an_empty_value_is_refused(argv, says, no_launch, capsys):
    assert says in refused_line(argv, capsys)


@pytest.mark.parametrize("cmd, flag", [(TINY_BENCH, "--out"), (TINY_VERIFY, "--json"),
                                       (["run", "--preset", "tiny-dense"], "--json")])
def test_an_output_file_that_is_a_directory_is_refused_before_launch(cmd, flag, tmp_path,
                                                                     no_launch, capsys):
    err = refused_line(cmd + [flag, str(tmp_path)], capsys)
    assert f"{flag} {tmp_path} is a directory; give a file in it" in err


def test_an_output_under_a_file_is_refused_before_launch(tmp_path, no_launch, capsys):
    (tmp_path / "f").write_text("")
    err = refused_line(TINY_BENCH + ["--out", str(tmp_path / "f" / "x.jsonl")], capsys)
    assert "is a file, so no directory can be made there" in err
    err = refused_line(TINY_BENCH + ["--out", str(tmp_path / "o.jsonl"), "--trace",
                                     str(tmp_path / "f")], capsys)
    assert "--trace" in err and "is a file, not a directory" in err


RECORD = ('{"model": "tiny-dense", "dtype": "fp32", "n_layers": 4, "batch": 4, "seq_len": 32, '
          '"device": "cpu", "n_devices": 1, "plan": "tp_pp:1x1", "phase": "prefill", '
          '"tps": 10.0, "median_ms": 1.0, "p10_ms": 1.0, "p90_ms": 1.0}')


@pytest.mark.parametrize("content, says", [
    (None, "no such file"),
    ("DIR", "is a directory"),
    (RECORD + "\n{oops\n" + RECORD + "\n", ":2: not a JSON record"),
    (RECORD + "\n" + RECORD[:30], ":2: not a JSON record (Unterminated string"),
    ('{"phase": "prefill", "tps": 3}\n', ":1: bench record lacks model, dtype"),
    ("[1, 2]\n", ":1: a JSON list, not a record"),
], ids=["missing", "directory", "malformed", "cut-short", "missing-keys", "not-an-object"])
def test_report_of_a_bad_results_file_is_one_line(content, says, tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    if content == "DIR":
        path.mkdir()
    elif content is not None:
        path.write_text(content)
    err = refused_line(["report", str(path)], capsys)
    assert str(path) in err and says in err
    if content and content.endswith(RECORD[:30]):
        assert "the last line, cut short: delete it" in err


def test_report_reads_a_good_file(tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    path.write_text(RECORD + "\n")
    assert cli.main(["report", str(path)]) == 0
    assert "tp_pp:1x1" in capsys.readouterr().out


@pytest.mark.parametrize("content, says", [("not json\n", "is not JSON"),
                                           ("[]\n", "holds a JSON list, not a profile object"),
                                           ("DIR", "is a directory")],
                         ids=["not-json", "not-an-object", "directory"])
def test_a_profile_that_is_not_one_is_one_line(content, says, tmp_path, capsys):
    profile = tmp_path / "p.json"
    if content == "DIR":
        profile.mkdir()
    else:
        profile.write_text(content)
    results = tmp_path / "r.jsonl"
    results.write_text(RECORD + "\n")
    for argv in (["predict", "--preset", "tiny-dense", "--plan", "tp_pp:2x1", "--cluster",
                  str(profile)],
                 ["report", str(results), "--fidelity", "--profile", str(profile)]):
        err = refused_line(argv, capsys)
        assert f"cluster profile {profile} {says}" in err


def test_bench_resume_with_a_malformed_out_is_one_line(tmp_path, no_launch, capsys):
    out = tmp_path / "b.jsonl"
    out.write_text(RECORD + "\nnot json\n")
    err = refused_line(TINY_BENCH + ["--resume", "--out", str(out)], capsys)
    assert f"{out}:2: not a JSON record" in err


def test_an_interrupted_run_keeps_its_finished_cases(tmp_path, monkeypatch, capsys):
    """run/verify --json append the cases that finished before a failure or a
    stop signal, and say so."""
    import json
    import signal

    from shardwise.runtime import launcher

    def launch(job, deadline_s=None, **kw):
        raise launcher.LaunchError("interrupted by SIGTERM: every rank was stopped",
                                   results=[{"plan": job.cases[0].plan, "ok": True}],
                                   signum=signal.SIGTERM)

    monkeypatch.setattr(launcher, "launch", launch)
    out = tmp_path / "run.jsonl"
    rc = cli.main(["run", "--preset", "tiny-dense", "--nproc", "2", "--plan", "tp_pp:2x1",
                   "--plan", "tp_pp:1x2", "--json", str(out)])
    assert rc == 128 + signal.SIGTERM
    printed = capsys.readouterr()
    assert printed.err.splitlines()[-2:] == [
        "shardwise: interrupted by SIGTERM: every rank was stopped",
        f"shardwise: the 1 finished case(s) above were appended to {out}"]
    assert "tp_pp:2x1" in printed.out  # the finished case's row
    assert [json.loads(x)["plan"] for x in out.read_text().splitlines()] == ["tp_pp:2x1"]


def test_far_more_cpu_ranks_than_cores_is_refused_with_a_count_that_works(no_launch, capsys):
    """``run --nproc 1000`` on CPU would start 1000 processes on a few cores: refused
    before launch, naming the most ranks this host takes, and that count passes."""
    import re

    err = refused_line(["run", "--preset", "tiny-dense", "--nproc", "1000"], capsys)
    assert "CPU ranks on" in err
    most = int(re.search(r"--nproc (\d+) or fewer", err).group(1))
    cli.check_ranks(most, "cpu")  # the suggestion is accepted
    with pytest.raises(ShardwiseError):
        cli.check_ranks(most + 1, "cpu")
