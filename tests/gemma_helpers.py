"""Tiny random Hugging Face Gemma 1/2/3 models, built offline, for the Gemma tests.

Sizes are chosen so every Gemma feature changes the logits of a 12-token test: a sliding window
of 4 tokens, `query_pre_attn_scalar` != head_dim, rope bases that differ per layer type (with the
global one linearly scaled), norms perturbed away from their zero init, and weights large enough
(initializer_range 0.2) that soft-caps sized to this model (attention 2, final 3) bend its scores.
Head counts (4 query heads over 1 or 2 KV heads) need KV replication at TP=2 and 4.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

COMMON: dict[str, Any] = dict(
    num_hidden_layers=2,
    hidden_size=64,
    intermediate_size=90,  # not divisible by 4: FFN padding at TP=4
    num_attention_heads=4,
    vocab_size=250,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
    initializer_range=0.2,
    tie_word_embeddings=True,
)

VARIANTS: dict[str, dict[str, Any]] = {
    "gemma1": dict(num_key_value_heads=1, head_dim=32),
    "gemma2": dict(
        num_hidden_layers=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=4,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=3.0,
        tie_word_embeddings=False,
    ),
    "gemma3": dict(
        num_hidden_layers=6,  # the 5:1 pattern: layers 0-4 sliding, 5 global
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=24,
        sliding_window=4,
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        },
    ),
}


def hf_config(name: str, **changes: Any) -> Any:
    from transformers import Gemma2Config, Gemma3TextConfig, GemmaConfig

    kw = {**copy.deepcopy(COMMON), **copy.deepcopy(VARIANTS[name]), **changes}
    if name == "gemma1":
        return GemmaConfig(architectures=["GemmaForCausalLM"], **kw)
    if name == "gemma2":
        return Gemma2Config(architectures=["Gemma2ForCausalLM"], **kw)
    return Gemma3TextConfig(architectures=["Gemma3ForCausalLM"], **kw)


def make_hf_model(name: str, folder: Path | None = None, **changes: Any) -> Any:
    """Variant `name` (saved to `folder` if given) in fp32 with eager attention."""
    from transformers import AutoModelForCausalLM

    config = hf_config(name, **changes)
    config._attn_implementation = "eager"
    torch.manual_seed(sum(map(ord, name)))  # str hash() is salted per process
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        # Norms start at zero (scale 1 + 0); perturb them so a swapped norm cannot go unnoticed.
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    if folder is not None:
        model.save_pretrained(folder)
    return model.eval()


def reference_logits(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        return model(tokens).logits.float()
