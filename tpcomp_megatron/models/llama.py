"""The Llama family (Llama 2/3.x, Mistral, SmolLM2): its registry record and config.json reader.

Its config is the base `LlamaModelConfig` (`config.py`) and its layer spec the base one
(`builder.llama_model_parts`); what is Llama's own is the reader below, which refuses what the
base layer cannot reproduce exactly (other activations, biases, sliding windows, partial rotary).
SmolLM2 is a `LlamaForCausalLM`; a GGUF of any of them says `llama` (or `mistral`).
"""

from __future__ import annotations

from typing import Any

from .core.builder import llama_model_parts
from .core.config import LlamaModelConfig
from .core.families import Family, register
from .core.hf_config import require_silu, rope_fields, unsupported

LLAMA_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
"""The Llama family's classes and model types."""


def read_llama(hf: dict[str, Any], arch: str, fields: dict[str, Any]) -> LlamaModelConfig:
    """The Llama family's `Family.read_hf`: its refusals, then the config with the shared rope."""
    require_silu(hf)
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise unsupported(f"{flag}=True")
    window = hf.get("sliding_window")
    if window is not None and hf.get("use_sliding_window", True):
        raise unsupported(f"sliding_window={window}")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise unsupported(f"partial_rotary_factor={hf['partial_rotary_factor']}")
    return LlamaModelConfig(**rope_fields(hf), **fields)


LLAMA = register(Family(
    name="llama",
    config_class=LlamaModelConfig,
    architectures=LLAMA_ARCHITECTURES,
    read_hf=read_llama,
    model_parts=llama_model_parts,
    # Llama, SmolLM2 and Mistral GGUFs say "llama" (transformers tells Mistral by name).
    gguf_architectures={"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"},
    max_positions=4096,
))
