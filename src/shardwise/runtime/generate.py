"""Generation from a checkpoint under any strategy: text in, text out, streamed.

Prefill the prompt, choose a token from the last position's logits, feed it as
the next decode step's input, and repeat until every sequence has produced an
end-of-sequence token or ``max_new_tokens`` tokens. Only rank 0 holds the
global logits (``collect``), so rank 0 chooses each token and broadcasts it:
every rank then feeds the same token, whatever part of the model it holds
(even a one-ulp difference in another rank's view of the logits must not fork
the sequences). Each rank tests the broadcast tokens for an end of sequence,
so all agree on when the batch stops without another message.

Choosing is greedy (argmax) by default. Sampling (``temperature > 0``, with
nucleus ``top_p``) is also done by rank 0 alone, by inverting the cumulative
distribution at a uniform draw. The draws are a ``[prompts, max_new_tokens]``
table from a CPU generator seeded with ``seed``: the same on any device and
under any plan, and a prompt's draws do not depend on what else is in its
batch, so one seed gives one sample whatever the plan (plans' logits differ
by rounding only, which moves a draw across a token boundary with
probability ~1e-7 a step).

A causal model run without attention masks cannot pad: a left-padded prompt
would attend to its pads. So prompts are grouped by length and each group is
generated as its own batch (its own :class:`Case`, run by the same ranks one
after the other); the records are merged back into the prompts' order.

With a tokenizer, the text streams: after each step rank 0 sends the new
tokens to the launcher (a line in a file the launcher follows as it polls
the ranks; :func:`emitter`), which holds the tokenizer, decodes incrementally
and prints the text (:class:`Printer`). So no rank loads a tokenizer, and the
command's standard output is the text alone (the ranks' progress goes to
standard error). With ``verify`` rank 0 also replays the
generated sequences through the single-device reference and reports the
relative error of every step's logits.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Sequence

import torch

from ..spec import ShardwiseError, Workload
from .job import Case, Job, tolerance

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Tokens before the first new one that incremental decoding reads for context
# (a SentencePiece word's leading space depends on what precedes it).
CONTEXT_TOKENS = 5


@dataclass(frozen=True)
class Generation:
    """What one case generates: ``prompt_ids`` (one list of token ids per
    sequence, all the same length), up to ``max_new_tokens`` tokens each,
    ending a sequence at any of ``eos_ids``. ``index`` places each sequence
    among the ``n_prompts`` prompts of the whole command (labels, sampling
    draws). ``stream``: rank 0 sends the tokens out as they come, to be
    printed as text (:func:`emitter`)."""

    prompt_ids: tuple[tuple[int, ...], ...]
    max_new_tokens: int
    eos_ids: tuple[int, ...] = ()
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    seed: int = 0
    index: tuple[int, ...] = ()
    n_prompts: int = 0
    stream: bool = False

    def __post_init__(self):
        rows = tuple(tuple(r) for r in self.prompt_ids)
        object.__setattr__(self, "prompt_ids", rows)
        object.__setattr__(self, "eos_ids", tuple(self.eos_ids))
        object.__setattr__(self, "index", tuple(self.index) or tuple(range(len(rows))))
        object.__setattr__(self, "n_prompts", self.n_prompts or len(rows))
        if not rows or not all(rows):
            raise ShardwiseError("a prompt is empty; give at least one token")
        if len({len(r) for r in rows}) > 1:
            raise ShardwiseError(
                f"prompts of different lengths {sorted({len(r) for r in rows})} in one batch; "
                f"generation_cases groups them by length")
        if any(not isinstance(t, int) or isinstance(t, bool) for r in rows for t in r):
            raise ShardwiseError("prompt token ids must be integers")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ShardwiseError(f"max_new_tokens must be >= 1 (got {self.max_new_tokens!r})")
        check_sampling(self.temperature, self.top_p)

    @classmethod
    def make(cls, prompt_ids: Sequence[int] | Sequence[Sequence[int]], max_new_tokens: int,
             **kw) -> "Generation":
        return cls(_rows(prompt_ids), max_new_tokens, **kw)

    def workload(self) -> Workload:
        """Prefill of the prompt, then one decode step per new token after the
        first (the first comes from the prefill's last position)."""
        steps = self.max_new_tokens - 1
        return Workload(batch=len(self.prompt_ids), seq_len=len(self.prompt_ids[0]),
                        phase="both" if steps else "prefill", decode_steps=steps)

    def draws(self) -> torch.Tensor:
        """This batch's rows of the uniform draws, ``[B, max_new_tokens]`` float64 (CPU)."""
        g = torch.Generator().manual_seed(self.seed)
        table = torch.rand(self.n_prompts, self.max_new_tokens, generator=g, dtype=torch.float64)
        return table[list(self.index)]

    def to_dict(self) -> dict:
        """JSON-ready (lists, not tuples)."""
        return {**asdict(self), "prompt_ids": [list(r) for r in self.prompt_ids],
                "eos_ids": list(self.eos_ids), "index": list(self.index)}

    @classmethod
    def from_dict(cls, d: dict) -> "Generation":
        return cls(**d)


def _rows(prompt_ids) -> list[list[int]]:
    """One list of ids per prompt (a flat list is one prompt)."""
    if prompt_ids and isinstance(prompt_ids[0], int):
        return [list(prompt_ids)]
    return [list(r) for r in prompt_ids]


def check_sampling(temperature: float, top_p: float) -> None:
    if not temperature >= 0 or not math.isfinite(temperature):
        raise ShardwiseError(f"temperature must be >= 0 (got {temperature}); 0 is greedy")
    if not 0 < top_p <= 1:
        raise ShardwiseError(f"top-p must be in (0, 1] (got {top_p})")
    if top_p < 1 and temperature == 0:
        raise ShardwiseError("top-p applies to sampling; give a temperature > 0 with it")


def choose_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                  draws: torch.Tensor) -> torch.Tensor:
    """The next token of each sequence, ``[B]``, from ``logits [B, V]``:
    argmax when ``temperature`` is 0, else the token at which the cumulative
    probability (of ``softmax(logits / temperature)`` restricted to the
    fewest most likely tokens that hold ``top_p``) first reaches ``draws [B]``."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # float64: the cumulative sums that the draw is compared with
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    p, order = probs.sort(dim=-1, descending=True, stable=True)
    p = p.masked_fill(p.cumsum(-1) - p >= top_p, 0.0)  # the most likely token always stays
    cdf = p.cumsum(-1)
    at = draws.to(cdf.device, cdf.dtype)[:, None] * cdf[:, -1:]
    pick = (cdf < at).sum(-1).clamp_max(p.shape[-1] - 1)
    return order.gather(-1, pick[:, None])[:, 0]


# -- tokenizer ------------------------------------------------------------------

def load_tokenizer(path: str):
    """The checkpoint's own tokenizer, from its files only (never a download)."""
    if not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise ShardwiseError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                             f"give token ids with --prompt-ids instead of --prompt")
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ShardwiseError("--prompt reads the checkpoint's tokenizer with transformers "
                             "(pip install transformers); or give token ids with "
                             "--prompt-ids") from None
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, ImportError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ShardwiseError(f"{path}: its tokenizer cannot be loaded ({first}); give token "
                             f"ids with --prompt-ids instead of --prompt") from None


