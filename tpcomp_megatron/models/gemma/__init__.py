"""Gemma 1, 2 and 3 (text) as Megatron-core GPTModels: config, layers, attention, layer specs.

`build_gpt_model(cfg)` builds one when `cfg` is a `GemmaModelConfig`; the converter reads HF
Gemma checkpoints through `config_from_hf`, which returns one for Gemma architectures.
"""

from .config import GemmaModelConfig
from .hf_config import GEMMA_ARCHITECTURES, gemma_config_from_hf

__all__ = ["GEMMA_ARCHITECTURES", "GemmaModelConfig", "gemma_config_from_hf"]
