"""The peers the benchmarks compare against (PyTorch's plainly written model,
its DTensor tensor parallel and context parallel, Hugging Face's model class):
same numerics as the reference on every architecture shardwise reads, and
clear refusals where they do not apply."""
import subprocess
import sys

import pytest
import torch

from helpers import assert_verified, shared_plans
from hf_models import ARCHITECTURES, LLAMA3_ROPE, write_checkpoint
from shardwise.bench.hf_peer import HFModel, hf_config
from shardwise.bench.peers import TorchCP, TorchEager, TorchTP
from shardwise.model.checkpoint import CheckpointSource, checkpoint_spec, spec_from_config
from shardwise.model.load import ShardLoader
from shardwise.model.weights import WeightSource
from shardwise.parallel.registry import validate_plan
from shardwise.parallel.topology import Topology
from shardwise.perf.events import SYNC_OPS
from shardwise.presets import get_preset
from shardwise.runtime.job import Case, Job
from shardwise.runtime.launcher import launch
from shardwise.spec import ModelSpec, Plan, ShardwiseError, Workload

# A Llama-style model no checkpoint gives: synthetic weights, Llama 3.1 rope
# scaling, and a head_dim that is not d_model / n_heads.
LLAMA_STYLE = ModelSpec("llama-style", n_layers=2, d_model=64, n_heads=4, head_dim=24, d_ff=96,
                        n_kv_heads=2, dtype="fp32", norm="rmsnorm", activation="swiglu",
                        vocab_size=128, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)
WORKLOAD = Workload(batch=2, seq_len=12, decode_steps=3)


@pytest.fixture(scope="module")
def architectures(tmp_path_factory):
    """name -> (spec, checkpoint directory or None) for every architecture
    shardwise reads, and the synthetic Llama-style model."""
    root = tmp_path_factory.mktemp("peers")
    out = {"llama-style": (LLAMA_STYLE, None)}
    for name in sorted(ARCHITECTURES):
        write_checkpoint(name, root / name, with_tokenizer=False)
        out[name] = (checkpoint_spec(str(root / name)), str(root / name))
    return out


def _run(architectures, plans, world, static_decode=False):
    cases = [Case(spec, WORKLOAD, p, checkpoint=path)
             for spec, path in architectures.values() for p in plans]
    results = launch(Job(cases, world, static_decode=static_decode), deadline_s=600)
    for plan_results in (results[i::len(plans)] for i in range(len(plans))):
        assert_verified(plan_results, [plan_results[0]["plan"]] * len(architectures))
    return results


@pytest.mark.parametrize("static_decode", [False, True])
def test_single_device_peers_verify_on_every_architecture(architectures, static_decode):
    """torch_eager and Hugging Face's class (static and dynamic cache), fp32
    within 1e-5 of the reference, prefill and decode; with --static-decode
    the decode position is a 0-d tensor wherever the peer claims graphs."""
    plans = ["torch_eager:1", "hf:1", "hf:1,cache=dynamic"]
    results = _run(architectures, plans, 1, static_decode)
    for r, (name, p) in zip(results, [(n, p) for n in architectures for p in plans]):
        moe = architectures[name][0].is_moe
        graphs = p != "hf:1,cache=dynamic" and not moe
        assert r["static_decode"] == (static_decode and graphs), (name, p)
        if p.startswith("hf"):
            assert r["report"]["cache"] == ("dynamic" if "dynamic" in p else "static")
            assert r["report"]["hf_class"] == ("MixtralForCausalLM" if moe else
                                               "Qwen2ForCausalLM" if name == "qwen2" else
                                               "LlamaForCausalLM")


def test_dtensor_peer_verifies_on_every_architecture(architectures):
    _run(architectures, ["torch_tp:2"], 2)


