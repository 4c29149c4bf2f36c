"""The --tp-comm-compression flags on a plain argparse parser, and CompressionConfig validation."""

import argparse

import pytest

from tpcomp_megatron.args import add_args, config_from_args
from tpcomp_megatron.megatron import CompressionConfig


def _parse(argv):
    return add_args(argparse.ArgumentParser(prog="t")).parse_args(argv)


def test_defaults_are_off():
    cfg = config_from_args(_parse([]))
    assert not cfg.enabled and cfg.layers == ("linear_proj", "linear_fc2")


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
