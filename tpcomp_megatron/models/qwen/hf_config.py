"""Read a Hugging Face Qwen2 / Qwen3 `config.json` into a `QwenModelConfig`, refusing what would
change the function: sliding-window layers, Qwen3's `attention_bias` (it also biases o_proj),
activations other than SiLU, rope scalings we do not reproduce (YaRN).

`read_qwen` is the family's `Family.read_hf` (the shared fields and Llama's rope reading come
from `hf_config`); `qwen_gguf_fields` its `Family.read_gguf`.
"""

from __future__ import annotations

from typing import Any, Mapping

from ..core.hf_config import config_from_hf, require_silu, rope_fields, unsupported
from .config import QwenModelConfig

QWEN_ARCHITECTURES = {"Qwen2ForCausalLM": ("qwen2", 2), "Qwen3ForCausalLM": ("qwen3", 3)}
"""Qwen class name -> (model_type, Qwen version)."""


def _check_no_sliding_layers(hf: dict[str, Any], layers: int) -> None:
    """Qwen's sliding window is off in every released config (`use_sliding_window: false`); when
    on, HF makes layers >= max_window_layers sliding, which our Llama-style attention would not."""
    types = hf.get("layer_types")
    if types is not None:
        sliding = [i for i, t in enumerate(types) if t != "full_attention"]
    elif hf.get("use_sliding_window") and hf.get("sliding_window") is not None:
        sliding = list(range(int(hf.get("max_window_layers", layers)), layers))
    else:
        sliding = []
    if sliding:
        raise unsupported(f"sliding-window attention (layers {sliding[:6]}, sliding_window="
                          f"{hf.get('sliding_window')})")


def qwen_config_from_hf(hf: dict[str, Any], **options: Any) -> QwenModelConfig:
    """Our config from a Qwen2 / Qwen3 config dict (config.json or `to_dict()`): `config_from_hf`
    (same options), refusing any other family's config."""
    return config_from_hf(hf, family="qwen", **options)  # type: ignore[return-value]


def read_qwen(hf: dict[str, Any], arch: str, fields: dict[str, Any]) -> QwenModelConfig:
    """Qwen's `Family.read_hf`: its refusals, then the config with the shared rope."""
    version = QWEN_ARCHITECTURES[arch][1]
    require_silu(hf)
    if version == 3 and hf.get("attention_bias"):
        raise unsupported("Qwen3 attention_bias=True (biases q, k, v and o_proj; no released Qwen3 sets it)")
    _check_no_sliding_layers(hf, fields["num_layers"])
    return QwenModelConfig(**rope_fields(hf), qwen_version=version, **fields)


def qwen_gguf_fields(arch: str, meta: Mapping[str, Any]) -> dict[str, Any]:
    """Config fields transformers' GGUF reader gets wrong: it does not read
    `qwen3.attention.key_length` and takes Qwen3Config's default head_dim (128, right for every
    released Qwen3), so a Qwen3 with another head_dim needs `head_dim` set."""
    key_length = meta.get(f"{arch}.attention.key_length")
    if arch != "qwen3" or key_length is None:
        return {}
    from transformers import Qwen3Config

    if int(key_length) == Qwen3Config().head_dim:
        return {}
    return {"head_dim": int(key_length)}
