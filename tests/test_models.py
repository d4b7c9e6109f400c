"""Naming models: presets, the zoo of published architectures, config files
and checkpoints, through every command that takes ``--model``."""
from __future__ import annotations

import json
import os

import pytest

from shardwise.bench.records import read_records, record_spec
from shardwise.cli import main
from shardwise.models import resolve, zoo_config, zoo_names
from shardwise.spec import ModelSpec, ShardwiseError

# Published parameter counts (the model cards); the zoo's configs must give them
# within 0.5% (rounding in the published figure is up to ~0.1%).
PUBLISHED = {
    "llama-3.1-8b": 8.03e9, "llama-3.1-70b": 70.6e9, "llama-3.1-405b": 405.9e9,
    "mistral-7b": 7.24e9, "mixtral-8x7b": 46.7e9, "mixtral-8x22b": 140.6e9,
    "qwen2.5-72b": 72.7e9,
}

TINY_CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64,
    "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 128, "rms_norm_eps": 1e-5, "rope_theta": 5e5,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
    "torch_dtype": "bfloat16",
}


def test_zoo_has_the_published_architectures():
    assert set(PUBLISHED) <= set(zoo_names())
    for name in zoo_names():
        assert zoo_config(name)["_source"].startswith("https://huggingface.co/"), name


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_zoo_parameter_counts(name):
    spec = resolve(name).spec
    assert abs(spec.total_params() / PUBLISHED[name] - 1) <= 0.005, spec.total_params()


def test_zoo_features():
    llama = resolve("llama-3.1-8b").spec
    assert dict(llama.rope_scaling)["rope_type"] == "llama3" and llama.kv_heads == 8
    assert llama.norm == "rmsnorm" and llama.activation == "swiglu" and not llama.qkv_bias
    assert resolve("qwen2.5-72b").spec.qkv_bias
    mix = resolve("mixtral-8x22b").spec
    assert (mix.n_experts, mix.top_k, mix.vocab_size) == (8, 2, 32768)
    assert resolve("llama-3.1-405b").spec.kv_bytes_per_token() == 2 * 126 * 8 * 128 * 2


def test_resolve_every_kind(tmp_path):
    assert resolve("tiny-dense").kind == "preset"
    assert resolve("mistral-7b", layers=2).spec.n_layers == 2
    (tmp_path / "my-llama").mkdir()
    (tmp_path / "my-llama" / "config.json").write_text(json.dumps(TINY_CONFIG))
    by_dir, by_file = resolve(str(tmp_path / "my-llama")), resolve(
        str(tmp_path / "my-llama" / "config.json"))
    assert by_dir.kind == by_file.kind == "config" and by_dir.checkpoint is None
    assert by_dir.spec == by_file.spec and by_dir.spec.name == "my-llama"
    assert by_dir.spec.rope_scaling is not None
    # The complete description survives a record's JSON.
    spec = by_dir.spec
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


@pytest.mark.parametrize("text,needle", [
    ("no-such-model", "unknown model 'no-such-model'"),
    ("", "empty model name"),
])
def test_resolve_refuses(text, needle):
    with pytest.raises(ShardwiseError, match=needle):
        resolve(text)


def test_layers_is_checked():
    with pytest.raises(ShardwiseError, match="exceeds the 32 layers"):
        resolve("llama-3.1-8b", layers=33)
    with pytest.raises(ShardwiseError, match="must be >= 1"):
        resolve("llama-3.1-8b", layers=0)


def test_preset_and_model_together_are_refused(capsys):
    assert main(["predict", "--model", "tiny-dense", "--preset", "tiny-dense",
                 "--plan", "tp_pp:1x1"]) == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_plan_and_predict_every_zoo_model(name, capsys):
    # Eight of each model's layers on four of the cluster's GPUs: every
    # architecture's shapes through the planner, at a cost a test affords
    # (each candidate's ranks are recorded; sixteen ranks take about ten
    # times as long as four).
    some = ["--model", name, "--layers", "8", "--cluster", "h100-sxm-16", "--batch", "8",
            "--seq", "2048"]
    assert main(["plan", *some, "--ranks", "4", "--phase", "both"]) == 0
    out = capsys.readouterr().out
    assert "fits" in out and name in out
    best = next(line.split("│")[1].strip() for line in out.splitlines()
                if "│ fits" in line)
    assert main(["predict", *some, "--plan", best, "--ranks", "4"]) == 0
    out = capsys.readouterr().out
    assert "memory of the fullest rank" in out and "DOES NOT FIT" not in out
    # The whole model on the whole cluster: 8-way tensor parallel within a
    # node, a stage per node.
    assert main(["predict", "--model", name, "--plan", "tp_pp:8x2", "--cluster", "h100-sxm-16",
                 "--batch", "8", "--seq", "2048"]) == 0
    out = capsys.readouterr().out
    assert "memory of the fullest rank" in out and "DOES NOT FIT" not in out


def test_too_big_for_this_machine_is_refused_before_launch(capsys):
    assert main(["verify", "--model", "llama-3.1-70b", "--plan", "tp_pp:1x1",
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "--layers" in err and "Traceback" not in err


def test_config_only_model_benches_and_reports(tmp_path, capsys):
    """A config.json alone: bench on CPU, the record carries the whole model,
    --resume recognises it, and report --fidelity rebuilds it."""
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(TINY_CONFIG))
    out = tmp_path / "bench.jsonl"
    argv = ["bench", "--model", str(cfg), "--layers", "2", "--plan", "tp_pp:2x1",
            "--device", "cpu", "--batch", "2", "--seq", "16", "--iters", "2", "--warmup", "1",
            "--out", str(out)]
    assert main(argv) == 0
    records = read_records(str(out))
    assert {r["phase"] for r in records} == {"prefill", "decode"}
    spec = record_spec(records[0])
    assert spec.n_layers == 2 and spec.rope_scaling is not None and spec.kv_heads == 2
    assert records[0]["model_source"] == f"config:{cfg}" and records[0]["numerics_ok"]
    capsys.readouterr()
    assert main(argv + ["--resume"]) == 0
    assert "skipping tp_pp:2x1" in capsys.readouterr().err
    assert len(read_records(str(out))) == 2
    assert main(["report", "--fidelity", str(out), "--profile", "h100-sxm-8"]) == 0
    assert "tp_pp:2x1" in capsys.readouterr().out


def test_models_lists_zoo_and_presets(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("llama-3.1-405b", "qwen2.5-72b", "tiny-dense"):
        assert name in out


def test_plan_run_runs_the_best_plan(tmp_path, capsys):
    out = tmp_path / "run.jsonl"
    assert main(["plan", "--model", "tiny-dense", "--cluster", "h100-sxm-8", "--ranks", "2",
                 "--batch", "4", "--seq", "32", "--run", "--device", "cpu", "--iters", "2",
                 "--out", str(out)]) == 0
    text = capsys.readouterr()
    assert "running the best plan: shardwise bench --model tiny-dense" in text.err
    assert "run the best plan: shardwise bench --model tiny-dense" in text.out
    records = read_records(str(out))
    assert records and all(r["numerics_ok"] and r["n_devices"] == 2 for r in records)


def test_plan_run_names_the_cluster_command_when_it_needs_more_gpus(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert main(["plan", "--model", "llama-3.1-70b", "--layers", "2", "--cluster", "h100-sxm-16",
                 "--run", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "torchrun --nnodes 2 --nproc-per-node 8 -m shardwise bench --model llama-3.1-70b" in err
    assert "shardwise plan --model llama-3.1-70b --layers 2 --ranks 1 --cluster PROFILE" in err
