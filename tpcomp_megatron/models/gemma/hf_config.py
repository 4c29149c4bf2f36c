"""Read a Hugging Face Gemma / Gemma 2 / Gemma 3 (text) config into a `GemmaModelConfig`.

`read_gemma` is the family's `Family.read_hf`: `hf_config.config_from_hf` has read the fields every
family shares; this adds Gemma's own. Accepts both the transformers 5 layout (`rope_parameters`, per
layer type for Gemma 3) and the 4.x one (`rope_theta`, `rope_local_base_freq`, `rope_scaling`), and
refuses what would change the function: biases, bidirectional attention, activations other than
GELU.
"""

from __future__ import annotations

from typing import Any

from ..core.hf_config import config_from_hf, unsupported
from ..core.rope import RopeScaling
from .config import FULL, SLIDING, GemmaModelConfig

GEMMA_ARCHITECTURES = {
    "GemmaForCausalLM": ("gemma", 1),
    "Gemma2ForCausalLM": ("gemma2", 2),
    "Gemma3ForCausalLM": ("gemma3_text", 3),
}
"""Gemma class name -> (model_type, Gemma version)."""


def _rope(params: dict[str, Any] | None, fallback_theta: float) -> tuple[float, RopeScaling | None]:
    params = params or {}
    theta = float(params.get("rope_theta", fallback_theta))
    return theta, RopeScaling.from_hf(params)


def gemma_config_from_hf(hf: dict[str, Any], **options: Any) -> GemmaModelConfig:
    """Our config from a Gemma config dict (config.json or `to_dict()`): `config_from_hf` (same
    options), refusing any other family's config."""
    return config_from_hf(hf, family="gemma", **options)  # type: ignore[return-value]


def read_gemma(hf: dict[str, Any], arch: str, fields: dict[str, Any]) -> GemmaModelConfig:
    """Gemma's `Family.read_hf`: version, activation, rope per layer type, windows, soft-caps."""
    version = GEMMA_ARCHITECTURES[arch][1]
    for flag in ("attention_bias", "use_bidirectional_attention"):
        if hf.get(flag):
            raise unsupported(f"{flag}=True")
    if version == 1:
        act = hf.get("hidden_act") or hf.get("hidden_activation") or "gelu_pytorch_tanh"
        # transformers maps Gemma 1's legacy "gelu" to the tanh approximation (the released
        # checkpoints were trained with it); do the same.
        act = "gelu_pytorch_tanh" if act == "gelu" else act
    else:
        act = hf.get("hidden_activation") or "gelu_pytorch_tanh"
    if act not in ("gelu_pytorch_tanh", "gelu"):
        raise ValueError(f"hidden activation {act!r} is not supported (gelu_pytorch_tanh, gelu)")
    layers, head_dim = fields["num_layers"], fields["head_dim"]

    rope = hf.get("rope_parameters") or {}
    local_theta = local_scaling = None
    if version == 3:
        if FULL in rope or SLIDING in rope:
            theta, scaling = _rope(rope.get(FULL), 1_000_000.0)
            local_theta, local_scaling = _rope(rope.get(SLIDING), 10_000.0)
        else:  # transformers 4.x keys
            theta, scaling = _rope(hf.get("rope_scaling"), float(hf.get("rope_theta", 1_000_000.0)))
            local_theta = float(hf.get("rope_local_base_freq", 10_000.0))
    else:
        theta, scaling = _rope(
            rope or hf.get("rope_scaling"), float(hf.get("rope_theta", 10_000.0))
        )

    layer_types = None
    if version >= 2:
        layer_types = hf.get("layer_types")
        if (
            layer_types is None
        ):  # transformers' defaults: every 2nd (Gemma 2) / 6th (Gemma 3) is global
            period = 2 if version == 2 else int(hf.get("sliding_window_pattern", 6))
            layer_types = [SLIDING if (i + 1) % period else FULL for i in range(layers)]
        if hf.get("sliding_window") is None:
            layer_types = [FULL] * layers  # HF then builds no sliding masks at all
    return GemmaModelConfig(
        rope_theta=theta,
        rope_scaling=scaling,
        **fields,
        gemma_version=version,
        activation=act,
        query_pre_attn_scalar=(
            float(hf.get("query_pre_attn_scalar") or head_dim) if version >= 2 else None
        ),
        attn_logit_softcapping=hf.get("attn_logit_softcapping") if version == 2 else None,
        final_logit_softcapping=hf.get("final_logit_softcapping") if version >= 2 else None,
        sliding_window=int(hf["sliding_window"])
        if layer_types and SLIDING in layer_types
        else None,
        layer_types=tuple(layer_types) if layer_types is not None else None,
        local_rope_theta=local_theta,
        local_rope_scaling=local_scaling,
    )
