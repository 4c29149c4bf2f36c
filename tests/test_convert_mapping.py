"""Unit tests, one process: head layouts, config validation and JSON, HF config parsing, rope
frequencies against transformers, and the exact inverses of the key map and TP sharding."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tpcomp_megatron.convert.mapping import (
    MappingError,
    check_hf_tensors,
    expected_hf_shapes,
    hf_to_megatron,
    megatron_to_hf,
    merge_shards,
    shard_for_rank,
)
from tpcomp_megatron.models import (
    HeadLayout,
    LlamaModelConfig,
    RopeScaling,
    config_from_hf,
    plan_head_layout,
    rope_inv_freq,
)

from convert_helpers import LLAMA3_ROPE, hf_config


@pytest.mark.parametrize(
    "heads,kv", [(9, 3), (9, 9), (8, 2), (32, 8), (15, 5), (6, 1), (12, 4), (14, 7)]
)
@pytest.mark.parametrize("tp", [1, 2, 3, 4, 8])
def test_head_layout_keeps_every_head_in_its_group(heads, kv, tp):
    layout = plan_head_layout(heads, kv, tp)
    assert layout.padded_num_kv_heads % tp == 0
    qsrc, ksrc, per = layout.query_sources(), layout.kv_sources(), layout.padded_heads_per_group
    assert len(qsrc) == layout.padded_num_heads and len(ksrc) == layout.padded_num_kv_heads
    assert sorted(s for s in qsrc if s >= 0) == list(range(heads))  # each query head exactly once
    assert {s for s in ksrc if s >= 0} == set(range(kv))
    for j, s in enumerate(qsrc):
        # GQA semantics: query head s must sit in a group whose K/V are its own group's.
        if s >= 0:
            assert ksrc[j // per] == s // (heads // kv)
    if kv % tp == 0:
        assert layout.is_identity


def test_head_layout_prefers_fewest_heads():
    assert (
        plan_head_layout(9, 3, 2).padded_num_heads,
        plan_head_layout(9, 3, 2).padded_num_kv_heads,
    ) == (12, 4)
    gqa = plan_head_layout(8, 2, 4)
    assert (gqa.kv_replication, gqa.dummy_groups, gqa.padded_num_heads) == (
        2,
        0,
        8,
    )  # no padding needed
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        HeadLayout(num_heads=9, num_kv_heads=2)


def _cfg(name: str, tp: int, **kw) -> LlamaModelConfig:
    return config_from_hf(hf_config(name).to_dict(), tensor_parallel_size=tp, **kw)


def test_config_json_round_trip(tmp_path):
    cfg = _cfg("odd", 2)
    cfg.save(tmp_path / "c.json")
    assert LlamaModelConfig.load(tmp_path / "c.json") == cfg
    assert cfg.rope_scaling == RopeScaling(**{k: v for k, v in LLAMA3_ROPE.items()})
    assert cfg.with_tensor_parallel_size(4).padded_vocab_size == 512


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(num_layers=0), "num_layers must be a positive integer"),
        (dict(num_attention_heads=9, num_kv_heads=2), "multiple of num_kv_heads"),
        (dict(params_dtype="int8"), "params_dtype must be one of"),
        (dict(head_dim=15), "head_dim must be even"),
        (dict(padded_vocab_size=100), "padded_vocab_size=100 must be >= vocab_size"),
        (dict(kv_replication=2), "set both kv_replication and dummy_kv_groups"),
    ],
)
def test_config_rejects_bad_values(change, match):
    base = dataclasses.asdict(_cfg("mha", 1))
    base.update(
        rope_scaling=None,
        tokenizer=None,
        padded_vocab_size=None,
        kv_replication=None,
        dummy_kv_groups=None,
    )
    base.update(change)
    with pytest.raises(ValueError, match=match):
        LlamaModelConfig(**base)


def test_config_load_rejects_foreign_json(tmp_path):
    (tmp_path / "a.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="not a tpcomp-llama-config"):
        LlamaModelConfig.load(tmp_path / "a.json")
    data = _cfg("mha", 1).to_dict()
    data["surprise"] = 1
    with pytest.raises(ValueError, match="unknown config fields"):
        LlamaModelConfig.from_dict(data)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(architectures=["GPT2LMHeadModel"], model_type="gpt2"), "unsupported architecture"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(attention_bias=True), "attention_bias"),
        (dict(sliding_window=4096), "sliding_window"),
        (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "not supported"),
    ],
)
def test_hf_config_rejects_what_would_change_the_function(change, match):
    hf = hf_config("mha").to_dict()
    hf.pop("rope_parameters", None)
    hf.update(change)
    with pytest.raises(ValueError, match=match):
        config_from_hf(hf, tensor_parallel_size=1)


def test_hf_config_reads_old_and_new_rope_formats():
    old = {
        **hf_config("mha").to_dict(),
        "rope_theta": 500000.0,
        "rope_scaling": {**LLAMA3_ROPE, "type": "llama3"},
    }
    old.pop("rope_parameters", None)
    new = hf_config("odd").to_dict()  # transformers 5 writes rope_parameters
    for hf in (old, new):
        cfg = config_from_hf(hf, tensor_parallel_size=1)
        assert cfg.rope_theta == 500000.0 and cfg.rope_scaling is not None
        assert (
            cfg.rope_scaling.rope_type == "llama3"
            and cfg.rope_scaling.original_max_position_embeddings == 32
        )


@pytest.mark.parametrize("name", ["mha", "gqa", "odd"])
def test_rope_inv_freq_is_transformers_bit_for_bit(name):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf = hf_config(name)
    cfg = config_from_hf(hf.to_dict(), tensor_parallel_size=1)
    ours = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    # Same operations in the same order in fp32: exact equality, not a tolerance.
    assert torch.equal(ours, LlamaRotaryEmbedding(hf).inv_freq)


def _random_hf(cfg: LlamaModelConfig, dtype=torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {k: torch.randn(s, generator=gen).to(dtype) for k, s in expected_hf_shapes(cfg).items()}


@pytest.mark.parametrize("name", ["mha", "gqa", "odd", "mistral"])
@pytest.mark.parametrize("tp", [1, 2, 3, 4])
def test_key_map_and_sharding_are_exact_inverses(name, tp):
    cfg = _cfg(name, tp)
    hf = _random_hf(cfg, torch.bfloat16 if cfg.params_dtype == "bfloat16" else torch.float32)
    check_hf_tensors(cfg, {k: tuple(v.shape) for k, v in hf.items()})
    mg = hf_to_megatron(cfg, hf.__getitem__)
    for k, t in mg.items():
        merged = merge_shards(k, [shard_for_rank(k, t, r, tp) for r in range(tp)])
        assert torch.equal(merged, t), k
    back = megatron_to_hf(cfg, mg)
    assert sorted(back) == sorted(hf)
    for k in hf:
        assert back[k].dtype == hf[k].dtype and torch.equal(back[k], hf[k]), k


def test_padding_is_zero():
    cfg = _cfg("odd", 2)  # 9 heads / 3 KV at TP=2: one dummy group of 3 zero heads
    mg = hf_to_megatron(cfg, _random_hf(cfg).__getitem__)
    d, h = cfg.head_dim, cfg.hidden_size
    qkv = mg["decoder.layers.0.self_attention.linear_qkv.weight"].view(4, 5, d, h)
    assert torch.count_nonzero(qkv[3]) == 0 and torch.count_nonzero(qkv[:3]) == qkv[:3].numel()
    proj = mg["decoder.layers.0.self_attention.linear_proj.weight"]
    assert torch.count_nonzero(proj[:, 9 * d :]) == 0
    assert torch.count_nonzero(mg["embedding.word_embeddings.weight"][cfg.vocab_size :]) == 0


def test_check_hf_tensors_names_the_problem():
    cfg = _cfg("gqa", 1)
    shapes = dict(expected_hf_shapes(cfg))
    del shapes["model.layers.1.self_attn.k_proj.weight"]
    shapes["model.layers.0.mlp.up_proj.weight"] = (1, 1)
    shapes["model.extra.weight"] = (3,)
    with pytest.raises(MappingError) as e:
        check_hf_tensors(cfg, shapes)
    msg = str(e.value)
    assert "model.layers.1.self_attn.k_proj.weight" in msg and "model.extra.weight" in msg
    assert "up_proj.weight: (1, 1) != (90, 64)" in msg
