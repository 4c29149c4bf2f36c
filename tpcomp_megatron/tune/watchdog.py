"""Give up, with one clear line, when a measurement makes no progress.

A rank that is stopped (SIGSTOP), dead or stuck leaves its peers blocked inside a collective until
the process group times out (tpcomp-tune's group waited 10 minutes), and under NCCL that timeout
ends in the communicator watchdog's abort and a long trace. The tool reports progress after every
timed sample instead; a thread that hears nothing for `timeout_s` says where it was, on this rank,
and ends the process: the main thread sits in a blocking collective and cannot be interrupted.
The group's own timeout is set longer (`group_timeout`), so this line always comes first.
"""

from __future__ import annotations

import datetime
import os
import sys
import threading
import time

GIVE_UP_EXIT = 2
"""Exit status when no progress came (the tools' status for an error they explain in one line)."""


def group_timeout(timeout_s: float) -> datetime.timedelta:
    """The process group's timeout for a tool whose watchdog gives up after `timeout_s`: longer, so
    the watchdog's line comes before gloo's error or NCCL's abort."""
    return datetime.timedelta(seconds=timeout_s + max(30.0, timeout_s))


class Watchdog:
    """`with Watchdog('tpcomp-tune', 60) as dog: ... dog.beat('fp4 at 16 tokens, eager') ...`"""

    def __init__(self, prog: str, timeout_s: float):
        if not timeout_s > 0:
            raise ValueError(f"the progress timeout must be > 0 seconds, got {timeout_s}")
        self.prog, self.timeout_s = prog, float(timeout_s)
        self._where = "started"
        self._last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"{prog} watchdog", daemon=True)

    def beat(self, where: str) -> None:
        """Progress: the last step done, or the one starting (named in the line if none follows)."""
        self._where, self._last = where, time.monotonic()

    def _message(self) -> str:
        import torch.distributed as dist

        on = f" (rank {dist.get_rank()} of {dist.get_world_size()})" if dist.is_initialized() else ""
        return (f"{self.prog}: error{on}: no progress for {self.timeout_s:.0f} s (last step: {self._where}): "
                f"another rank is stopped, dead or stuck in a collective; giving up (--timeout sets how long to wait)")

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):
            if time.monotonic() - self._last > self.timeout_s:
                print(self._message(), file=sys.stderr, flush=True)
                os._exit(GIVE_UP_EXIT)  # the main thread is blocked in C++: nothing else would end it

    def __enter__(self) -> "Watchdog":
        self.beat("started")
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
