"""The --tp-comm-compression flags on a plain argparse parser, and CompressionConfig validation."""

import argparse

import pytest

from tpcomp_megatron.args import add_args, config_from_args
from tpcomp_megatron.megatron import CompressionConfig


def _parse(argv):
    return add_args(argparse.ArgumentParser(prog="t")).parse_args(argv)


def test_defaults_are_off():
    cfg = config_from_args(_parse([]))
    assert not cfg.enabled and cfg.layers == ("linear_proj", "linear_fc2") and not cfg.error_feedback


def test_error_feedback_flag_reaches_the_config_and_its_description():
    on = config_from_args(_parse(["--tp-comm-compression", "fp4_e2m1/b32/e6m2", "--tp-comm-error-feedback"]))
    off = config_from_args(_parse(["--tp-comm-compression", "fp4_e2m1/b32/e6m2"]))
    # Ranks that disagree on feedback must fail at setup: the description differs.
    assert on.error_feedback and on.describe() != off.describe()


def test_flags_build_a_validated_config():
    cfg = config_from_args(_parse(["--tp-comm-compression", "fp4_e2m1/b16", "--tp-comm-compression-layers",
                                   "linear_fc2", "--tp-comm-min-bytes", "0", "--tp-comm-link", "cpu"]))
    assert str(cfg.reduce_spec) == "fp4_e2m1/b16/e8m0" and cfg.layers == ("linear_fc2",) and cfg.min_bytes == 0


def test_bad_spec_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit):
        _parse(["--tp-comm-compression", "fp4_e9m9"])
    assert "unknown codec 'fp4_e9m9'" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs,needle", [
    (dict(spec="outlier_int4/k64"), "needs a calibration file"),
    (dict(spec="int4", layers=("linear_qkv",)), "choose one or more of"),
    (dict(spec="int4", gather_spec="outlier_int4"), "needs a block codec"),
    (dict(spec="int4", algorithm="ring"), "algorithm 'ring'"),
    (dict(spec="int4", min_bytes=-1), "min_bytes must be >= 0"),
    (dict(spec="int4", link="infiniband"), "unknown link class"),
])
def test_inconsistent_configs_raise(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        CompressionConfig(**kwargs)


def test_per_layer_override_flags():
    cfg = config_from_args(_parse(["--tp-comm-compression", "fp4_e2m1/b32/e8m0up",
                                   "--tp-comm-compression-override", "decoder.layers.0.*=fp8_e4m3/b32/e8m0up",
                                   "--tp-comm-compression-override", "*.linear_proj=none"]))
    assert str(cfg.layer_spec("decoder.layers.0.self_attention.linear_proj")) == "fp8_e4m3/b32/e8m0up"  # first match
    assert cfg.layer_spec("decoder.layers.5.self_attention.linear_proj") is None
    assert str(cfg.layer_spec("decoder.layers.5.mlp.linear_fc2")) == "fp4_e2m1/b32/e8m0up"
    assert "decoder.layers.0.*" in cfg.describe()  # ranks with different plans disagree at apply time
    only = CompressionConfig(overrides=(("decoder.layers.0.*", "int8/b32/bf16"),))
    assert only.enabled and only.layer_spec("decoder.layers.1.mlp.linear_fc2") is None


def test_bad_overrides(capsys):
    with pytest.raises(SystemExit):
        _parse(["--tp-comm-compression-override", "fp8_e4m3"])
    assert "expected PATTERN=SPEC" in capsys.readouterr().err
    with pytest.raises(ValueError, match="needs a calibration file"):
        CompressionConfig(spec="int4", overrides=(("decoder.layers.0.*", "outlier_int4/k64"),))


def test_transport_flag_reaches_the_config(capsys):
    cfg = config_from_args(_parse(["--tp-comm-compression", "fp4_e2m1/b32", "--tp-comm-transport", "symm_mem"]))
    assert cfg.transport == "symm_mem" and config_from_args(_parse([])).transport == "auto"
    with pytest.raises(SystemExit):
        _parse(["--tp-comm-transport", "carrier-pigeon"])
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown transport"):
        CompressionConfig(spec="fp4_e2m1/b32", transport="udp")