def _host_reads(model, x, pos) -> list[str]:
    """The ops of one step that make the host wait for the device (a CUDA
    graph cannot hold them): the recorder's SYNC_OPS, and ``torch.where`` with
    one argument (a nonzero under another name)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in SYNC_OPS or (name == "where" and len(args) == 1):
                seen.append(name)
            return func(*args, **(kwargs or {}))

    with Watch():
        model.step(x, pos)
    return seen


@pytest.mark.parametrize("peer", [TorchEager, HFModel])
def test_graph_steps_do_not_wait_for_the_device(architectures, peer):
    """A peer that claims CUDA graphs decodes at a device-tensor position
    without reading the device on the host; one that does not (MoE) does."""
    for name, (spec, path) in architectures.items():
        source = CheckpointSource(path) if path else WeightSource(spec)
        plan = Plan.parse(f"{peer.name}:1")
        with torch.inference_mode():
            model = peer(spec, WORKLOAD, plan, Topology(("tp",), (1,)), None,
                         ShardLoader(source, torch.float32, "cpu"))
            model.step(torch.randint(0, 128, (2, WORKLOAD.seq_len)), 0)
            pos = torch.tensor(WORKLOAD.seq_len)
            reads = _host_reads(model, torch.randint(0, 128, (2, 1)),
                                pos if model.supports_graphs else WORKLOAD.seq_len)
        assert model.supports_graphs == (not spec.is_moe), name
        if model.supports_graphs:
            assert reads == [], (name, reads)
        elif peer is TorchEager:  # its expert loop asks which tokens each expert got
            assert "where" in reads, name


def test_hf_config_is_the_inverse_of_reading_one(architectures):
    for name, (spec, _) in architectures.items():
        config = hf_config(spec).to_dict()
        back, _ = spec_from_config(config, name, spec.name, spec.dtype)
        assert back == spec, name


def test_peer_refusals():
    wl = Workload(batch=2, seq_len=8)
    for plan, why in [("hf:1", "no Hugging Face equivalent"), ("hf:2", "one device"),
                      ("hf:1,cache=paged", "cache=static|dynamic"),
                      ("torch_eager:2", "one device")]:
        with pytest.raises(ShardwiseError, match=why):
            validate_plan(get_preset("tiny-dense").model if "equivalent" in why else LLAMA_STYLE,
                          wl, plan)
    assert validate_plan(LLAMA_STYLE, wl, "hf")[1].world_size == 1
    with pytest.raises(ShardwiseError, match="vocab_size"):
        validate_plan(LLAMA_STYLE.replace(vocab_size=129), wl, "torch_tp:2")
    assert TorchTP.validate(LLAMA_STYLE, wl, Plan.parse("torch_tp:2"), 2)


def test_hf_peer_needs_transformers(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    with pytest.raises(ShardwiseError, match="pip install transformers"):
        validate_plan(LLAMA_STYLE, Workload(batch=2, seq_len=8), "hf:1")


# Registered at import: each runs in the launch of its world size shared with
# other modules' cases (helpers.SharedLaunch).
TORCH_TP_RUN = shared_plans("tiny-dense", ["torch_tp:2"], 2)
TORCH_EAGER_RUN = shared_plans("tiny-dense", ["torch_eager:1"], 1)


def test_eager_and_dtensor_peers_match_reference():
    assert_verified(TORCH_TP_RUN.results(), ["torch_tp:2"])
    assert_verified(TORCH_EAGER_RUN.results(), ["torch_eager:1"])


def test_context_parallel_peer_refusals():
    spec = get_preset("tiny-dense").model
    with pytest.raises(ShardwiseError, match="multiple of 4"):
        TorchCP.validate(spec, Workload(batch=2, seq_len=30), Plan.parse("torch_cp:2"), 2)
    assert TorchCP.validate(spec, Workload(batch=2, seq_len=32), Plan.parse("torch_cp:2"), 2)
    with pytest.raises(ShardwiseError, match="without rotary embeddings"):
        TorchCP.validate(LLAMA_STYLE, Workload(batch=2, seq_len=32), Plan.parse("torch_cp:2"), 2)
    # Prefill only, on GPUs: refused before any process starts.
    for args, why in [(["bench", "--phase", "prefill"], "needs CUDA"),
                      (["verify"], "needs CUDA")]:
        p = subprocess.run([sys.executable, "-m", "shardwise", *args, "--preset", "tiny-dense",
                            "--device", "cpu", "--plan", "torch_cp:2"],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode != 0 and why in p.stderr, p.stderr
    from shardwise.cli import check_peer
    with pytest.raises(ShardwiseError, match="prefill only"):
        check_peer(TorchCP, "torch_cp:2", "cuda", "both")
    check_peer(TorchCP, "torch_cp:2", "cuda", "prefill")


def test_context_parallel_peer_builds_without_a_cache():
    # Construction is what the engine does on every rank before the first
    # step (the forward itself needs CUDA): one gloo rank, in a subprocess.
    code = """
import os, torch, torch.distributed as dist
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000))
dist.init_process_group("gloo", rank=0, world_size=1)
from shardwise.presets import get_preset
from shardwise.runtime.engine import build
from shardwise.runtime.job import Case
from shardwise.spec import Workload
spec = get_preset("tiny-dense").model
plan, comm, model, source, dtype = build(Case(spec, Workload(batch=2, seq_len=8), "torch_cp:1"),
                                         0, 1, torch.device("cpu"))
assert model.caches == [] and len(model.layers) == spec.n_layers
assert sum(c.nbytes() for c in model.caches) == 0
print("built")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "built" in p.stdout, p.stderr[-2000:]


def test_hf_peer_seeks_back_after_untimed_replays(architectures):
    """A captured step of the Hugging Face class writes where its static
    cache's device counter says and moves it on (transformers >= 5), so the
    steps bench runs untimed before the timed ones (``--settle``) leave it
    ahead; ``seek`` moves it back and the next step decodes as the first."""
    spec, path = architectures["llama"]
    with torch.inference_mode():
        model = HFModel(spec, WORKLOAD, Plan.parse("hf:1"), Topology(("tp",), (1,)), None,
                        ShardLoader(CheckpointSource(path), torch.float32, "cpu"))
        model.step(torch.randint(0, 128, (2, WORKLOAD.seq_len)), 0)
        token, at = torch.randint(0, 128, (2, 1)), torch.tensor(WORKLOAD.seq_len)
        first = model.step(token, at).clone()
        model.step(token, at)  # where a replay left the counter: one position on
        assert not torch.allclose(model.step(token, at), first)
        model.seek(WORKLOAD.seq_len)
        assert torch.equal(model.step(token, at), first)
