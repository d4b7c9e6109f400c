"""Shared helpers for tests that launch ranks (CPU, gloo)."""
from __future__ import annotations

from shardwise.presets import get_preset
from shardwise.runtime.job import Case, Job
from shardwise.runtime.launcher import launch
from shardwise.spec import ModelSpec, Workload


def run_plans(model: ModelSpec | str, plans: list[str], nproc: int,
              workload: Workload | None = None, seed: int = 0, **job_kw) -> list[dict]:
    """Launch ``nproc`` gloo ranks that run and verify every plan in turn."""
    if isinstance(model, str):
        preset = get_preset(model)
        model, workload = preset.model, workload or preset.reduced
    cases = [Case(model, workload, plan, seed=seed) for plan in plans]
    return launch(Job(cases, nproc, **job_kw), deadline_s=300)


def assert_verified(results: list[dict], plans: list[str], tol: float = 1e-5) -> None:
    """Every plan ran, prefill and every decode step within ``tol`` (relative,
    Frobenius) of the reference. fp32 on CPU: the strategies only reorder
    additions, so 1e-5 leaves two orders of magnitude over what that costs."""
    assert [r["plan"] for r in results] == plans
    for r in results:
        assert len(r["decode_rel_err"]) == r["decode_steps"] >= 1, r
        errs = [r["prefill_rel_err"], *r["decode_rel_err"]]
        assert all(e <= tol for e in errs), f"{r['plan']}: errors {errs} exceed {tol}"
        assert r["ok"], r
