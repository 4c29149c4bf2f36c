"""Hostile model configs, converted checkpoints and GGUF headers (issue 32): each ends in one
ValueError naming the file and field, fast, never a traceback of another type, a hang, a large
allocation or a silently different model.

Before: `num_attention_heads: 0` raised ZeroDivisionError; `num_hidden_layers: 100000000` kept the
converter busy past 60 s; a config.json with both `rope_scaling` and `rope_parameters` converted
with another rope than transformers reads; Infinity raised OverflowError.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import time
from pathlib import Path

import pytest

from tpcomp_megatron.convert import cli, convert_hf_to_megatron
from tpcomp_megatron.convert.hf_io import open_hf_source
from tpcomp_megatron.convert.mapping import check_hf_tensors
from tpcomp_megatron.models.hf_config import config_from_hf

from convert_helpers import make_hf_model


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("src") / "hf_mha"
    make_hf_model("mha", folder)
    return folder


def _edited(hf_dir: Path, tmp_path: Path, **changes) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(hf_dir, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _convert_refused(src: Path, tmp_path: Path, match: str, capsys) -> str:
    t0 = time.perf_counter()
    rc = cli.main([str(src), str(tmp_path / "out"), "--tp", "2", "--formats", "legacy", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and time.perf_counter() - t0 < 10
    lines = err.strip().splitlines()
    assert len(lines) == 1 and str(src) in lines[0] and match in lines[0], err
    assert not (tmp_path / "out").exists()
    return lines[0]


def test_zero_heads_is_one_clear_error(hf_dir, tmp_path, capsys):
    """Item 13: `num_attention_heads: 0` without head_dim (ZeroDivisionError before)."""
    src = _edited(hf_dir, tmp_path, num_attention_heads=0, head_dim=None)
    _convert_refused(src, tmp_path, "'num_attention_heads'", capsys)


def test_a_huge_layer_count_is_refused_at_once(hf_dir, tmp_path, capsys):
    """Item 8: sizes are bounded by the tensors present before anything is built (60 s+ before)."""
    src = _edited(hf_dir, tmp_path, num_hidden_layers=100_000_000)
    _convert_refused(src, tmp_path, "'num_hidden_layers' is 100000000", capsys)


@pytest.mark.parametrize("value", ["Infinity", "1e300", "true", '"12"', "2.5", "-3", str(10 ** 400)],
                         ids=["inf", "1e300", "true", "str", "2.5", "-3", "10**400"])
def test_odd_sizes_are_refused_naming_the_field(hf_dir, tmp_path, capsys, value):
    """Infinity gave OverflowError, "12" and 2.5 were taken as 12 and 2."""
    src = _edited(hf_dir, tmp_path)
    text = (src / "config.json").read_text()
    cfg = json.loads(text)
    (src / "config.json").write_text(text.replace(f'"hidden_size": {cfg["hidden_size"]}', f'"hidden_size": {value}'))
    _convert_refused(src, tmp_path, "'hidden_size'", capsys)


def test_both_rope_keys_that_differ_are_refused(hf_dir, tmp_path, capsys):
    """Item 3: transformers 5 reads rope_scaling (linear x4, theta 1e4) where we read theta 1e6."""
    src = _edited(hf_dir, tmp_path, rope_scaling={"rope_type": "linear", "factor": 4.0},
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    _convert_refused(src, tmp_path, "both 'rope_scaling' and 'rope_parameters'", capsys)


def test_both_rope_keys_that_agree_convert(hf_dir, tmp_path):
    rope = {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}
    src = _edited(hf_dir, tmp_path, rope_scaling=rope, rope_parameters=rope)
    cfg = convert_hf_to_megatron(src, tmp_path / "out", tp=2, formats=["legacy"], progress=False)
    assert cfg.rope_scaling is not None and cfg.rope_theta == 10000.0


# -- the config fuzzer -----------------------------------------------------------------------------
_HOSTILE = [None, True, False, 0, -1, 1, 2, 3, 7, 2 ** 31, 2 ** 33, 10 ** 300, 1.5, float("nan"), float("inf"),
            -float("inf"), 1e300, "", "8", "silu", "gelu", [], [1], {}, {"rope_type": "linear", "factor": 0},
            {"rope_type": "llama3", "factor": 8.0}, {"rope_type": "yarn"}, {"rope_theta": -1}, 100_000_000]
_FIELDS = ["num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
           "head_dim", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_scaling",
           "rope_parameters", "tie_word_embeddings", "hidden_act", "attention_bias", "mlp_bias", "sliding_window",
           "partial_rotary_factor", "torch_dtype", "architectures", "model_type"]


def test_fuzzed_configs_convert_or_are_refused(hf_dir):
    """200 seeded hostile config.json variants: each gives a config that matches the tensors, or
    one ValueError; each within a second, never another exception."""
    src = open_hf_source(hf_dir)
    rng = random.Random(32)
    refused = 0
    for i in range(200):
        hf = copy.deepcopy(src.config)
        for _ in range(rng.randint(1, 3)):
            field = rng.choice(_FIELDS)
            if rng.random() < 0.15:
                hf.pop(field, None)
            else:
                hf[field] = copy.deepcopy(rng.choice(_HOSTILE))
        t0 = time.perf_counter()
        try:
            cfg = config_from_hf(hf, tensor_parallel_size=rng.choice([1, 2, 4]), source=str(hf_dir))
            check_hf_tensors(cfg, src.shapes)
        except ValueError:
            refused += 1
        assert time.perf_counter() - t0 < 1.0, f"mutation {i} took {time.perf_counter() - t0:.1f} s: {hf}"
    assert refused > 150
