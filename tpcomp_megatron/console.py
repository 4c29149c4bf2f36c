"""The console scripts (setup.py): each imports its tool inside the quiet warning filters
(quiet.py), since importing Megatron-core is what warns, before any argument is read."""

from __future__ import annotations

from .quiet import run_quietly


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
