"""A rank's life tied to its launcher's: no rank outlives the launcher, however it ends.

The launcher ends its ranks itself on every path it sees (a failure, a
deadline, the watchdog, a signal it catches). What it cannot see is its own
end by SIGKILL, an out-of-memory kill or a crash of the interpreter; two ties
cover that, both set up by this file, run as a script
(``python .../lifeline.py MODULE ARGS...``) before the rank's entry point
``MODULE`` is imported, so they hold from the first milliseconds of the
rank's life (importing torch takes seconds):

* Linux: the kernel sends the rank SIGKILL when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``); a SIGKILL ends a stopped rank too.
* Every POSIX system: the rank inherits the read end of a pipe whose only
  write end the launcher holds; a thread blocks reading it and, at end of
  file (the launcher is gone, whatever the cause), kills the rank's process
  group.

The script is run by path, not with ``-m``: importing the ``shardwise``
package imports torch, and the ties must not wait for that.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

FD_ENV = "SHARDWISE_LIFELINE_FD"  # the read end's descriptor number in the rank
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class Lifeline:
    """The launcher's end: the pipe, and how to start a rank on it."""

    def __init__(self):
        self.read_fd, self.write_fd = os.pipe()  # neither is inherited unless passed

    def command(self, module: str, *args: str) -> list[str]:
        return [sys.executable, os.path.abspath(__file__), module, *args]

    def popen_kwargs(self) -> dict:
        return {"pass_fds": (self.read_fd,)}

    def env(self) -> dict:
        return {FD_ENV: str(self.read_fd)}

    def started(self) -> None:
        """Every rank is started: only they hold the read end from now on."""
        self._close("read_fd")

    def __enter__(self) -> "Lifeline":
        return self

    def __exit__(self, *exc) -> None:
        """Cut the line (ranks still alive then end at once)."""
        self._close("read_fd")
        self._close("write_fd")

    def _close(self, end: str) -> None:
        # Once only: the number may be reused by another open file afterwards.
        fd = getattr(self, end)
        if fd is not None:
            setattr(self, end, None)
            os.close(fd)


def _die() -> None:
    """SIGKILL this rank and whatever it started (its own process group, when
    it leads one: the launcher starts every rank in a session of its own)."""
    if os.getpgid(0) == os.getpid():
        os.killpg(os.getpid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _die_with_parent() -> None:
    """Linux: SIGKILL from the kernel when the parent exits; elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return


def _watch(fd: int) -> None:
    def wait_for_eof():
        try:
            while os.read(fd, 1):
                pass
        except OSError:
            pass
        _die()

    threading.Thread(target=wait_for_eof, name="shardwise-lifeline", daemon=True).start()


def tie() -> None:
    """The rank's end: both ties (the pipe only when the launcher passed one).
    A launcher that died before the kernel tie was made has closed the pipe
    already: the thread then sees the end of file at once."""
    _die_with_parent()
    fd = os.environ.pop(FD_ENV, None)
    if fd is not None:
        _watch(int(fd))


def main(argv: list[str]) -> None:
    import runpy

    tie()
    # Run MODULE as ``python -m MODULE ARGS`` would: the working directory
    # first on the path, not this file's folder.
    sys.path[0] = os.getcwd()
    sys.argv = list(argv)
    runpy.run_module(argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
