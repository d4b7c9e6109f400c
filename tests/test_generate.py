"""Generation from Hugging Face checkpoints under every strategy (CPU, gloo).

For each architecture (Llama, Llama 3.1's rope scaling, Mistral, Mixtral,
Qwen2), ``shardwise generate --prompt`` runs every plan that a landed strategy
proposes (its ``candidates``) at world sizes 1, 2 and 4 (one launch per world
size), through the checkpoint's own tokenizer, and must produce the tokens of
transformers' ``generate(do_sample=False)`` for the same prompts, stopping
each sequence where transformers stops it, with every step's logits within
the fp32 tolerance of the single-device reference. New strategies are picked
up through ``available_strategies()`` without editing this file.
"""
from __future__ import annotations

import json

import pytest
import torch
import transformers

from hf_models import ARCHITECTURES, write_checkpoint
from shardwise import cli
from shardwise.model.checkpoint import checkpoint_spec
from shardwise.parallel.registry import available_strategies, get_strategy, validate_plan
from shardwise.runtime.generate import (Generation, TextStream, choose_tokens, eos_token_ids,
                                        generation_cases, generation_jobs)
from shardwise.spec import ShardwiseError, Workload

NEW_TOKENS = 10
WORLD_SIZES = (1, 2, 4)
# Texts from the tokenizer's corpus; each model's tokenizer is trained anew, so
# the four prompts of one token length are picked when it is known. Four
# sequences let ep:4 give every rank one.
CANDIDATES = ["experts spread", "heads and layers", "many devices", "the lazy dog",
              "the ranks", "a pipeline", "tokens travel", "a part of it", "hello world",
              "keys and values", "the brown dog", "a ring of keys", "over the ring",
              "tensor splits", "each one computes", "the quick fox", "a model is cut",
              "the lazy fox", "many heads", "the keys"]