def eos_token_ids(path: str, tokenizer=None) -> tuple[int, ...]:
    """Where a sequence ends: the tokenizer's end-of-sequence token and every
    ``eos_token_id`` of the checkpoint's ``generation_config.json`` (what
    transformers' ``generate`` stops at; Llama 3 lists two)."""
    ids = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    config = os.path.join(path, "generation_config.json")
    if os.path.exists(config):
        try:
            with open(config) as f:
                eos = json.load(f).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            raise ShardwiseError(f"{config} is not a JSON object; restore it or remove it") from None
        ids.update(int(t) for t in ([] if eos is None else eos if isinstance(eos, list) else [eos]))
    return tuple(sorted(ids))


class TextStream:
    """The text one sequence's new tokens add, piece by piece: each piece is
    what decoding a few tokens of context plus the new ones adds to decoding
    the context alone, held back while it ends in an incomplete UTF-8
    character (decoded as U+FFFD). Special tokens are not shown."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int]):
        self.tok, self.ids = tokenizer, list(prompt_ids)
        self.prefix = max(0, len(self.ids) - CONTEXT_TOKENS)  # context: decoded, not shown
        self.read = len(self.ids)  # tokens shown up to here

    def _decode(self, end: int) -> str:
        return self.tok.decode(self.ids[self.prefix:end], skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._advance(final=False)

    def close(self) -> str:
        """What is still held back (an incomplete character at the very end)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        seen, text = self._decode(self.read), self._decode(len(self.ids))
        if len(text) <= len(seen) or (text.endswith("\ufffd") and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(seen):]


