"""One grammar: presets, the runtime flag and the evaluation tools' sweep points parse alike."""

import argparse
import random

import pytest

from tpcomp_megatron.args import add_args, config_from_args
from tpcomp_megatron.codecs import PRESETS, parse_codec_spec, parse_point
from tpcomp_megatron.megatron import CompressionConfig
from tpcomp_megatron.quality.sweep import SWEEPS, SweepPoint

# The documented table (codecs/presets.py, README): written out here, not read from PRESETS, so a
# preset that drifts from its documentation fails.
DOCUMENTED = {"fp4": "fp4_e2m1/b32/e6m2", "fp6": "fp6_e2m3/b32/e8m0", "fp8": "fp8_e4m3/b32/e8m0up"}


def _flags(argv):
    return config_from_args(add_args(argparse.ArgumentParser(prog="t")).parse_args(argv))


@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_presets_equal_their_documented_specs(name):
    assert set(PRESETS) == set(DOCUMENTED)
    want = parse_codec_spec(DOCUMENTED[name])
    assert parse_codec_spec(name) == want and str(parse_codec_spec(name.upper())) == DOCUMENTED[name]
    cfg = _flags(["--tp-comm-compression", name])
    assert cfg.reduce_spec == want and not cfg.needs_calibration
    assert cfg.describe() == CompressionConfig(spec=DOCUMENTED[name]).describe()  # ranks see one configuration
    assert PRESETS[name].record.startswith("quality_")  # names the measurement that backs it


def test_presets_work_wherever_a_spec_does():
    cfg = CompressionConfig(spec="fp4", overrides=(("decoder.layers.0.*", "fp8"),))
    assert str(cfg.layer_spec("decoder.layers.0.mlp.linear_fc2")) == DOCUMENTED["fp8"]
    with pytest.raises(ValueError, match="a preset \\(fp8, fp6, fp4\\)"):
        parse_codec_spec("fp5")


def _all_points():
    return sorted({p for sweep in SWEEPS.values() for p in sweep})


@pytest.mark.parametrize("text", _all_points())
def test_every_builtin_sweep_point_is_a_runtime_spec(text):
    point = SweepPoint.parse(text, tp=4)
    # the runtime flag takes the point as written; outlier/low-rank codecs only need a file named
    cfg = _flags(["--tp-comm-compression", text] + (["--tp-comm-calibration", "cal.safetensors"]
                                                     if point.needs_calibration else []))
    assert str(cfg.reduce_spec) == point.spec
    assert cfg.error_feedback == point.feedback and cfg.outlier_rule == point.rule
    assert cfg.algorithm == (point.algorithm if ":algo=" in text else "auto")


def test_point_options_set_the_config_and_conflicts_are_named():
    rng = random.Random()
    algo, fb = rng.choice(["one_shot", "two_shot"]), rng.choice(["on", "off"])
    cfg = CompressionConfig(spec=f"fp6:algo={algo}:feedback={fb}")
    assert cfg.algorithm == algo and cfg.error_feedback == (fb == "on")
    assert CompressionConfig(spec=f"fp6:algo={algo}", algorithm=algo).algorithm == algo  # agreeing: fine
    other = "one_shot" if algo == "two_shot" else "two_shot"
    with pytest.raises(ValueError, match="set it in one place"):
        CompressionConfig(spec=f"fp6:algo={algo}", algorithm=other)
    with pytest.raises(ValueError, match="set it in one place"):
        CompressionConfig(spec="fp6:feedback=off", error_feedback=True)
    with pytest.raises(ValueError, match="outlier codecs only"):
        parse_point("fp6:rule=range_sum")
    with pytest.raises(ValueError, match="algorithm 'ring': choose one of"):
        parse_point("fp6:algo=ring")
    with pytest.raises(SystemExit):
        _flags(["--tp-comm-compression", "fp6:feedback=maybe"])
    assert str(parse_point("outlier_int4:rule=absmax_max:feedback=on")) == "outlier_int4/k64:rule=absmax_max:feedback=on"
