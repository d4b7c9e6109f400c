"""A job: one or more cases (model, workload, plan) run by the same ranks.

Jobs are plain JSON so the launcher can hand them to worker processes and a
results file can record exactly what ran.
"""
from __future__ import annotations

import dataclasses
import json
import mmap
import os
import struct
import threading
import time
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

# "collective" raises inside a Comm collective call (``RANK:collective=N``: the
# rank's Nth collective call of the job, counted from 1; default 1).
FAULT_POINTS = ("startup", "prefill", "decode", "hang", "kill", "collective")


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
    # Where the model came from, as models.ModelRef.source names it ("zoo:llama-3.1-8b").
    source: str | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "Case":
        return cls(**{**d, "model": ModelSpec.from_dict(d["model"]),
                      "workload": Workload(**d["workload"])})


@dataclass
class Job:
    cases: list[Case]
    nproc: int
    device: str = "cpu"  # "cpu" (gloo) or "cuda" (nccl, one rank per GPU)
    timeout_s: float = 300.0  # a collective that waits longer than this fails
    warmup: int = 1
    fault: str | None = None  # "RANK:POINT", for testing failure handling
    env: dict = field(default_factory=dict)
    # End the job when no rank makes progress for this long and name the rank(s)
    # that hung (the launcher reads every rank's Heartbeat); None: off, no heartbeat.
    watchdog_s: float | None = None
    # Verified runs decode at a device-tensor position (the static-shape step a
    # CUDA graph replays) where the strategy supports graphs.
    static_decode: bool = False

    def __post_init__(self):
        if self.device not in ("cpu", "cuda"):
            raise ShardwiseError(f"device must be cpu or cuda (got {self.device!r})")
        if self.fault is not None:
            rank, _, point = self.fault.partition(":")
            point, _, nth = point.partition("=")
            if (not rank.isdigit() or point not in FAULT_POINTS
                    or (nth and (point != "collective" or not nth.isdigit() or int(nth) < 1))):
                raise ShardwiseError(
                    f"fault must be RANK:POINT with POINT in {', '.join(FAULT_POINTS)} "
                    f"(collective=N for the Nth collective call) (got {self.fault!r})"
                )
        if self.watchdog_s is not None and not self.watchdog_s > 0:
            raise ShardwiseError(f"watchdog must be a positive number of seconds "
                                 f"(got {self.watchdog_s})")

    def fault_at(self, rank: int, point: str) -> bool:
        if self.fault is None:
            return False
        r, _, p = self.fault.partition(":")
        return int(r) == rank and p.partition("=")[0] == point

    def collective_fault(self, rank: int) -> int | None:
        """The collective call (1-based, over the whole job) at which ``rank``
        must raise, or None."""
        if not self.fault_at(rank, "collective"):
            return None
        return int(self.fault.partition("=")[2] or 1)

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


class Heartbeat:
    """One rank's progress record, a small memory-mapped file in the launcher's
    temporary directory (``heartbeat<RANK>``), which the launcher's watchdog reads.

    It holds a counter bumped on every update, the time, the case index, the
    current event (a phase such as ``prefill`` or ``decode 2``), whether the
    rank is waiting inside a collective (which, and the rank's collective call
    number then). Updates are a ``struct.pack_into`` on the mapping: no system
    call, about a microsecond.

    Progress alone cannot tell a rank that waits on a stopped peer from the
    stopped peer itself: both stop updating, and a rank stopped inside a
    collective looks like one waiting there. So the record also carries a
    *pulse*, a second counter that a thread of the rank bumps every
    ``PULSE_S`` whatever the rank is doing (a rank blocked in a collective
    has released the interpreter, so its pulse goes on); a rank whose pulse
    stops is stopped or frozen, and it is the one the others wait on.
    """

    RECORD = struct.Struct("<QdiB3x48s48sQ")  # counter, unix time, case, inside, event, collective, calls
    PULSE = struct.Struct("<Q")  # the pulse counter, after the record
    SIZE = RECORD.size + PULSE.size
    PULSE_S = 0.1

    def __init__(self, path: str):
        self._file = open(path, "r+b")
        self._map = mmap.mmap(self._file.fileno(), self.SIZE)
        self.counter, self.case, self.event, self.inside, self.calls = 0, -1, b"start", b"", 0
        self._closed = False

    @classmethod
    def create(cls, path: str) -> None:
        """Make the empty record a rank will map (the launcher does this before start)."""
        with open(path, "wb") as f:
            f.write(bytes(cls.SIZE))

    def start_pulse(self) -> None:
        """Bump the pulse every PULSE_S from a daemon thread, until close()."""
        def beat():
            n = 0
            while not self._closed:
                n += 1
                try:
                    self.PULSE.pack_into(self._map, self.RECORD.size, n)
                except ValueError:  # the mapping was closed
                    return
                time.sleep(self.PULSE_S)

        threading.Thread(target=beat, name="shardwise-pulse", daemon=True).start()

    def _write(self) -> None:
        self.counter += 1
        self.RECORD.pack_into(self._map, 0, self.counter, time.time(), self.case,
                              bool(self.inside), self.event, self.inside, self.calls)

    def phase(self, event: str, case: int | None = None) -> None:
        """A case or phase boundary (outside any collective)."""
        if case is not None:
            self.case = case
        self.event, self.inside = event.encode()[:48], b""
        self._write()

    def waiting(self, what: str, calls: int = 0) -> None:
        """Entering a blocking collective (or any wait on peers); ``calls``:
        the rank's collective calls so far (its sequence number)."""
        self.inside, self.calls = what.encode()[:48] or b"?", calls
        self._write()

    def done(self) -> None:
        self.inside = b""
        self._write()

    def close(self) -> None:
        self._closed = True
        self._map.close()
        self._file.close()

    @classmethod
    def read(cls, path: str) -> dict | None:
        """The record as a dict, or None before the rank's first update."""
        # The rank may be writing while this reads: two equal reads in a row
        # are a whole record.
        data = None
        for _ in range(5):
            try:
                with open(path, "rb") as f:
                    again = f.read(cls.SIZE)
            except OSError:
                return None
            if again == data:
                break
            data = again
        if len(data) < cls.SIZE:
            return None
        counter, t, case, inside, event, what, calls = cls.RECORD.unpack_from(data)
        (pulse,) = cls.PULSE.unpack_from(data, cls.RECORD.size)
        if counter == 0:
            return None
        text = lambda b: b.rstrip(b"\0").decode(errors="replace")  # noqa: E731
        return {"counter": counter, "time": t, "case": case, "inside": bool(inside),
                "event": text(event), "collective": text(what), "calls": calls, "pulse": pulse}


def heartbeat_path(directory: str, rank: int | str) -> str:
    return os.path.join(directory, f"heartbeat{rank}")
