"""The PyTorch peers the benchmarks compare against: same numerics as the
reference, and clear refusals where they do not apply."""
import subprocess
import sys

import pytest

from helpers import assert_verified, run_plans
from shardwise.bench.peers import TorchCP
from shardwise.presets import get_preset
from shardwise.spec import Plan, ShardwiseError, Workload


def test_eager_and_dtensor_peers_match_reference():
    assert_verified(run_plans("tiny-dense", ["torch_tp:2"], 2), ["torch_tp:2"])
    assert_verified(run_plans("tiny-dense", ["torch_eager:1"], 1), ["torch_eager:1"])


def test_context_parallel_peer_refusals():
    spec = get_preset("tiny-dense").model
    with pytest.raises(ShardwiseError, match="multiple of 4"):
        TorchCP.validate(spec, Workload(batch=2, seq_len=30), Plan.parse("torch_cp:2"), 2)
    assert TorchCP.validate(spec, Workload(batch=2, seq_len=32), Plan.parse("torch_cp:2"), 2)
    with pytest.raises(ShardwiseError, match="dense GELU"):
        TorchCP.validate(get_preset("tiny-moe").model, Workload(batch=2, seq_len=32),
                         Plan.parse("torch_cp:2"), 2)
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
