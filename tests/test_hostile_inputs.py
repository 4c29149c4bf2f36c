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
import struct
import time
from pathlib import Path

import pytest

from tpcomp_megatron.convert import cli, convert_hf_to_megatron
from tpcomp_megatron.convert.gguf_header import GGUFHeaderError, read_gguf_metadata
from tpcomp_megatron.convert.hf_io import open_hf_source
from tpcomp_megatron.convert.mapping import check_hf_tensors
from tpcomp_megatron.models.core.hf_config import config_from_hf

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


# -- GGUF headers ----------------------------------------------------------------------------------
def _kv_string(key: str, value: str) -> bytes:
    k, v = key.encode(), value.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<IQ", 8, len(v)) + v


def _gguf_header() -> bytes:
    """A header with every kind of value the reader walks: strings, scalars, arrays of scalars,
    of strings and of arrays."""
    def key(name: str) -> bytes:
        return struct.pack("<Q", len(name)) + name.encode()

    kvs = [_kv_string("general.architecture", "llama"),
           key("llama.block_count") + struct.pack("<II", 4, 2),
           key("llama.rope.freq_base") + struct.pack("<If", 6, 10000.0),
           key("llama.context_length") + struct.pack("<IQ", 10, 64),
           key("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, 3) + struct.pack("<3f", 0, 1, 2),
           key("tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, 2) + struct.pack("<Q", 1) + b"a"
           + struct.pack("<Q", 2) + b"bc",
           key("nested") + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 4, 2) + struct.pack("<2I", 7, 8),
           _kv_string("general.name", "tiny")]
    return b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs)


def _read_or_refused(path: Path) -> dict | None:
    t0 = time.perf_counter()
    try:
        out = read_gguf_metadata(path)
    except GGUFHeaderError as e:
        assert str(path) in str(e) and "\n" not in str(e), str(e)
        out = None
    assert time.perf_counter() - t0 < 1.0
    return out


def test_the_gguf_header_fixture_reads(tmp_path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(_gguf_header())
    meta = read_gguf_metadata(path)
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 2
    assert meta["general.name"] == "tiny" and meta["nested"] is None


def test_gguf_arrays_nested_5000_deep_are_refused(tmp_path):
    """Item 10: RecursionError before."""
    body = struct.pack("<Q", 6) + b"nested" + struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 5000
    path = tmp_path / "deep.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + body + bytes(64))
    with pytest.raises(GGUFHeaderError, match="nested deeper"):
        read_gguf_metadata(path)


@pytest.mark.parametrize("case", ["string", "scalar array", "string array"])
def test_gguf_lengths_past_any_offset_are_refused_naming_the_file(tmp_path, case):
    """Item 12: seeks of 2**63 bytes gave 'cannot fit int into an offset-sized integer' or
    OSError 22, without the file name."""
    key = struct.pack("<Q", 1) + b"k"
    body = {"string": key + struct.pack("<IIQ", 9, 8, 1) + struct.pack("<Q", 2**63 - 1),
            "scalar array": key + struct.pack("<IIQ", 9, 12, 2**62),
            "string array": key + struct.pack("<IIQ", 9, 8, 2**64 - 1)}[case]
    path = tmp_path / "big.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + body + bytes(64))
    with pytest.raises(GGUFHeaderError, match="runs past the end") as e:
        read_gguf_metadata(path)
    assert str(path) in str(e.value)


def test_fuzzed_gguf_headers_read_or_are_refused(tmp_path):
    """1200 seeded mutations (byte flips, length fields set to extremes, cuts, splices): each
    reads or raises one GGUFHeaderError naming the file, within a second."""
    base = _gguf_header()
    rng = random.Random(32)
    refused = 0
    extremes = [0, 1, 2**31, 2**32 - 1, 2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
    for i in range(1200):
        data = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            op, at = rng.randrange(5), rng.randrange(24, len(data))
            if op == 0:
                data[at] ^= 1 << rng.randrange(8)
            elif op == 1 and at + 8 <= len(data):
                data[at:at + 8] = struct.pack("<Q", rng.choice(extremes))
            elif op == 2 and at + 4 <= len(data):
                data[at:at + 4] = struct.pack("<I", rng.choice([7, 8, 9, 13, 2**31, 2**32 - 1]))
            elif op == 3:
                del data[at:]
            else:
                data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        path = tmp_path / f"{i % 8}.gguf"
        path.write_bytes(bytes(data))
        refused += _read_or_refused(path) is None
    assert refused > 600
