"""The Gemma family's registry record: `GemmaModelConfig`, its config.json reader, its specs.

The spec module (and with it megatron-core's attention modules) is imported when a model is
built, not when the family registers.
"""

from __future__ import annotations

from typing import Any

from ..core.families import Family, register
from .config import GemmaModelConfig
from .hf_config import GEMMA_ARCHITECTURES, read_gemma


def _model_parts(cfg: GemmaModelConfig, layer_spec_transform: Any) -> Any:
    from .spec import gemma_model_parts

    return gemma_model_parts(cfg, layer_spec_transform)


def _transformer_overrides(cfg: GemmaModelConfig) -> dict[str, Any]:
    from .spec import gemma_transformer_overrides

    return gemma_transformer_overrides(cfg)


GEMMA = register(Family(
    name="gemma",
    config_class=GemmaModelConfig,
    architectures={arch: model_type for arch, (model_type, _) in GEMMA_ARCHITECTURES.items()},
    read_hf=read_gemma,
    model_parts=_model_parts,
    transformer_overrides=_transformer_overrides,
    gguf_architectures={"gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"},
    refused={
        "Gemma3ForConditionalGeneration": "Gemma3ForConditionalGeneration (vision + text) is not supported; "
        "convert a text-only Gemma 3 (Gemma3ForCausalLM, model_type gemma3_text)",
    },
    max_positions=8192,
    tie_embeddings=True,
))
