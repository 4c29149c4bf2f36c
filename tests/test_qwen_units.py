"""Qwen units without ranks: what the config reader refuses, the QKV-bias layout through padded
heads, the GGUF header reader, and an unsupported model refused before any tensor is touched."""

from __future__ import annotations

import struct
import time

import pytest
import torch

from tpcomp_megatron.convert.gguf_header import GGUFHeaderError, read_gguf_metadata
from tpcomp_megatron.convert.mapping import (
    hf_to_megatron,
    megatron_to_hf,
    merge_shards,
    shard_for_rank,
)
from tpcomp_megatron.models import config_from_hf
from tpcomp_megatron.models.qwen import QwenModelConfig

from qwen_helpers import hf_config, make_hf_model, write_gguf


def _hf(name: str, **changes) -> dict:
    return hf_config(name, **changes).to_dict()


@pytest.mark.parametrize(
    "name,change,match",
    [
        ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1), "sliding-window"),
        ("qwen3", dict(attention_bias=True), "attention_bias"),
        ("qwen2", dict(hidden_act="gelu"), "hidden_act"),
        ("qwen2", dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                        "original_max_position_embeddings": 32}), "not supported"),
    ],
)
def test_config_reader_refuses_what_would_change_the_function(name, change, match):
    with pytest.raises(ValueError, match=match):
        config_from_hf(_hf(name, **change), tensor_parallel_size=1)


def test_config_reader_reads_qwen_features():
    q2 = config_from_hf(_hf("qwen2"), tensor_parallel_size=4)
    assert isinstance(q2, QwenModelConfig) and q2.qkv_bias and not q2.qk_norm
    assert (q2.rope_theta, q2.head_dim, q2.tie_word_embeddings) == (1_000_000.0, 8, False)
    q3 = config_from_hf(_hf("qwen3_tied"), tensor_parallel_size=2)
    assert q3.qk_norm and not q3.qkv_bias and (q3.head_dim, q3.tie_word_embeddings) == (16, True)
    # A transformers 4.x config.json (Qwen2.5 style): rope_theta at top level, window switched off.
    old = {k: v for k, v in _hf("qwen2").items() if k not in ("rope_parameters", "layer_types")}
    old.update(rope_theta=1_000_000.0, rope_scaling=None, use_sliding_window=False, sliding_window=32768,
               max_window_layers=21)
    assert config_from_hf(old, tensor_parallel_size=1).rope_theta == 1_000_000.0


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_qkv_bias_follows_the_padded_head_layout(tp):
    """Zero query heads get zero bias, replicated KV groups copy theirs, and the mapping and the
    TP split both invert exactly."""
    model = make_hf_model("qwen2_tied")  # 3 heads over 1 KV head: replication and zero heads at TP=2, 4
    cfg = config_from_hf(model.config.to_dict(), tensor_parallel_size=tp)
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    mg = hf_to_megatron(cfg, sd.__getitem__)
    bias = mg["decoder.layers.0.self_attention.linear_qkv.bias"]
    layout, d = cfg.head_layout, cfg.head_dim
    groups = bias.view(layout.padded_num_kv_heads, layout.padded_heads_per_group + 2, d)
    q = sd["model.layers.0.self_attn.q_proj.bias"].view(-1, d)
    for g, src in enumerate(layout.query_sources()):
        row = groups[g // layout.padded_heads_per_group, g % layout.padded_heads_per_group]
        assert torch.equal(row, q[src] if src >= 0 else torch.zeros(d)), (g, src)
    name = "decoder.layers.0.self_attention.linear_qkv.bias"
    assert torch.equal(merge_shards(name, [shard_for_rank(name, bias, r, tp) for r in range(tp)]), bias)
    back = megatron_to_hf(cfg, mg)
    assert all(torch.equal(back[k], sd[k]) for k in back) and sorted(back) == sorted(
        k for k in sd if not (cfg.tie_word_embeddings and k == "lm_head.weight"))


def test_gguf_header_reader_reads_scalars_and_stops(tmp_path):
    path = write_gguf(make_hf_model("qwen3"), tmp_path / "q3.gguf")
    meta = read_gguf_metadata(path)
    assert meta["general.architecture"] == "qwen3" and meta["qwen3.attention.key_length"] == 12
    assert meta["qwen3.block_count"] == 2 and meta["tokenizer.ggml.tokens"] is None  # arrays skipped
    first = read_gguf_metadata(path, stop=lambda k: k != "general.architecture")
    assert first == {"general.architecture": "qwen3"}
    (tmp_path / "bad.gguf").write_bytes(b"GGML" + bytes(20))
    with pytest.raises(GGUFHeaderError, match="not a GGUF file"):
        read_gguf_metadata(tmp_path / "bad.gguf")
    (tmp_path / "cut.gguf").write_bytes(path.read_bytes()[:40])
    with pytest.raises(GGUFHeaderError, match="cut short"):
        read_gguf_metadata(tmp_path / "cut.gguf")
    # a corrupt key length (2**40 bytes) is refused before anything that size is read or allocated
    head = b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 1 << 40) + b"general.architecture"
    (tmp_path / "corrupt.gguf").write_bytes(head)
    with pytest.raises(GGUFHeaderError, match="runs past the end of the file"):
        read_gguf_metadata(tmp_path / "corrupt.gguf")


def _forbid_tensor_reads(monkeypatch) -> None:
    """Any tensor read or de-quantization (gguf's, or transformers' GGUF loading) raises."""
    import gguf
    import gguf.quants
    import transformers
    import transformers.modeling_gguf_pytorch_utils as tg

    def boom(*args, **kwargs):
        raise AssertionError("a tensor was read or de-quantized before the architecture check")

    monkeypatch.setattr(gguf, "dequantize", boom)
    monkeypatch.setattr(gguf.quants, "dequantize", boom)
    monkeypatch.setattr(gguf, "GGUFReader", boom)
    monkeypatch.setattr(tg, "load_gguf_checkpoint", boom)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)


def test_unsupported_gguf_fails_fast_before_any_tensor_read(tmp_path, monkeypatch, capsys):
    """The issue's case: a GGUF of an architecture we do not convert fails in well under a second
    (it used to de-quantize everything first), naming the supported ones; nothing is written."""
    from tpcomp_megatron.convert.cli import main

    path = write_gguf(make_hf_model("qwen2"), tmp_path / "foo.gguf", arch="foo")
    _forbid_tensor_reads(monkeypatch)
    start = time.perf_counter()
    code = main([str(path), str(tmp_path / "out"), "--tp", "2", "--verify", "--no-progress"])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2 and "unsupported architecture 'foo'" in err
    assert "qwen2 (Qwen2ForCausalLM)" in err and "qwen3 (Qwen3ForCausalLM)" in err and "llama" in err
    print(f"refused in {elapsed * 1e3:.1f} ms")
    assert elapsed < 0.5, f"refusal took {elapsed:.2f} s"
    assert not (tmp_path / "out").exists()


def test_unsupported_hf_folder_fails_before_weights_are_opened(tmp_path, monkeypatch):
    """A config.json naming another architecture is refused before any weight file is read."""
    import json

    import safetensors

    from tpcomp_megatron.convert import SourceError, open_hf_source

    folder = tmp_path / "hf"
    make_hf_model("qwen3", folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["FooForCausalLM"]}))

    def boom(*args, **kwargs):
        raise AssertionError("a weight file was opened before the architecture check")

    monkeypatch.setattr(safetensors, "safe_open", boom)
    with pytest.raises(SourceError, match=r"unsupported architecture \['FooForCausalLM'\]; supported: .*Qwen3ForCausalLM"):
        open_hf_source(folder)