def hf_greedy(hf, ids: list[list[int]], eos: list[int], n: int = NEW_TOKENS) -> list[list[int]]:
    """transformers' greedy tokens for equal-length prompts, each sequence cut
    after its first end-of-sequence token (transformers pads past it)."""
    x = torch.tensor(ids)
    with torch.inference_mode():
        seqs = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False,
                           max_new_tokens=n, eos_token_id=eos or None, pad_token_id=0)
    out = []
    for row in seqs[:, x.shape[1]:].tolist():
        end = next((i for i, t in enumerate(row) if t in eos), None)
        out.append(row if end is None else row[:end + 1])
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (checkpoint, prompts, their ids, end-of-sequence ids, transformers' tokens).

    Each checkpoint's generation_config.json adds, beside the tokenizer's
    ``</s>``, an end-of-sequence token that transformers' greedy continuation
    of the first prompt produces midway: that sequence stops early, the
    others run on, as in transformers."""
    root = tmp_path_factory.mktemp("gen")
    out = {}
    for name in sorted(ARCHITECTURES):
        path = str(root / name)
        hf = write_checkpoint(name, path)
        tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        by_len: dict[int, list[str]] = {}
        for text in CANDIDATES:
            by_len.setdefault(len(tok(text).input_ids), []).append(text)
        prompts = max(by_len.values(), key=len)[:4]
        assert len(prompts) == 4, by_len  # four prompts of one length (see CANDIDATES)
        ids = [tok(p).input_ids for p in prompts]
        free = hf_greedy(hf, ids, [])
        stop = free[0][NEW_TOKENS // 2]
        hf.generation_config.eos_token_id = [tok.eos_token_id, stop]
        hf.generation_config.save_pretrained(path)
        eos = list(eos_token_ids(path, tok))
        assert eos == sorted({tok.eos_token_id, stop})
        want = hf_greedy(hf, ids, eos)
        assert len(want[0]) <= NEW_TOKENS // 2 + 1 and want[0][-1] in eos
        out[name] = (path, prompts, ids, eos, want, hf)
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


def _workload(ids):
    return Generation.make(ids, NEW_TOKENS).workload()


def _generate(tmp_path, capfd, args: list[str]) -> tuple[list[dict], str]:
    """``shardwise generate ARGS --json F``, which must succeed: its records and its stdout."""
    out = tmp_path / f"gen{len(list(tmp_path.iterdir()))}.jsonl"
    rc = cli.main(["generate", "--device", "cpu", *args, "--json", str(out)])
    text, err = capfd.readouterr()
    assert rc == 0, err
    return [json.loads(line) for line in out.read_text().splitlines()], text


def test_every_landed_strategy_is_exercised(models):
    """Guards the sweep: each landed strategy yields at least one plan for
    these models at some world size (a strategy that validated nothing would
    otherwise go untested without a sound)."""
    covered = {p.split(":")[0] for path, _, ids, *_ in models.values() for world in WORLD_SIZES
               for p in plans_for(checkpoint_spec(path), _workload(ids), world)}
    assert covered == set(available_strategies())


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_text_generation_matches_transformers(models, name, tmp_path, capfd):
    path, prompts, ids, eos, want, _ = models[name]
    spec = checkpoint_spec(path)
    for world in WORLD_SIZES:
        plans = plans_for(spec, _workload(ids), world)
        assert any(p.startswith("tp_pp:") for p in plans), plans
        args = ["--model", path, "--nproc", str(world), "--max-new-tokens", str(NEW_TOKENS)]
        for p in plans:
            args += ["--plan", p]
        for p in prompts:
            args += ["--prompt", p]
        records, out = _generate(tmp_path, capfd, args)  # one launch: every plan of this world
        assert [r["plan"] for r in records] == plans
        for r in records:
            assert r["prompts"] == prompts and r["prompt_ids"] == ids and r["eos_ids"] == eos
            assert r["tokens"] == want, f"{name} {r['plan']}: {r['tokens']} != transformers' {want}"
            assert r["finish_reason"] == ["eos" if t[-1] in eos else "length" for t in want]
            # fp32: a strategy only reorders additions (see runtime/job.py TOLERANCE).
            assert r["ok"] and r["max_rel_err"] <= 1e-5, (r["plan"], r["max_rel_err"])
            # The batch decodes until its last sequence ends.
            (batch,) = r["batches"]
            assert batch["decode_steps"] == max(map(len, want)) - 1
            # Each sequence's line, printed when it ended: its prompt and new text.
            for i, (prompt, text) in enumerate(zip(prompts, r["text"])):
                assert f"[{i}] {prompt}{text}\n" in out


def test_unverified_generation_keeps_the_last_position(models, tmp_path, capfd):
    """Unverified, a pipeline's prefill keeps only each sequence's last
    position (the next token; under ring, on the sequence shard that holds
    it): the tokens are still transformers'."""
    path, prompts, ids, eos, want, _ = models["llama"]
    args = ["--model", path, "--nproc", "2", "--no-verify", "--max-new-tokens", str(NEW_TOKENS),
            "--plan", "ring:2,mb=2", "--plan", "tp_pp:1x2,mb=2"]
    for p in prompts:
        args += ["--prompt", p]
    records, _ = _generate(tmp_path, capfd, args)
    assert [r["tokens"] for r in records] == [want, want]


def test_text_streams_and_stops(models, tmp_path, capfd):
    """One prompt streams; the whole batch stops at its end-of-sequence token;
    prompts of different lengths run as separate batches and come back in order."""
    path, prompts, ids, eos, want, hf = models["llama"]
    (r,), out = _generate(tmp_path, capfd, ["--model", path, "--plan", "tp_pp:2x1",
                                            "--prompt", prompts[0]])
    assert r["tokens"] == [want[0]] and r["finish_reason"] == ["eos"]
    assert r["batches"][0]["decode_steps"] == len(want[0]) - 1 < NEW_TOKENS - 1
    assert out == prompts[0] + r["text"][0] + "\n"
    texts = [prompts[0], "a", prompts[1] + " and more"]
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    lengths = [len(tok(t).input_ids) for t in texts]
    assert len(set(lengths)) == 3, lengths
    (r,), out = _generate(tmp_path, capfd, ["--model", path, "--plan", "ring:2",
                                            "--max-new-tokens", "6", "--ignore-eos",
                                            *[a for t in texts for a in ("--prompt", t)]])
    assert [b["index"] for b in r["batches"]] == [[0], [1], [2]]
    for i, t in enumerate(texts):
        assert r["tokens"][i] == hf_greedy(hf, [tok(t).input_ids], [], 6)[0]
        assert f"[{i}] {t}{r['text'][i]}\n" in out


def test_tokens_reach_the_launcher_as_they_come(models):
    """The launcher hands on rank 0's tokens while the ranks run: a job whose
    rank 1 fails midway has already delivered the steps before the failure."""
    from shardwise.runtime.launcher import LaunchError, launch

    path, prompts, ids, *_ = models["llama"]
    (job,) = generation_jobs(path, ["tp_pp:2x1"], ids[:1], NEW_TOKENS, stream=True)
    job.fault = "1:collective=20"  # tp_pp:2x1 makes 5 collective calls a step
    messages = []
    with pytest.raises(LaunchError, match="injected fault on rank 1"):
        launch(job, deadline_s=300, on_stream=messages.append)
    assert messages[0] == {"start": job.cases[0].generate}
    steps = [m for m in messages if "tokens" in m]
    assert 1 <= len(steps) < NEW_TOKENS and "end" not in messages[-1]


def test_sampling_is_reproducible_across_plans(models, tmp_path, capfd):
    """One seed, one sample, whatever the plan and the number of ranks (two
    launches); another seed, another sample; neither is the greedy one."""
    path, prompts, ids, _, _, hf = models["mixtral"]
    base = ["--model", path, "--temperature", "2.0", "--top-p", "0.95", "--ignore-eos",
            "--prompt", prompts[0], "--prompt", prompts[1]]
    plans = ["--plan", "tp_pp:1x1", "--plan", "ep:2", "--plan", "helix:2x1"]
    records, _ = _generate(tmp_path, capfd, [*base, *plans, "--seed", "3"])
    assert len(records) == 3 and all(r["ok"] for r in records)
    sample = records[0]["tokens"]
    assert all(r["tokens"] == sample for r in records)
    (other,), _ = _generate(tmp_path, capfd, [*base, "--plan", "tp_pp:1x1", "--seed", "4"])
    assert other["tokens"] != sample and hf_greedy(hf, ids[:2], []) != sample


def test_choose_tokens():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    assert choose_tokens(logits, 0.0, 1.0, torch.zeros(2)).tolist() == [1, 0]
    # Inverse CDF over tokens sorted by probability: a draw of 0 takes the
    # most likely, a draw of 1 the least likely still in the nucleus.
    assert choose_tokens(logits, 1.0, 1.0, torch.tensor([0.0, 0.0])).tolist() == [1, 0]
    assert choose_tokens(logits, 1.0, 1.0, torch.tensor([1.0, 1.0])).tolist() == [0, 3]
    # top_p 0.5: row 0 keeps only token 1 (p = 0.64), row 1 only token 0.
    assert choose_tokens(logits, 1.0, 0.5, torch.tensor([0.99, 0.99])).tolist() == [1, 0]
    # The frequencies follow the softmax.
    draws = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    picks = choose_tokens(logits[:1].expand(20000, 4), 1.0, 1.0, draws)
    freq = torch.bincount(picks, minlength=4).double() / 20000
    assert torch.allclose(freq, torch.softmax(logits[0].double(), 0), atol=0.01)


def test_text_stream_pieces_add_up(models):
    """The streamed pieces are exactly the text the new tokens add to the prompt's."""
    path, _, ids, *_ = models["qwen2"]
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    new = torch.randint(3, 128, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    stream = TextStream(tok, ids[0])
    pieces = [stream.push(t) for t in new] + [stream.close()]
    full = tok.decode(ids[0] + new, skip_special_tokens=True)
    assert "".join(pieces) == full[len(tok.decode(ids[0], skip_special_tokens=True)):]
    assert sum(p != "" for p in pieces) > 5  # it streamed, not all at the end


def test_generation_inputs_are_checked_before_launch(models, tmp_path, capsys):
    path, *_ = models["llama"]
    with pytest.raises(ShardwiseError, match="outside the vocabulary"):
        generation_cases(path, "tp_pp:1x1", [1, 2, 500], 4)
    with pytest.raises(ShardwiseError, match="max_new_tokens"):
        generation_cases(path, "tp_pp:1x1", [1, 2, 3], 0)
    with pytest.raises(ShardwiseError, match="top-p applies to sampling"):
        generation_cases(path, "tp_pp:1x1", [1, 2, 3], 4, top_p=0.5)
    with pytest.raises(ShardwiseError, match="n_heads"):
        generation_jobs(path, ["tp_pp:3x1"], [1, 2, 3], 4)
    # Different lengths are separate batches, each validated.
    assert [c.workload.seq_len for c in generation_cases(path, "tp_pp:1x1", [[1, 2, 3], [4, 5]], 4)] == [3, 2]
    bare = tmp_path / "bare"
    write_checkpoint("llama", bare, with_tokenizer=False)
    capsys.readouterr()
    assert cli.main(["generate", "--model", str(bare), "--plan", "tp_pp:1x1",
                     "--prompt", "hello"]) == 2
    err = capsys.readouterr().err
    assert "no tokenizer files" in err and "--prompt-ids" in err and len(err.splitlines()) == 1
    assert cli.main(["generate", "--model", path, "--plan", "tp_pp:1", "--prompt-ids", "1,x"]) == 2


def test_cli_generate_ids_and_verify_a_checkpoint(models, capfd):
    """The command line runs a checkpoint end to end: verify, then generate from ids."""
    path, _, ids, _, _, hf = models["llama"]
    assert cli.main(["verify", "--model", path, "--plan", "tp_pp:1x2", "--device", "cpu"]) == 0
    capfd.readouterr()
    assert cli.main(["generate", "--model", path, "--plan", "tp_pp:2x1", "--device", "cpu",
                     "--prompt-ids", ",".join(map(str, ids[0])), "--ignore-eos",
                     "--max-new-tokens", str(NEW_TOKENS)]) == 0
    out = capfd.readouterr().out.strip().splitlines()
    assert out == [",".join(map(str, hf_greedy(hf, ids[:1], [])[0]))]
