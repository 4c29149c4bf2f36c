"""Gemma 1, 2 and 3 (text) as Megatron-core GPTModels: config, layers, attention, layer specs.

The family registers itself on import (`family.py`, the `GEMMA` record): `config_from_hf` then
returns a `GemmaModelConfig` for Gemma architectures, and `build_gpt_model(cfg)` builds one from
it with `spec.py`'s layer specs.
"""

from .config import GemmaModelConfig
from .family import GEMMA
from .hf_config import GEMMA_ARCHITECTURES, gemma_config_from_hf

__all__ = ["GEMMA", "GEMMA_ARCHITECTURES", "GemmaModelConfig", "gemma_config_from_hf"]
