"""Shared helpers for tests that launch ranks (CPU, gloo)."""
from __future__ import annotations

from shardwise.presets import get_preset
from shardwise.runtime.job import Case, Job
from shardwise.runtime.launcher import launch
from shardwise.spec import ModelSpec, Workload


# Llama 3.1's rotary frequency scaling, with original_max_position_embeddings
# shrunk so that a tiny head's wavelengths fall in all three bands (kept,
# smoothed, stretched): head_dim 8 to 16 at rope_theta 1e4, 12 to 16 at 5e5.
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def with_real_features(spec: ModelSpec) -> ModelSpec:
    """``spec`` (rotary, with a vocabulary) with what published models add:
    q/k/v biases (Qwen2), tied embeddings and Llama 3.1's rope scaling."""
    return spec.replace(name=f"{spec.name}+bias,tie,llama3", qkv_bias=True,
                        tie_embeddings=True, rope_scaling=LLAMA3_ROPE)


def run_plans(model: ModelSpec | str, plans: list[str], nproc: int,
              workload: Workload | None = None, seed: int = 0, **job_kw) -> list[dict]:
    """Launch ``nproc`` gloo ranks that run and verify every plan in turn."""
    if isinstance(model, str):
        preset = get_preset(model)
        model, workload = preset.model, workload or preset.reduced
    cases = [Case(model, workload, plan, seed=seed) for plan in plans]
    return launch(Job(cases, nproc, **job_kw), deadline_s=300)


class SharedLaunch:
    """Cases run in one launch with every other batch of cases registered for
    the same ranks and job options, in any test module.

    Starting ranks costs more than running a tiny case, so modules register
    their cases when they are imported (pytest imports every test module
    before it runs a test): the first test that asks for results of a
    (ranks, options) pair launches all the cases registered for it, once,
    and each batch gets back the results of its own cases, in order. Each
    case is independent of the others in a job (its own seed for weights
    and inputs, its own reference), so a case checks the same in a shared
    launch as in one of its own. A launch that fails fails every batch
    that shares it, with the same error. A batch registered later (by a
    fixture) joins the launch still to come, or starts the next one."""

    _pools: dict = {}  # (nproc, job options) -> the cases, batches and results of one launch

    def __init__(self, cases: list[Case], nproc: int, **job_kw):
        self.key = (nproc, tuple(sorted((k, repr(v)) for k, v in job_kw.items())))
        pool = self._pools.get(self.key)
        if pool is None or pool["out"] is not None:  # none yet, or launched already
            pool = self._pools[self.key] = {"cases": [], "batches": 0, "out": None,
                                            "nproc": nproc, "job_kw": job_kw}
        self.pool = pool
        self.start = len(pool["cases"])
        pool["cases"].extend(cases)
        pool["batches"] += 1
        self.stop = len(pool["cases"])
        self.cases = list(cases)

    def results(self) -> list[dict]:
        pool = self.pool
        if pool["out"] is None:
            try:
                # Each batch's own launch had 300 s: so has each one here.
                pool["out"] = launch(Job(list(pool["cases"]), pool["nproc"], **pool["job_kw"]),
                                     deadline_s=300 * pool["batches"])
            except Exception as e:  # noqa: BLE001 - every batch sees the failure
                pool["out"] = e
        if isinstance(pool["out"], Exception):
            raise pool["out"]
        out = pool["out"][self.start:self.stop]
        # One record a verified case, in the order of the cases.
        assert len(pool["out"]) == len(pool["cases"]), (len(pool["out"]), len(pool["cases"]))
        assert [r["plan"] for r in out] == [c.plan for c in self.cases]
        return out


def shared_plans(model: ModelSpec | str, plans: list[str], nproc: int,
                 workload: Workload | None = None, seed: int = 0, **job_kw) -> SharedLaunch:
    """``run_plans``' cases, registered for a shared launch (``SharedLaunch``)."""
    if isinstance(model, str):
        preset = get_preset(model)
        model, workload = preset.model, workload or preset.reduced
    return SharedLaunch([Case(model, workload, plan, seed=seed) for plan in plans], nproc,
                        **job_kw)


def assert_verified(results: list[dict], plans: list[str], tol: float = 1e-5) -> None:
    """Every plan ran, prefill and every decode step within ``tol`` (relative,
    Frobenius) of the reference. fp32 on CPU: the strategies only reorder
    additions, so 1e-5 leaves two orders of magnitude over what that costs."""
    assert [r["plan"] for r in results] == plans
    for r in results:
        assert len(r["decode_rel_err"]) == r["decode_steps"] >= 1, r
        errs = [r["prefill_rel_err"], *r["decode_rel_err"]]
        assert all(e <= tol for e in errs), f"{r['plan']}: errors {errs} exceed {tol}"
        # The timed prefill's output (its last position, where the plan streams)
        # is the verified output's, bit for bit.
        assert r["prefill_kept_matches"], r
        assert r["ok"], r


def tagged_pids(tag: str) -> list[int]:
    """Processes whose environment carries ``tag`` (a launcher started with it
    in its environment, and its ranks)."""
    import os

    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if tag.encode() in f.read():
                    out.append(int(pid))
        except OSError:
            pass
    return out


def rank_pid(tag: str, rank: int) -> int | None:
    """The process of rank ``rank`` among those tagged ``tag``."""
    for pid in tagged_pids(tag):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and any(e.startswith(b"SHARDWISE_ERROR_DIR=")
                                                   for e in env):
            return pid
    return None


def job_heartbeats(tmpdir, nproc: int) -> list[dict | None]:
    """The heartbeat of every rank of the one job whose temporary directory
    is under ``tmpdir`` (None for a rank that has not reported)."""
    from pathlib import Path

    from shardwise.runtime.job import Heartbeat, heartbeat_path

    dirs = sorted(Path(tmpdir).glob("shardwise-*"))
    if not dirs:
        return [None] * nproc
    return [Heartbeat.read(heartbeat_path(str(dirs[0]), r)) for r in range(nproc)]


def wait_until(cond, timeout: float, what: str, every: float = 0.05):
    """Poll ``cond()`` until it is truthy (returned) or ``timeout`` s pass (AssertionError)."""
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"not within {timeout} s: {what}")
