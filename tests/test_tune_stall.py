"""tpcomp-tune with one rank stopped (issue 32 item 9): the other rank gives up with one clear line
within its progress timeout (--timeout), not at the process group's timeout (10 minutes before).

The ranks are plain processes with torchrun's environment (not torchrun, which would stop the
stopped rank's peer itself); rank 1 sends itself SIGSTOP at its third timed sample.
"""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from tpcomp_megatron.tune.watchdog import GIVE_UP_EXIT, Watchdog, group_timeout

TIMEOUT_S = 3  # the progress timeout under test (default 60 s): a gloo sample here takes milliseconds

RANK = """
import os, signal, sys
from tpcomp_megatron.comm.gate import measure
from tpcomp_megatron.tune import cli

if os.environ["RANK"] == "1":
    real, seen = measure._samples, []

    def stopping(*args, **kwargs):  # mid-measurement: after the peer has timed paths alongside
        seen.append(1)
        if len(seen) == 3:
            os.kill(os.getpid(), signal.SIGSTOP)
        return real(*args, **kwargs)
    measure._samples = stopping
sys.exit(cli.main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not hasattr(signal, "SIGSTOP"), reason="needs POSIX signals")
def test_a_stopped_rank_ends_its_peer_with_one_clear_line_in_bounded_time(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    args = ["--hidden", "64", "--tokens", "4", "16", "--codecs", "fp4_e2m1/b32/e8m0", "--algorithms", "one_shot",
            "--warmup", "1", "--iters", "2", "--repeats", "2", "--no-cache", "--backend", "gloo",
            "--timeout", str(TIMEOUT_S)]
    procs = [subprocess.Popen([sys.executable, "-c", RANK, *args], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        t0 = time.monotonic()
        out, err = procs[0].communicate(timeout=90)
        elapsed = time.monotonic() - t0
        stopped = procs[1].poll() is None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    assert stopped, "rank 1 should still be stopped"
    assert procs[0].returncode == GIVE_UP_EXIT, (procs[0].returncode, out, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"tpcomp-tune: error (rank 0 of 2): no progress for {TIMEOUT_S} s (last step: timing ")
    assert "another rank is stopped, dead or stuck" in lines[0] and "--timeout" in lines[0]
    assert " tokens (eager): " in lines[0]  # where it was: the path and size being timed
    assert elapsed < 60, elapsed  # startup (imports) and a few seconds, never the group's timeout
    assert group_timeout(TIMEOUT_S).total_seconds() > TIMEOUT_S  # the watchdog's line comes first


def test_the_watchdog_keeps_quiet_while_progress_comes():
    with Watchdog("tool", 0.4) as dog:
        for i in range(8):
            time.sleep(0.1)
            dog.beat(f"step {i}")
    with pytest.raises(ValueError, match="must be > 0"):
        Watchdog("tool", 0)
