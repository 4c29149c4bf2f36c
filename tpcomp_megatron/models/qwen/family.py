"""The Qwen family's registry record: `QwenModelConfig`, its config.json and GGUF readers, its specs."""

from __future__ import annotations

from ..core.families import Family, register
from .config import QwenModelConfig
from .hf_config import QWEN_ARCHITECTURES, qwen_gguf_fields, read_qwen
from .spec import qwen_model_parts, qwen_transformer_overrides

QWEN = register(Family(
    name="qwen",
    config_class=QwenModelConfig,
    architectures={arch: model_type for arch, (model_type, _) in QWEN_ARCHITECTURES.items()},
    read_hf=read_qwen,
    model_parts=qwen_model_parts,
    transformer_overrides=qwen_transformer_overrides,
    gguf_architectures={"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"},
    read_gguf=qwen_gguf_fields,
    max_positions=32768,
))
