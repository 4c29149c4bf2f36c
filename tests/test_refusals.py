"""A refused input under torchrun: every refusing rank prints its one-line reason, so the reason is
on screen whichever rank exits first (torchrun stops the others at the first exit)."""

import os
import subprocess
import sys
import time
from pathlib import Path

from tpcomp_megatron.console import refuse

ROOT = Path(__file__).resolve().parents[1]

# Rank 0 is made the slow one: before, it alone printed the reason, and torchrun stopped it as soon
# as rank 1 (silent) exited with status 2, leaving only torchrun's ChildFailedError on screen.
SLOW_RANK0 = """
import os, runpy, sys, time
import tpcomp_megatron.args as a
if os.environ["RANK"] == "0":
    checked = a.config_from_args
    def slow(args):
        time.sleep(120)
        return checked(args)
    a.config_from_args = slow
sys.argv = [sys.argv[0]] + sys.argv[1:]
runpy.run_path({script!r}, run_name="__main__")
"""


def test_generate_refusal_is_printed_when_the_silent_rank_exits_first(tmp_path):
    wrapper = tmp_path / "slow_rank0.py"
    wrapper.write_text(SLOW_RANK0.format(script=str(ROOT / "examples" / "generate.py")))
    bad = tmp_path / "recipe.json"
    bad.write_text('{"not": "a recipe"}')
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(wrapper), "--tp-comm-recipe", str(bad)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=240)
    assert proc.returncode != 0
    assert time.perf_counter() - t0 < 100, "rank 0 should have been stopped, not waited for"
    assert f"generate.py: error (rank 1 of 2): cannot read the recipe {bad}" in proc.stderr, proc.stderr[-3000:]


def test_refuse_names_the_rank_only_under_torchrun(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert refuse("tool", ValueError("bad input")) == 2
    assert capsys.readouterr().err == "tool: error: bad input\n"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert refuse("tool", ValueError("bad input")) == 2
    assert capsys.readouterr().err == "tool: error (rank 3 of 4): bad input\n"
