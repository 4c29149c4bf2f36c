"""The console scripts (setup.py): each imports its tool inside the quiet warning filters
(quiet.py), since importing Megatron-core is what warns, before any argument is read; and how a
tool refuses an input under torchrun (`refuse`) and prints progress (`say`)."""

from __future__ import annotations

import os
import sys

from .quiet import run_quietly


def say(line: str) -> None:
    """Print one progress line now: written to a file or a pipe, stdout is block-buffered, and an
    evaluation's lines would otherwise all appear when it ends, minutes later."""
    print(line, flush=True)


def refuse(prog: str, error: BaseException) -> int:
    """Print `prog: error (rank R of N): <error>` on this rank and return exit status 2.

    Every rank that refuses says why itself: torchrun stops the other ranks as soon as one exits,
    so a reason left to rank 0 is lost whenever another rank exits first."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    where = f" (rank {os.environ.get('RANK', '0')} of {world})" if world > 1 else ""
    print(f"{prog}: error{where}: {error}", file=sys.stderr, flush=True)
    return 2


def convert() -> int:
    return run_quietly("tpcomp_megatron.convert.cli")


def calibrate() -> int:
    return run_quietly("tpcomp_megatron.quality.calibrate_cli")


def eval_quality() -> int:
    return run_quietly("tpcomp_megatron.quality.eval_cli")


def sensitivity() -> int:
    return run_quietly("tpcomp_megatron.quality.sensitivity_cli")


def tune() -> int:
    return run_quietly("tpcomp_megatron.tune.cli")