def continuation(tokenizer, prompt_ids: Sequence[int], new_ids: Sequence[int]) -> str:
    """The text ``new_ids`` add after the prompt: what :class:`Printer` prints."""
    stream = TextStream(tokenizer, prompt_ids)
    return "".join(stream.push(t) for t in new_ids) + stream.close()


class Printer:
    """Writes the text of a generation as it comes, from the messages rank 0
    emits (:func:`emitter`): ``{"start": Generation dict}`` before a batch,
    ``{"tokens": [...], "ended": [...]}`` after each step (every sequence's
    token, and whether its sequence has ended), ``{"end": true}`` after the
    batch. One prompt is echoed, then its new text is written piece by piece;
    with several prompts, a single-sequence batch streams on its own line
    ``[i] ...`` and a larger batch prints each line whole when its sequence ends."""

    def __init__(self, tokenizer, out=None):
        self.tok, self.out = tokenizer, out or sys.stdout

    def __call__(self, msg: dict) -> None:
        if "start" in msg:
            self._start(Generation.from_dict(msg["start"]))
        elif "tokens" in msg:
            for b, (token, end) in enumerate(zip(msg["tokens"], msg["ended"])):
                if not self.done[b]:
                    self._add(b, self.streams[b].push(token))
                    if end:
                        self._finish(b)
        else:
            for b in range(len(self.streams)):
                if not self.done[b]:
                    self._finish(b)

    def _start(self, gen: Generation) -> None:
        rows = gen.prompt_ids
        self.streams = [TextStream(self.tok, r) for r in rows]
        self.heads = [("" if gen.n_prompts == 1 else f"[{i}] ")
                      + self.tok.decode(r, skip_special_tokens=True)
                      for i, r in zip(gen.index, rows)]
        self.texts = [""] * len(rows)
        self.done = [False] * len(rows)
        self.live = len(rows) == 1
        if self.live:
            self._write(self.heads[0])

    def _write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()

    def _add(self, b: int, piece: str) -> None:
        self.texts[b] += piece
        if self.live and piece:
            self._write(piece)

    def _finish(self, b: int) -> None:
        self._add(b, self.streams[b].close())
        self.done[b] = True
        self._write("\n" if self.live else self.heads[b] + self.texts[b] + "\n")


STREAM_ENV = "SHARDWISE_STREAM"


def emitter(case: Case):
    """Where rank 0 sends the generation's messages (see :class:`Printer`):
    under shardwise's launcher, a file it names in ``SHARDWISE_STREAM`` and
    follows as the lines come (it holds the tokenizer and prints); a rank run
    in the command's own process (torchrun) prints them itself."""
    path = os.environ.get(STREAM_ENV)
    if path is None:
        return Printer(load_tokenizer(case.checkpoint))
    out = open(path, "a")

    def emit(msg: dict) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    return emit


# -- cases and jobs ---------------------------------------------------------------

def generation_cases(checkpoint: str, plan: str, prompt_ids, max_new_tokens: int, *,
                     dtype: str | None = None, verify: bool = True, **options) -> list[Case]:
    """The cases that generate from ``checkpoint`` under ``plan``: one per
    prompt length (see the module docstring), validated before launch
    (checkpoint, token ids against the vocabulary, length against the model's
    attention window). ``options`` are :class:`Generation`'s (eos_ids,
    temperature, top_p, seed, stream). The plan is checked by
    :func:`generation_jobs`."""
    from ..model.checkpoint import checkpoint_spec

    rows = _rows(prompt_ids)
    if not rows:
        raise ShardwiseError("no prompt given; give at least one")
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(len(r), []).append(i)
    gens = [Generation(tuple(tuple(rows[i]) for i in idx), max_new_tokens, index=tuple(idx),
                       n_prompts=len(rows), **options) for idx in groups.values()]
    longest = max(gens, key=lambda g: len(g.prompt_ids[0])).workload()
    spec = checkpoint_spec(checkpoint, longest, dtype)
    bad = sorted({t for r in rows for t in r if not 0 <= t < spec.vocab_size})
    if bad:
        raise ShardwiseError(f"prompt token ids {bad[:5]} are outside the vocabulary "
                             f"(0..{spec.vocab_size - 1}) of {checkpoint}")
    return [Case(spec, g.workload(), plan, verify=verify, checkpoint=os.path.abspath(checkpoint),
                 generate=g.to_dict()) for g in gens]


