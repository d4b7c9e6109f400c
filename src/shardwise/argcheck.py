"""Checks on the command line's numbers and paths, made before anything runs.

Every flag is checked by what it holds, whatever the command: no value is
empty, a count that must be positive is refused at 0 (0 never means "the
default": leaving the flag out does), a time in seconds must be a positive
finite number, an output file must not be a directory and must be
creatable, an output directory must not be a file. Each refusal is one line naming the flag, the value and what
to write instead (a :class:`ShardwiseError`, exit code 2), so no rank starts
for a job that a later check would fail.
"""
from __future__ import annotations

import math
import os

from .spec import ShardwiseError

# dest -> (smallest value, what to do instead)
AT_LEAST = {
    "batch": (1, "leave it out for the preset's batch"),
    "seq": (1, "leave it out for the preset's prompt length"),
    "steps": (0, "leave it out for the preset's decode steps"),
    "nproc": (1, "leave it out for the default number of ranks"),
    "iters": (1, "at least one timed iteration"),
    "warmup": (0, "0 times from the first iteration"),
    "top": (1, "leave it out to show every plan"),
    "ranks": (1, "give the number of GPUs to use (plan: leave it out for all of the "
                 "cluster's)"),
}
# dest -> (shortest time accepted, what to do instead); each must be a finite
# number of seconds above 0. A collective timeout under a second fails the
# ranks' own start-up (joining the process group waits on it too).
SECONDS = {
    "timeout": (1.0, "how long a collective may wait (default 300)"),
    "deadline": (0.0, "leave it out for no deadline"),
    "watchdog": (0.0, "leave it out to turn the watchdog off"),
}
# dest -> (least, most, what to do instead): finite seconds that may be 0.
SPANS = {
    "settle": (0.0, 60.0, "0 for no untimed steps, or leave it out for 0.25"),
}
# Longest time accepted (a year): the collective timeout becomes a timedelta
# in every rank, which overflows far beyond this.
MAX_SECONDS = 365 * 24 * 3600.0
OUTPUT_FILES = ("out", "json")  # files a command writes
OUTPUT_DIRS = ("trace", "plots")  # folders a command writes into


POSITIONALS = ("files", "seed")  # report FILES..., reproduce SEED: named without dashes


def check_args(args) -> None:
    """Refuse, in one line, any number or path of ``args`` (an argparse
    namespace of any command) that cannot work, and any empty value (no
    default is empty, so an empty one was typed: ``--model ''`` would
    otherwise read as no model given)."""
    for dest, value in vars(args).items():
        if value == "" or (isinstance(value, list) and "" in value):
            name = dest if dest in POSITIONALS else _flag(dest)
            raise ShardwiseError(f"{name} is empty; give a value (see shardwise {args.cmd} "
                                 f"--help)")
    for dest, (low, instead) in AT_LEAST.items():
        value = getattr(args, dest, None)
        if value is not None and value < low:
            raise ShardwiseError(f"{_flag(dest)} must be >= {low} (got {value}); {instead}")
    for dest, (low, instead) in SECONDS.items():
        value = getattr(args, dest, None)
        if value is not None and not (math.isfinite(value) and low <= value <= MAX_SECONDS
                                      and value > 0):
            least = f"at least {low:g}" if low else "more than 0"
            raise ShardwiseError(f"{_flag(dest)} must be a number of seconds, {least} and a "
                                 f"year at most (got {value}); {instead}")
    for dest, (low, high, instead) in SPANS.items():
        value = getattr(args, dest, None)
        if value is not None and not (math.isfinite(value) and low <= value <= high):
            raise ShardwiseError(f"{_flag(dest)} must be a number of seconds from {low:g} to "
                                 f"{high:g} (got {value}); {instead}")
    for dest in OUTPUT_FILES:
        path = getattr(args, dest, None)
        if path is not None:
            check_output_file(_flag(dest), path)
    for dest in OUTPUT_DIRS:
        path = getattr(args, dest, None)
        if path is not None:
            check_output_dir(_flag(dest), path)


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_output_file(flag: str, path: str) -> None:
    """``path`` can be written as a file: it is not a directory, and its
    folder exists or can be made."""
    if not path:
        raise ShardwiseError(f"{flag} is empty; give a file path")
    if os.path.isdir(path):
        raise ShardwiseError(f"{flag} {path} is a directory; give a file in it, e.g. "
                             f"{os.path.join(path, 'results.jsonl')}")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise ShardwiseError(f"{flag} {path} is not writable; choose another file")
    _check_can_create(flag, path, os.path.dirname(os.path.abspath(path)))


def check_output_dir(flag: str, path: str) -> None:
    """``path`` can hold files: a directory, or a path where one can be made."""
    if not path:
        raise ShardwiseError(f"{flag} is empty; give a directory")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ShardwiseError(f"{flag} {path} is a file, not a directory; give a directory "
                             f"(it is made if missing)")
    _check_can_create(flag, path, os.path.abspath(path))


def _check_can_create(flag: str, path: str, folder: str) -> None:
    """``folder`` exists and is writable, or its nearest existing ancestor is
    a writable directory (so it can be made)."""
    probe = folder
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ShardwiseError(f"{flag} {path}: {probe} is a file, so no directory can be made "
                             f"there; choose another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ShardwiseError(f"{flag} {path}: {probe} is not writable; choose another path")
