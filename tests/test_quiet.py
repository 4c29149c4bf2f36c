"""Quiet by default: the named noise is hidden inside the block, nothing else is, and the filters
are restored after it."""

import warnings

import pytest

from tpcomp_megatron.quiet import NOISE, quiet_warnings


def _warn_from(module: str, message: str, category=UserWarning) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with quiet_warnings():
            warnings.warn_explicit(message, category, "x.py", 1, module=module)
    return [str(w.message) for w in seen]


def test_named_noise_is_hidden_and_the_rest_shows():
    noise = NOISE[0]
    msg = noise.message + ". Falling back to local implementations"
    assert _warn_from("megatron.core.optimizer", msg, noise.category) == []
    assert _warn_from("tpcomp_megatron.comm", msg, noise.category) == [msg]  # another module: shown
    assert _warn_from("megatron.core.optimizer", "a new warning", noise.category) == ["a new warning"]


def test_filters_are_restored_and_verbose_changes_nothing():
    before = list(warnings.filters)
    with quiet_warnings():
        assert len(warnings.filters) == len(before) + len(NOISE)
    assert warnings.filters == before
    with quiet_warnings(enabled=False):
        assert warnings.filters == before


def test_processes_started_inside_get_the_filters_and_the_environment_is_restored():
    import os
    import subprocess
    import sys

    before = os.environ.get("PYTHONWARNINGS")
    code = f"import warnings; warnings.warn({NOISE[0].message!r} + '. Falling back'); warnings.warn('ours')"
    with quiet_warnings():
        err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stderr
    assert NOISE[0].message not in err and "ours" in err
    assert os.environ.get("PYTHONWARNINGS") == before


ENTRY_POINTS = [["tpcomp-convert"], ["tpcomp-calibrate"], ["tpcomp-eval-quality"], ["tpcomp-sensitivity"],
                ["tpcomp-tune"], ["python", "-m", "tpcomp_megatron.convert"], ["python", "-m", "tpcomp_megatron.tune.cli"],
                ["python", "examples/generate.py"]]


@pytest.mark.parametrize("cmd", ENTRY_POINTS, ids=lambda c: " ".join(c[-1:]))
def test_help_prints_no_warning(cmd):
    """Every entry point imports Megatron-core (which warns four times about Transformer Engine and
    Apex) inside the filters: `--help` writes nothing to stderr; `--verbose` shows them again."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    cmd = [sys.executable, *cmd[1:]] if cmd[0] == "python" else [shutil.which(cmd[0]) or pytest.skip(f"{cmd[0]} not installed")]
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run([*cmd, "--help"], capture_output=True, text=True, cwd=root, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("Warning") == 0, proc.stderr
    assert "usage:" in proc.stdout


def test_verbose_shows_the_hidden_warnings():
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    proc = subprocess.run([sys.executable, "-m", "tpcomp_megatron.convert", "--help", "--verbose"], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stderr.count("Transformer Engine and Apex are not installed") >= 1


def test_no_progress_bars_hides_transformers_bars_and_restores_them():
    from transformers.utils import logging as hf_logging

    from tpcomp_megatron.quiet import no_progress_bars

    assert hf_logging.is_progress_bar_enabled()
    with no_progress_bars():
        assert not hf_logging.is_progress_bar_enabled()
    assert hf_logging.is_progress_bar_enabled()
    with no_progress_bars(enabled=False):
        assert hf_logging.is_progress_bar_enabled()
