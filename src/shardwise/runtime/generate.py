"""Greedy generation from a checkpoint under any strategy.

Prefill the prompt, take the argmax of the last position's logits, feed that
token as the next decode step's input, and repeat until ``max_new_tokens``
tokens exist. Only rank 0 holds the global logits (``collect``), so rank 0
chooses each token and broadcasts it: every rank then feeds the same token,
whatever part of the model it holds.

A generation is an ordinary :class:`Case` whose ``generate`` field holds the
prompt and the number of new tokens; the engine builds the shard as for any
run (``engine.build``) and hands it to :func:`generate_case`. With ``verify``
rank 0 also replays the generated sequence through the single-device
reference and reports the relative error of every step's logits.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Sequence

import torch

from ..spec import ShardwiseError, Workload
from .job import Case, Job, tolerance


@dataclass(frozen=True)
class Generation:
    """What to generate: ``prompt_ids`` (one list of token ids per sequence,
    all the same length) and how many new tokens each sequence gets."""

    prompt_ids: tuple[tuple[int, ...], ...]
    max_new_tokens: int

    @classmethod
    def make(cls, prompt_ids: Sequence[int] | Sequence[Sequence[int]],
             max_new_tokens: int) -> "Generation":
        """Check the prompt's shape (a flat list is one sequence)."""
        rows = [prompt_ids] if prompt_ids and isinstance(prompt_ids[0], int) else prompt_ids
        rows = tuple(tuple(r) for r in rows)
        if not rows or not rows[0]:
            raise ShardwiseError("the prompt is empty; give at least one token id")
        if len({len(r) for r in rows}) > 1:
            raise ShardwiseError(
                f"prompts of different lengths {sorted({len(r) for r in rows})}: shardwise "
                f"generates for equal-length prompts (no padding); generate them separately")
        if any(not isinstance(t, int) or isinstance(t, bool) for r in rows for t in r):
            raise ShardwiseError("prompt token ids must be integers")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ShardwiseError(f"max_new_tokens must be >= 1 (got {max_new_tokens!r})")
        return cls(rows, max_new_tokens)

    def workload(self) -> Workload:
        """Prefill of the prompt, then one decode step per new token after the
        first (the first comes from the prefill's last position)."""
        steps = self.max_new_tokens - 1
        return Workload(batch=len(self.prompt_ids), seq_len=len(self.prompt_ids[0]),
                        phase="both" if steps else "prefill", decode_steps=steps)

    def to_dict(self) -> dict:
        return {"prompt_ids": [list(r) for r in self.prompt_ids],
                "max_new_tokens": self.max_new_tokens}

    @classmethod
    def from_dict(cls, d: dict) -> "Generation":
        return cls.make(d["prompt_ids"], d["max_new_tokens"])


def generation_case(checkpoint: str, plan: str, prompt_ids, max_new_tokens: int, *,
                    dtype: str | None = None, verify: bool = True) -> Case:
    """A case that generates from ``checkpoint``, validated before launch
    (checkpoint, token ids against the vocabulary, length against the model's
    attention window). The plan is checked by :func:`generation_job`."""
    from ..model.checkpoint import checkpoint_spec

    gen = Generation.make(prompt_ids, max_new_tokens)
    wl = gen.workload()
    spec = checkpoint_spec(checkpoint, wl, dtype)
    bad = sorted({t for r in gen.prompt_ids for t in r if not 0 <= t < spec.vocab_size})
    if bad:
        raise ShardwiseError(f"prompt token ids {bad[:5]} are outside the vocabulary "
                             f"(0..{spec.vocab_size - 1}) of {checkpoint}")
    return Case(spec, wl, plan, verify=verify, checkpoint=os.path.abspath(checkpoint),
                generate=gen.to_dict())


def generation_job(checkpoint: str, plan: str, prompt_ids, max_new_tokens: int,
                   nproc: int | None = None, device: str = "cpu", *, dtype: str | None = None,
                   verify: bool = True, timeout_s: float = 300.0) -> Job:
    """One generation case as a job, its plan validated for ``nproc`` ranks
    (None: the ranks the plan implies)."""
    from ..parallel.base import validate_plan

    case = generation_case(checkpoint, plan, prompt_ids, max_new_tokens, dtype=dtype,
                           verify=verify)
    _, topo = validate_plan(case.model, case.workload, plan, nproc)
    return Job([case], topo.world_size, device, timeout_s=timeout_s)


