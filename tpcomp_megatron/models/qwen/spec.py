"""Qwen layer specs and TransformerConfig settings for `build_gpt_model` (through the family
record in `family.py`).

Everything is megatron-core's own: `add_qkv_bias` gives `linear_qkv` its bias (Qwen2), and
`qk_layernorm` puts a norm over each query / key head between the QKV split and rope (Qwen3), as
Hugging Face applies `q_norm` / `k_norm`. The layer is Llama's local spec otherwise, so
`linear_proj` / `linear_fc2` are the same classes and `apply_tp_compression` treats them alike.
"""

from __future__ import annotations

from typing import Any

from ..core.builder import LayerSpecTransform, ModelParts, llama_layer_spec
from ..core.norm import RMSNorm
from .config import QwenModelConfig


def qwen_transformer_overrides(cfg: QwenModelConfig) -> dict[str, Any]:
    """TransformerConfig fields that differ from the Llama defaults of `transformer_config`."""
    return dict(add_qkv_bias=cfg.qkv_bias, qk_layernorm=cfg.qk_norm)


def qwen_model_parts(cfg: QwenModelConfig, layer_spec_transform: LayerSpecTransform | None) -> ModelParts:
    """One spec for every layer (Qwen's layers are alike), our RMSNorm in every norm slot."""
    layer = llama_layer_spec(layer_spec_transform, qk_norm=cfg.qk_norm)
    return ModelParts(layer_specs=[layer] * cfg.num_layers, final_norm=RMSNorm)