def generation_jobs(checkpoint: str, plans: Sequence[str], prompt_ids, max_new_tokens: int,
                    nproc: int | None = None, device: str = "cpu", *, dtype: str | None = None,
                    verify: bool = True, timeout_s: float = 300.0, **options) -> list[Job]:
    """Every plan's cases, one job per world size (``nproc`` None: the ranks
    each plan implies), every plan validated for every prompt length."""
    from ..parallel.registry import validate_plan

    by_world: dict[int, list[Case]] = {}
    for plan in plans:
        cases = generation_cases(checkpoint, plan, prompt_ids, max_new_tokens, dtype=dtype,
                                 verify=verify, **options)
        (world,) = {validate_plan(c.model, c.workload, plan, nproc)[1].world_size
                    for c in cases}
        by_world.setdefault(world, []).extend(cases)
    return [Job(cases, world, device, timeout_s=timeout_s)
            for world, cases in sorted(by_world.items())]


# Per sequence in a case's record, in the order of its ``index``.
SEQUENCE_KEYS = ("prompt_ids", "tokens", "finish_reason")
# Per case (one batch of prompts of one length).
BATCH_KEYS = ("index", "batch", "seq_len", "decode_steps", "prefill_s", "decode_step_ms",
              "prefill_rel_err", "decode_rel_err", "max_rel_err", "ok", "report")


def merge_records(records: list[dict]) -> list[dict]:
    """One record per plan from its cases' records (one per prompt length):
    every per-sequence list in the prompts' order, the per-case facts under
    ``batches``, and the verdict over all of them."""
    merged: dict[str, dict] = {}
    for r in records:
        m = merged.get(r["plan"])
        if m is None:
            m = merged[r["plan"]] = {k: v for k, v in r.items()
                                     if k not in SEQUENCE_KEYS + BATCH_KEYS}
            m.update({k: [None] * r["n_prompts"] for k in SEQUENCE_KEYS}, batches=[])
        for b, i in enumerate(r["index"]):
            for k in SEQUENCE_KEYS:
                m[k][i] = r[k][b]
        m["batches"].append({k: r[k] for k in BATCH_KEYS if k in r})
    for m in merged.values():
        checked = [b for b in m["batches"] if "ok" in b]
        if checked:
            m["max_rel_err"] = max(b["max_rel_err"] for b in checked)
            m["ok"] = all(b["ok"] for b in checked)
    return list(merged.values())


def generate_command(model_path: str, plan: str, prompt_ids, max_new_tokens: int,
                     nproc: int | None = None, device: str = "cpu", *,
                     dtype: str | None = None, verify: bool = True,
                     deadline_s: float | None = None, **options):
    """Launch the ranks, generate for ``prompt_ids`` (a flat list is one
    prompt; else one list per prompt, any lengths), return the new token ids
    (a flat list for a flat prompt). ``options``: eos_ids, temperature,
    top_p, seed.

    Raises :class:`ShardwiseError` before launch on a bad checkpoint, prompt or
    plan, and when ``verify`` finds the strategy's logits off the reference.
    """
    from .launcher import launch

    records = []
    for job in generation_jobs(model_path, [plan], prompt_ids, max_new_tokens, nproc, device,
                               dtype=dtype, verify=verify, **options):
        records += launch(job, deadline_s=deadline_s)
    (record,) = merge_records(records)
    if verify and not record["ok"]:
        raise ShardwiseError(
            f"plan {plan}: logits differ from the single-device reference (max relative error "
            f"{record['max_rel_err']:.2e} > {record['tolerance']:.0e}); the tokens are not "
            f"trustworthy")
    one = bool(prompt_ids) and isinstance(prompt_ids[0], int)  # a flat list: one prompt
    return record["tokens"][0] if one else record["tokens"]


