"""Progress of a job while it runs, shown by the process that launched it.

Rank 0 appends one JSON line per event to the file named in
``SHARDWISE_PROGRESS`` (:class:`Reporter`): a case starting, a phase of it
(the phases the heartbeat names: build shard, warmup, prefill, decode,
verify, bench prefill...), a finished case's verdict, a calibration step.
The launcher sets the variable when its caller passes ``on_progress`` and
follows the file as it polls (an append per phase boundary, a few per case:
no cost inside a step, and no watchdog needed). :class:`Display` draws the
events: on a terminal a live status line (case, plan, phase, seconds in the
phase and in the job) above which finished cases print; elsewhere one plain
line per case and verdict. Without the variable (under torchrun, or a
caller that shows nothing) rank 0 prints the same plain lines itself, to
standard error: standard output carries only results.
"""
from __future__ import annotations

import json
import os
import sys
import time

ENV = "SHARDWISE_PROGRESS"


class Reporter:
    """Rank 0's side: ``case``, ``phase``, ``done`` and ``log`` events to the
    launcher's file, or plain lines to standard error where there is none."""

    def __init__(self, rank: int = 0, path: str | None = None):
        path = os.environ.get(ENV) if path is None else path
        self.rank = rank
        self.file = open(path, "a") if path and rank == 0 else None

    def _send(self, event: dict) -> None:
        if self.rank != 0:
            return
        if self.file is not None:
            self.file.write(json.dumps(event) + "\n")
            self.file.flush()
        elif event.get("text"):
            print(event["text"], file=sys.stderr, flush=True)

    def case(self, index: int, total: int, plan: str, what: str) -> None:
        self._send({"kind": "case", "index": index, "total": total, "plan": plan,
                    "what": what, "text": f"[{index + 1}/{total}] {plan}: {what}"})

    def phase(self, name: str) -> None:
        self._send({"kind": "phase", "phase": name})

    def done(self, text: str) -> None:
        self._send({"kind": "done", "text": f"  {text}"})

    def log(self, text: str) -> None:
        self._send({"kind": "log", "text": text})

    def step(self, index: int, total: int, what: str) -> None:
        """One of ``total`` steps of a job without cases (calibrate)."""
        self._send({"kind": "step", "index": index, "total": total, "phase": what,
                    "text": f"[{index + 1}/{total}] {what}"})


class Display:
    """The launching side: draws the events of one or more jobs (their cases
    counted together: ``total`` cases in all). Use as a context manager
    around the launches; ``print`` writes a line above the status."""

    def __init__(self, total: int | None = None, what: str = "", file=None):
        self.file = file or sys.stderr
        self.total, self.what = total, what
        self.seen = 0  # cases started, over every job
        self.plan, self.phase = "", "starting the ranks"
        self.start = self.phase_start = self.case_start = time.monotonic()
        self.live = None
        self.tty = self.file.isatty() and os.environ.get("TERM") != "dumb"

    def __enter__(self) -> "Display":
        if self.tty:
            from rich.console import Console
            from rich.live import Live

            console = Console(file=self.file, highlight=False)
            self.live = Live(self, console=console, refresh_per_second=4, transient=True)
            self.live.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None

    def print(self, text: str) -> None:
        if self.live is not None:
            self.live.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.file, flush=True)

    def __call__(self, event: dict) -> None:
        kind = event.get("kind")
        now = time.monotonic()
        if kind == "case":
            self.seen += 1
            self.plan, self.phase = event["plan"], "starting"
            self.case_start = self.phase_start = now
            total = self.total or event["total"]
            if self.live is None:
                self.print(f"[{self.seen}/{total}] {event['plan']}: {event['what']}")
        elif kind in ("phase", "step"):
            self.phase, self.phase_start = event["phase"], now
            if kind == "step":
                self.plan = f"[{event['index'] + 1}/{event['total']}]"
                if self.live is None:
                    self.print(event["text"])
        elif kind == "done":
            took = f" ({now - self.case_start:.1f} s)"
            self.print(f"{event['text']}{took}" if self.live is None
                       else f"{event['text'].strip()} [{self.plan}]{took}")
        elif kind == "log" and self.live is None:
            self.print(event["text"])

    def __rich__(self):
        from rich.spinner import Spinner
        from rich.text import Text

        now = time.monotonic()
        count = (f"[{self.seen}/{self.total}] " if self.total and self.seen
                 else f"[{self.seen}] " if self.seen else "")
        text = Text.assemble(
            (count, "bold"), (f"{self.plan} " if self.plan else "", "cyan"),
            f"{self.phase} {now - self.phase_start:.0f} s",
            (f"  ({self.what + ': ' if self.what else ''}{now - self.start:.0f} s in all)",
             "dim"))
        return Spinner("dots", text=text)
