"""Greedy generation from Hugging Face checkpoints under every strategy (CPU, gloo).

For world sizes 1, 2 and 4, every plan that a landed strategy proposes (its
``candidates``) and that validates for the model is run in one launch per
world size, and must produce the same 16 tokens as transformers'
``generate(do_sample=False)``, with every step's logits within the fp32
tolerance of the single-device reference. New strategies are picked up through
``available_strategies()`` without editing this file.
"""
from __future__ import annotations

import pytest
import torch

from shardwise.model.checkpoint import checkpoint_spec
from shardwise.parallel.base import available_strategies, get_strategy, validate_plan
from shardwise.runtime.generate import Generation, generation_case
from shardwise.runtime.job import Case, Job
from shardwise.runtime.launcher import launch
from shardwise.spec import ShardwiseError, Workload
from hf_models import tiny_llama, tiny_mixtral

NEW_TOKENS = 16
# Four prompts of 8 tokens: batch 4 lets ep:4 give every rank a sequence, and
# 8 tokens split evenly into ring:4's zig-zag chunks (2 x 4).
PROMPTS = torch.randint(0, 128, (4, 8), generator=torch.Generator().manual_seed(3)).tolist()
WORLD_SIZES = (1, 2, 4)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (checkpoint directory, transformers' greedy tokens for PROMPTS)."""
    root = tmp_path_factory.mktemp("gen")
    out = {}
    for name, write in (("llama", tiny_llama), ("mixtral", tiny_mixtral)):
        hf = write(root / name)
        # Exactly NEW_TOKENS tokens: no early stop at an end-of-sequence token
        # (min_new_tokens would instead mask it out of the argmax).
        hf.generation_config.eos_token_id = None
        hf.generation_config.pad_token_id = 0
        ids = torch.tensor(PROMPTS)
        with torch.inference_mode():
            seqs = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=NEW_TOKENS)
        out[name] = (str(root / name), seqs[:, ids.shape[1]:].tolist())
    return out


def plans_for(spec, workload: Workload, world: int) -> list[str]:
    """Every plan the landed strategies propose for ``world`` ranks that validates."""
    plans, layerwise_shapes = [], set()
    for name in available_strategies():
        cands = get_strategy(name).candidates(spec, workload, world)
        if name == "layerwise":
            # Its candidates (cap=HBM, cap=L2) are read from a CUDA device; on
            # CPU give capacities in bytes and keep one per distinct partition
            # (whole model replicated, or cut into pipeline stages).
            cands = cands + [f"layerwise:cap={2 ** k}" for k in range(30, 14, -1)]
        for plan in cands:
            try:
                _, topo = validate_plan(spec, workload, plan, world)
            except ShardwiseError:
                continue
            if name == "layerwise":
                if topo.shape in layerwise_shapes:
                    continue
                layerwise_shapes.add(topo.shape)
            plans.append(plan)
    return plans


def _workload():
    return Generation.make(PROMPTS, NEW_TOKENS).workload()


def test_every_landed_strategy_is_exercised(models):
    """Guards the launch tests: each landed strategy yields at least one plan
    for these models at some world size (a strategy that validated nothing
    would otherwise go untested without a sound)."""
    covered = set()
    for path, _ in models.values():
        spec = checkpoint_spec(path)
        for world in WORLD_SIZES:
            covered |= {p.split(":")[0] for p in plans_for(spec, _workload(), world)}
    assert covered == set(available_strategies())


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_generation_matches_transformers(models, world):
    cases, expected = [], []
    for name, (path, tokens) in models.items():
        spec = checkpoint_spec(path)
        plans = plans_for(spec, _workload(), world)
        assert any(p.startswith("tp_pp:") for p in plans), plans
        for plan in plans:
            cases.append(generation_case(path, plan, PROMPTS, NEW_TOKENS))
            expected.append((name, plan, tokens))
    if world == 2:
        # The teacher-forced verification path (`verify` on a checkpoint).
        for name, (path, _) in models.items():
            spec = checkpoint_spec(path)
            cases.append(Case(spec, Workload(batch=2, seq_len=6, decode_steps=3), "tp_pp:2x1",
                              checkpoint=path))
    results = launch(Job(cases, world), deadline_s=600)
    assert len(results) == len(cases)
    for (name, plan, tokens), r in zip(expected, results):
        assert r["plan"] == plan
        assert r["tokens"] == tokens, f"{name} {plan}: {r['tokens']} != transformers' {tokens}"
        # fp32: a strategy only reorders additions (see runtime/job.py TOLERANCE).
        assert len(r["decode_rel_err"]) == NEW_TOKENS - 1
        assert r["ok"] and r["max_rel_err"] <= 1e-5, (name, plan, r["max_rel_err"])
    for r in results[len(expected):]:
        assert "tokens" not in r and r["ok"] and len(r["decode_rel_err"]) == 3, r


def test_generation_inputs_are_checked_before_launch(models):
    path, _ = models["llama"]
    with pytest.raises(ShardwiseError, match="different lengths"):
        generation_case(path, "tp_pp:1x1", [[1, 2, 3], [4, 5]], 4)
    with pytest.raises(ShardwiseError, match="outside the vocabulary"):
        generation_case(path, "tp_pp:1x1", [1, 2, 500], 4)
    with pytest.raises(ShardwiseError, match="max_new_tokens"):
        generation_case(path, "tp_pp:1x1", [1, 2, 3], 0)
    from shardwise.runtime.generate import generation_job

    with pytest.raises(ShardwiseError, match="n_heads"):
        generation_job(path, "tp_pp:3x1", [1, 2, 3], 4)


def test_cli_generate_and_verify_a_checkpoint(models, capsys):
    """The command line runs a checkpoint end to end: verify, then generate."""
    from shardwise import cli

    path, expected = models["llama"]
    assert cli.main(["verify", "--model", path, "--plan", "tp_pp:1x2", "--device", "cpu"]) == 0
    prompt = ",".join(map(str, PROMPTS[0]))
    assert cli.main(["generate", "--model", path, "--plan", "tp_pp:2x1", "--device", "cpu",
                     "--prompt-ids", prompt, "--max-new-tokens", str(NEW_TOKENS)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == ",".join(map(str, expected[0]))
    assert cli.main(["generate", "--model", path, "--plan", "tp_pp:1", "--prompt-ids", "1,x"]) == 2
