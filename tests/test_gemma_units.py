"""Gemma pieces without ranks: the capped/windowed softmax against a direct reference, config
validation and JSON round trips, reading HF configs (both rope layouts), refusals."""

from __future__ import annotations

import pytest
import torch

from tpcomp_megatron.models.core.config import load_model_config
from tpcomp_megatron.models.gemma import GemmaModelConfig, gemma_config_from_hf
from tpcomp_megatron.models.gemma.attention import CappedWindowSoftmax
from tpcomp_megatron.models.gemma.layers import ZeroCenteredRMSNorm


def _reference_probs(scores, sk_offset, window, cap, mask):
    """HF eager's order: cap, add a finfo.min mask (causal, window of `window` tokens), softmax."""
    s = cap * torch.tanh(scores / cap) if cap else scores.clone()
    sq, sk = s.shape[-2:]
    add = torch.zeros(sq, sk)
    for i in range(sq):
        q = i + sk_offset
        for j in range(sk):
            if (
                j > q
                or (window is not None and q - j >= window)
                or (mask is not None and mask[i, j])
            ):
                add[i, j] = torch.finfo(torch.float32).min
    return torch.softmax(s + add, dim=-1)


@pytest.mark.parametrize("sq,sk", [(7, 7), (2, 7), (1, 9)])  # prefill, chunked, decode
@pytest.mark.parametrize("window,cap", [(None, None), (3, None), (3, 1.5), (None, 1.5)])
def test_capped_window_softmax(sq, sk, window, cap):
    scores = 4 * torch.randn(2, 3, sq, sk, generator=torch.Generator().manual_seed(sq * sk))
    mask = torch.zeros(sq, sk, dtype=torch.bool)
    mask[:, 0] = sk > 2  # an extra given mask is combined with, not replacing, the causal window
    soft = CappedWindowSoftmax(
        causal=True, window_size=None if window is None else (window - 1, 0), softcap=cap
    )
    got = soft(scores, mask[None, None])
    ref = _reference_probs(scores, sk - sq, window, cap, mask)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)


def test_zero_centered_norm_matches_hf():
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    class Cfg:
        use_cpu_initialization, params_dtype, sequence_parallel = True, torch.float32, False

    ours, theirs = ZeroCenteredRMSNorm(Cfg(), 16, eps=1e-6), Gemma3RMSNorm(16, eps=1e-6)
    w = torch.randn(16)
    with torch.no_grad():
        ours.weight.copy_(w)
        theirs.weight.copy_(w)
    x = torch.randn(3, 5, 16, dtype=torch.bfloat16)  # bf16: Gemma scales before the cast back
    assert torch.equal(ours(x), theirs(x))


def _g3(**kw):
    base = dict(
        num_layers=6,
        hidden_size=64,
        ffn_hidden_size=90,
        num_attention_heads=4,
        num_kv_heads=1,
        head_dim=32,
        vocab_size=250,
        max_position_embeddings=128,
        gemma_version=3,
        sliding_window=4,
        layer_types=("sliding_attention",) * 5 + ("full_attention",),
        local_rope_theta=10_000.0,
        rope_theta=1e6,
    )
    return GemmaModelConfig(**{**base, **kw})


def test_config_json_round_trip(tmp_path):
    cfg = _g3(tensor_parallel_size=2)
    cfg.save(tmp_path / "c.json")
    back = load_model_config(tmp_path / "c.json")
    assert back == cfg and isinstance(back, GemmaModelConfig) and back.kv_replication == 2
    assert back.with_tensor_parallel_size(4).kv_replication == 4


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(sliding_window=None), "sliding_window"),
        (dict(layer_types=("sliding_attention",) * 5), "6 layers"),
        (dict(layer_types=("local",) * 6), "unknown"),
        (dict(attn_logit_softcapping=50.0), "no attention soft-cap"),
        (dict(final_logit_softcapping=-1.0), "positive"),
        (dict(activation="relu"), "activation"),
        (dict(gemma_version=4), "gemma_version"),
    ],
)
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        _g3(**kw)


def _hf3(**kw):
    hf = dict(
        architectures=["Gemma3ForCausalLM"],
        model_type="gemma3_text",
        num_hidden_layers=6,
        hidden_size=64,
        intermediate_size=90,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        vocab_size=250,
        sliding_window=4,
        query_pre_attn_scalar=24,
        hidden_activation="gelu_pytorch_tanh",
    )
    return {**hf, **kw}


def test_hf_gemma3_old_and_new_rope_layouts():
    old = gemma_config_from_hf(
        _hf3(
            rope_theta=1e6,
            rope_local_base_freq=1e4,
            rope_scaling={"rope_type": "linear", "factor": 8.0},
        ),
        tensor_parallel_size=1,
    )
    new = gemma_config_from_hf(
        _hf3(
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
            }
        ),
        tensor_parallel_size=1,
    )
    for cfg in (old, new):
        assert (cfg.rope_theta, cfg.local_rope_theta, cfg.local_rope_scaling) == (1e6, 1e4, None)
        assert cfg.rope_scaling.factor == 8.0 and cfg.layer_rope(0) == (1e4, None)
        assert cfg.layer_rope(5)[0] == 1e6 and cfg.is_sliding(4) and not cfg.is_sliding(5)
        assert cfg.softmax_scale == 24**-0.5 and cfg.tie_word_embeddings


def test_hf_gemma1_legacy_gelu_and_refusals():
    g1 = gemma_config_from_hf(
        dict(
            architectures=["GemmaForCausalLM"],
            num_hidden_layers=2,
            hidden_size=64,
            intermediate_size=96,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            vocab_size=250,
            hidden_act="gelu",
        ),
        tensor_parallel_size=2,
    )
    # transformers runs Gemma 1's legacy "gelu" as the tanh approximation; so do we.
    assert g1.activation == "gelu_pytorch_tanh" and g1.layer_types is None and not g1.post_norms
    with pytest.raises(ValueError, match="ConditionalGeneration"):
        gemma_config_from_hf(
            _hf3(architectures=["Gemma3ForConditionalGeneration"]), tensor_parallel_size=1
        )
    with pytest.raises(ValueError, match="use_bidirectional_attention"):
        gemma_config_from_hf(_hf3(use_bidirectional_attention=True), tensor_parallel_size=1)
    with pytest.raises(ValueError, match="activation"):
        gemma_config_from_hf(_hf3(hidden_activation="silu"), tensor_parallel_size=1)


def test_spec_refuses_core_attention_without_caps_or_windows():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from tpcomp_megatron.models.gemma.spec import gemma_layer_spec

    def stock(spec):
        spec.submodules.self_attention.submodules.core_attention = DotProductAttention

    with pytest.raises(ValueError, match="GemmaDotProductAttention"):
        gemma_layer_spec(_g3(), 0, stock)
