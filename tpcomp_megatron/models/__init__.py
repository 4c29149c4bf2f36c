"""Model configs and builders: Llama-family, Gemma 1/2/3 and Qwen2/3 models as Megatron-core
GPTModels at any TP size.

The base modules (`config`, `hf_config`, `builder`) serve every family through the registry
(`families`); the families register themselves when imported here: `llama` (Llama, Mistral,
SmolLM2, on the base modules), then the `gemma` and `qwen` folders. A new family is a folder that
calls `families.register` once, imported on the line below.
"""

from . import llama, gemma, qwen  # the families register themselves, in this order
from .builder import (
    LayerSpecTransform,
    build_gpt_model,
    causal_attention_mask,
    llama_layer_spec,
    torch_dtype,
    transformer_config,
)
from .config import LlamaModelConfig, TokenizerRef, load_model_config, model_config_from_dict
from .families import Family, register, unregister
from .gemma import GemmaModelConfig
from .heads import HeadLayout, plan_head_layout
from .hf_config import config_from_hf, supported_architectures
from .llama import LLAMA_ARCHITECTURES
from .norm import RMSNorm
from .qwen import QwenModelConfig
from .rope import RopeScaling, rope_inv_freq, set_model_rope

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
