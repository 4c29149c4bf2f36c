"""Model configs and builders: Llama-family, Gemma 1/2/3 and Qwen2/3 models as Megatron-core
GPTModels at any TP size."""

from .builder import (
    LayerSpecTransform,
    build_gpt_model,
    causal_attention_mask,
    llama_layer_spec,
    torch_dtype,
    transformer_config,
)
from .config import LlamaModelConfig, TokenizerRef, load_model_config, model_config_from_dict
from .gemma import GemmaModelConfig
from .heads import HeadLayout, plan_head_layout
from .hf_config import SUPPORTED_ARCHITECTURES, config_from_hf, supported_architectures
from .norm import RMSNorm
from .qwen import QwenModelConfig
from .rope import RopeScaling, rope_inv_freq, set_model_rope

__all__ = [
    "GemmaModelConfig",
    "HeadLayout",
    "LayerSpecTransform",
    "LlamaModelConfig",
    "QwenModelConfig",
    "RMSNorm",
    "RopeScaling",
    "SUPPORTED_ARCHITECTURES",
    "TokenizerRef",
    "build_gpt_model",
    "causal_attention_mask",
    "config_from_hf",
    "llama_layer_spec",
    "load_model_config",
    "model_config_from_dict",
    "plan_head_layout",
    "rope_inv_freq",
    "set_model_rope",
    "supported_architectures",
    "torch_dtype",
    "transformer_config",
]
