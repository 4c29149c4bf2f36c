"""Qwen2 / Qwen2.5 and Qwen3 (dense) as Megatron-core GPTModels: config, HF config reader, spec.

A Qwen checkpoint pads and shards exactly like a Llama one; what differs is megatron-core's own
`add_qkv_bias` (Qwen2) and `qk_layernorm` (Qwen3), set by `qwen_transformer_overrides`. The family
registers itself on import (`family.py`, the `QWEN` record).
"""

from .config import QwenModelConfig
from .family import QWEN
from .hf_config import QWEN_ARCHITECTURES, qwen_config_from_hf

__all__ = ["QWEN", "QWEN_ARCHITECTURES", "QwenModelConfig", "qwen_config_from_hf"]