# -- on every rank ------------------------------------------------------------------

def generate_case(case: Case, comm, model, source, dtype: torch.dtype, rank: int,
                  device: torch.device, log=print) -> list[dict]:
    """Run on every rank with this rank's shard ``model`` (from ``engine.build``);
    rank 0 returns one record with the tokens, the others an empty list."""
    from .timing import sync_device
    from .verify import step_errors

    gen = Generation.from_dict(case.generate)
    B, L = len(gen.prompt_ids), len(gen.prompt_ids[0])
    prompt = torch.tensor(gen.prompt_ids, dtype=torch.long, device=device)  # [B, L]
    eos = torch.tensor(gen.eos_ids or [-1], dtype=torch.long, device=device)
    draws = gen.draws()  # [B, max_new_tokens]
    emit = emitter(case) if rank == 0 and gen.stream else None
    if emit is not None:
        emit({"start": case.generate})
    new: list[torch.Tensor] = []  # every generated token, [B, 1] each
    logits: list[torch.Tensor] = []  # rank 0: what each step returned, [B, T, V]
    times = []
    ended = torch.zeros(B, dtype=torch.bool, device=device)
    x, pos = prompt, 0
    for t in range(gen.max_new_tokens):
        t0 = time.perf_counter()
        # Every position's logits where they are verified; else the last (the next token's).
        out = model.collect(model.step(x, pos, every_position=case.verify))
        token = torch.empty((B, 1), dtype=torch.long, device=device)
        if rank == 0:
            token.copy_(choose_tokens(out[:, -1], gen.temperature, gen.top_p,
                                      draws[:, t])[:, None])
            logits.append(out)
        comm.broadcast(token, 0)
        sync_device(device)
        times.append(time.perf_counter() - t0)
        new.append(token)
        # Every rank holds the same tokens, so every rank stops at the same step.
        ended |= torch.isin(token[:, 0], eos)
        if emit is not None:
            emit({"tokens": token[:, 0].tolist(), "ended": ended.tolist()})
        pos += x.shape[1]
        x = token
        if bool(ended.all()):
            break
    if emit is not None:
        emit({"end": True})
    fed = new[:-1]  # the decode inputs; the last token is returned, never fed
    if rank != 0:
        return []
    spec = case.model
    stop = set(gen.eos_ids)
    tokens, finish = [], []
    for row in torch.cat(new, dim=1).tolist():
        end = next((i for i, tok in enumerate(row) if tok in stop), None)
        tokens.append(row if end is None else row[:end + 1])
        finish.append("length" if end is None else "eos")
    record = {
        "model": spec.name, "model_spec": spec.to_dict(), "checkpoint": case.checkpoint,
        "plan": case.plan,
        "world_size": comm.topo.world_size, "device_type": device.type, "dtype": spec.dtype,
        "batch": B, "seq_len": L, "decode_steps": len(fed), "max_new_tokens": gen.max_new_tokens,
        "temperature": gen.temperature, "top_p": gen.top_p, "seed": gen.seed,
        "eos_ids": list(gen.eos_ids), "index": list(gen.index), "n_prompts": gen.n_prompts,
        "prompt_ids": [list(r) for r in gen.prompt_ids], "tokens": tokens,
        "finish_reason": finish,
        # Wall time of each step as generation sees it: step, collect, choice and broadcast.
        "prefill_s": times[0], "decode_step_ms": [1e3 * t for t in times[1:]],
        "report": model.report(),
    }
    if case.verify:
        log(f"  verifying {case.plan}'s logits at every step against the reference ...")
        errs, _ = step_errors(case, source, dtype, device, prompt, fed, logits)
        tol = tolerance(spec.dtype)
        record.update(prefill_rel_err=errs[0], decode_rel_err=errs[1:], max_rel_err=max(errs),
                      tolerance=tol,
                      ok=bool(max(errs) <= tol and all(math.isfinite(e) for e in errs)))
    return [record]
