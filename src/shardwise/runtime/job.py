"""A job: one or more cases (model, workload, plan) run by the same ranks.

Jobs are plain JSON so the launcher can hand them to worker processes and a
results file can record exactly what ran.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from ..spec import ModelSpec, Plan, ShardwiseError, Workload

TOLERANCE = {
    # fp32 on CPU: the strategies change only the order of additions (partial
    # sums over ranks, log-sum-exp merges); each reordering costs ~1 ulp
    # (6e-8) per add, far below 1e-5 for the depths here.
    "fp32": 1e-5,
    # bf16/fp16: partial sums are rounded to 8 (bf16) or 11 (fp16) mantissa
    # bits before they are added across ranks, where the reference rounds once;
    # a few of those roundings per layer give ~1e-3..1e-2 relative.
    "bf16": 2e-2,
    "fp16": 2e-2,
}

FAULT_POINTS = ("startup", "prefill", "decode", "hang", "kill")


@dataclass
class Case:
    model: ModelSpec
    workload: Workload
    plan: str
    seed: int = 0
    verify: bool = True
    preset: str | None = None
    bench: dict | None = None  # timing settings (see runtime/timing.py); None: one verified run
    # A Hugging Face checkpoint directory (model/checkpoint.py); None: synthetic weights from seed.
    checkpoint: str | None = None
    # Greedy generation (runtime/generate.py: {"prompt_ids", "max_new_tokens"}); None: a verified run.
    generate: dict | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Case":
        return cls(**{**d, "model": ModelSpec(**d["model"]), "workload": Workload(**d["workload"])})


@dataclass
class Job:
    cases: list[Case]
    nproc: int
    device: str = "cpu"  # "cpu" (gloo) or "cuda" (nccl, one rank per GPU)
    timeout_s: float = 300.0  # a collective that waits longer than this fails
    warmup: int = 1
    fault: str | None = None  # "RANK:POINT", for testing failure handling
    env: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.device not in ("cpu", "cuda"):
            raise ShardwiseError(f"device must be cpu or cuda (got {self.device!r})")
        if self.fault is not None:
            rank, _, point = self.fault.partition(":")
            if not rank.isdigit() or point not in FAULT_POINTS:
                raise ShardwiseError(
                    f"fault must be RANK:POINT with POINT in {', '.join(FAULT_POINTS)} "
                    f"(got {self.fault!r})"
                )

    def fault_at(self, rank: int, point: str) -> bool:
        if self.fault is None:
            return False
        r, _, p = self.fault.partition(":")
        return int(r) == rank and p == point

    def dumps(self) -> str:
        d = dataclasses.asdict(self)
        d["cases"] = [c.to_json() for c in self.cases]
        return json.dumps(d)

    @classmethod
    def loads(cls, text: str) -> "Job":
        d = json.loads(text)
        d["cases"] = [Case.from_json(c) for c in d["cases"]]
        return cls(**d)


def tolerance(dtype: str) -> float:
    from ..spec import torch_dtype
    import torch

    return {torch.float32: TOLERANCE["fp32"], torch.bfloat16: TOLERANCE["bf16"],
            torch.float16: TOLERANCE["fp16"]}[torch_dtype(dtype)]


def plan_of(case: Case) -> Plan:
    return Plan.parse(case.plan)
