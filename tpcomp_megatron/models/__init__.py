"""Model configs and builders: Llama-family, Gemma 1/2/3 and Qwen2/3 models as Megatron-core
GPTModels at any TP size.

What every family shares lives in `core/` (`config`, `hf_config`, `builder`, the registry
`families`, and the layers they build on), which imports no family. The families register
themselves when imported here, above both: `llama` (Llama, Mistral, SmolLM2, on the core
modules), then the `gemma` and `qwen` folders. A new family is a folder that calls
`families.register` once, imported on the line below.
"""

from . import llama, gemma, qwen  # noqa: F401 (the families register themselves, in this order)
from .core import families
from .core.builder import (
    LayerSpecTransform,
    build_gpt_model,
    causal_attention_mask,
    llama_layer_spec,
    torch_dtype,
    transformer_config,
)
from .core.config import LlamaModelConfig, TokenizerRef, load_model_config, model_config_from_dict
from .core.families import Family, register, unregister
from .gemma import GemmaModelConfig
from .core.heads import HeadLayout, plan_head_layout
from .core.hf_config import config_from_hf, supported_architectures
from .llama import LLAMA_ARCHITECTURES
from .core.norm import RMSNorm
from .qwen import QwenModelConfig
from .core.rope import RopeScaling, rope_inv_freq, set_model_rope

__all__ = [
    "Family",
    "GemmaModelConfig",
    "HeadLayout",
    "LLAMA_ARCHITECTURES",
    "LayerSpecTransform",
    "LlamaModelConfig",
    "QwenModelConfig",
    "RMSNorm",
    "RopeScaling",
    "TokenizerRef",
    "build_gpt_model",
    "causal_attention_mask",
    "config_from_hf",
    "families",
    "llama_layer_spec",
    "load_model_config",
    "model_config_from_dict",
    "plan_head_layout",
    "register",
    "rope_inv_freq",
    "set_model_rope",
    "supported_architectures",
    "torch_dtype",
    "transformer_config",
    "unregister",
]