def generate_command(model_path: str, plan: str, prompt_ids: Sequence[int],
                     max_new_tokens: int, nproc: int | None = None, device: str = "cpu", *,
                     dtype: str | None = None, verify: bool = True,
                     deadline_s: float | None = None) -> list[int]:
    """Launch the ranks, generate greedily for one prompt, return the new token ids.

    Raises :class:`ShardwiseError` before launch on a bad checkpoint, prompt or
    plan, and when ``verify`` finds the strategy's logits off the reference.
    """
    from .launcher import launch

    if not all(isinstance(t, int) for t in prompt_ids):
        raise ShardwiseError("generate_command takes one prompt, a flat list of token ids")
    job = generation_job(model_path, plan, prompt_ids, max_new_tokens, nproc, device,
                         dtype=dtype, verify=verify)
    (record,) = launch(job, deadline_s=deadline_s)
    if verify and not record["ok"]:
        raise ShardwiseError(
            f"plan {plan}: logits differ from the single-device reference (max relative error "
            f"{record['max_rel_err']:.2e} > {record['tolerance']:.0e}); the tokens are not "
            f"trustworthy")
    return record["tokens"][0]


def generate_case(case: Case, comm, model, source, dtype: torch.dtype, rank: int,
                  device: torch.device, log=print) -> list[dict]:
    """Run on every rank with this rank's shard ``model`` (from ``engine.build``);
    rank 0 returns one record with the tokens, the others an empty list."""
    from .engine import _sync, _verify

    gen = Generation.from_dict(case.generate)
    B, L = len(gen.prompt_ids), len(gen.prompt_ids[0])
    prompt = torch.tensor(gen.prompt_ids, dtype=torch.long, device=device)  # [B, L]
    fed: list[torch.Tensor] = []  # the decode inputs, [B, 1] each
    new: list[torch.Tensor] = []  # every generated token, [B, 1] each
    logits: list[torch.Tensor] = []  # rank 0: what each step returned, [B, T, V]
    times = []
    x, pos = prompt, 0
    for _ in range(gen.max_new_tokens):
        t0 = time.perf_counter()
        out = model.collect(model.step(x, pos))
        token = torch.empty((B, 1), dtype=torch.long, device=device)
        if rank == 0:
            token.copy_(out[:, -1:].argmax(dim=-1))
            logits.append(out)
        # Rank 0 decides and every rank follows: even a one-ulp difference in
        # another rank's view of the logits must not fork the sequences.
        comm.broadcast(token, 0)
        _sync(device)
        times.append(time.perf_counter() - t0)
        new.append(token)
        pos += x.shape[1]
        x = token
        fed.append(token)
    fed.pop()  # the last token is returned, never fed
    if rank != 0:
        return []
    spec = case.model
    record = {
        "model": spec.name, "checkpoint": case.checkpoint, "plan": case.plan,
        "world_size": comm.topo.world_size, "device_type": device.type, "dtype": spec.dtype,
        "batch": B, "seq_len": L, "decode_steps": len(fed), "max_new_tokens": gen.max_new_tokens,
        "tokens": torch.cat(new, dim=1).tolist(),
        # Wall time of each step as generation sees it: step, collect and broadcast.
        "prefill_s": times[0], "decode_step_ms": [1e3 * t for t in times[1:]],
        "report": model.report(),
    }
    if case.verify:
        log(f"  verifying {case.plan}'s logits at every step against the reference ...")
        errs, _ = _verify(case, source, dtype, device, prompt, fed, logits)
        tol = tolerance(spec.dtype)
        record.update(prefill_rel_err=errs[0], decode_rel_err=errs[1:], max_rel_err=max(errs),
                      tolerance=tol,
                      ok=bool(max(errs) <= tol and all(math.isfinite(e) for e in errs)))
    return [record]
