"""Gemma layer specs and TransformerConfig settings for `build_gpt_model` (the family record in
`family.py` imports this module when a Gemma model is built).

Every layer is Megatron's local `TransformerLayer` with Gemma's modules in its slots: the
attention block and MLP keep Megatron's `linear_qkv`, `linear_proj`, `linear_fc1`, `linear_fc2`
(the same names and classes as Llama, so `apply_tp_compression` finds them the same way), and
Gemma 2/3's post-norms sit inside those blocks, after the reductions. Layers differ only in their
attention window and rope base, so the block holds one spec per layer type.

The sliding layers are also written into TransformerConfig (`window_size`,
`window_attn_skip_freq` as a per-layer list): our core attention reads them from there, and so
would Transformer Engine's on GPU.
"""

from __future__ import annotations

import copy
from typing import Any

import torch.nn.functional as F

from ..core.builder import LayerSpecTransform, ModelParts
from ..core.sdpa import SDPADotProductAttention
from .attention import (
    GemmaDotProductAttention,
    GemmaMLP,
    GemmaSDPADotProductAttention,
    GemmaSelfAttention,
)
from .config import GemmaModelConfig
from .layers import ZeroCenteredRMSNorm, gelu_tanh, install_embedding_scale, install_logit_softcap

_ACTIVATIONS = {"gelu_pytorch_tanh": gelu_tanh, "gelu": F.gelu}


def gemma_transformer_overrides(cfg: GemmaModelConfig) -> dict[str, Any]:
    """TransformerConfig fields that differ from the Llama defaults of `transformer_config`."""
    out: dict[str, Any] = dict(
        activation_func=_ACTIVATIONS[cfg.activation],
        softmax_scale=cfg.softmax_scale,
        # Our norms compute (1 + w); this tells Megatron's own (TE/Apex) norms the same.
        layernorm_zero_centered_gamma=True,
        qk_layernorm=cfg.qk_norm,
    )
    if cfg.layer_types is not None and any(cfg.is_sliding(i) for i in range(cfg.num_layers)):
        out["window_size"] = (int(cfg.sliding_window or 0) - 1, 0)
        out["window_attn_skip_freq"] = [int(cfg.is_sliding(i)) for i in range(cfg.num_layers)]
    return out


def _core_attention(core: Any, cfg: GemmaModelConfig, where: str) -> Any:
    """The core-attention spec for a Gemma layer, after the caller's transform chose `core`."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    cls = core.module if isinstance(core, ModuleSpec) else core
    params = dict(core.params) if isinstance(core, ModuleSpec) else {}
    if cls is SDPADotProductAttention:
        cls = GemmaSDPADotProductAttention  # use_sdpa: fused where exact, Gemma softmax elsewhere
    if isinstance(cls, type) and issubclass(cls, GemmaDotProductAttention):
        params.setdefault("softcap", cfg.attn_logit_softcapping)
        return ModuleSpec(module=cls, params=params)
    needs = cfg.attn_logit_softcapping is not None or cfg.layer_types is not None
    if needs:
        raise ValueError(
            f"{where}: core attention {getattr(cls, '__name__', cls)!r} cannot soft-cap scores or "
            "mask a sliding window; subclass GemmaDotProductAttention (or use SDPADotProductAttention, "
            "which Gemma specs turn into GemmaSDPADotProductAttention)"
        )
    return core


def gemma_layer_spec(
    cfg: GemmaModelConfig, layer: int, layer_spec_transform: LayerSpecTransform | None = None
) -> Any:
    """The TransformerLayer spec of 0-based `layer`, after the caller's transform."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec

    spec = copy.deepcopy(
        get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=cfg.qk_norm)
    )
    subs = spec.submodules
    subs.input_layernorm = ZeroCenteredRMSNorm
    subs.pre_mlp_layernorm = ZeroCenteredRMSNorm
    post = ZeroCenteredRMSNorm if cfg.post_norms else None
    attn = subs.self_attention
    theta, scaling = cfg.layer_rope(layer)
    own_rope = (theta, scaling) != (cfg.rope_theta, cfg.rope_scaling)
    attn.module = GemmaSelfAttention
    attn.params = {
        **attn.params,
        "post_layernorm": post,
        "rope_theta": theta if own_rope else None,
        "rope_scaling": scaling if own_rope else None,
    }
    attn.submodules.core_attention = GemmaDotProductAttention
    if cfg.qk_norm:
        attn.submodules.q_layernorm = ZeroCenteredRMSNorm
        attn.submodules.k_layernorm = ZeroCenteredRMSNorm
    if post is not None:
        # Only where needed: TransformerLayer passes its TP group to exactly `MLP` and logs a
        # warning for other classes (which then take the same group from parallel_state).
        subs.mlp.module = GemmaMLP
        subs.mlp.params = {**subs.mlp.params, "post_layernorm": post}
    if layer_spec_transform is not None:
        out = layer_spec_transform(spec)
        spec = spec if out is None else out
    core = spec.submodules.self_attention.submodules.core_attention
    spec.submodules.self_attention.submodules.core_attention = _core_attention(
        core, cfg, f"layer {layer}"
    )
    if not isinstance(spec, ModuleSpec):
        raise TypeError(f"layer_spec_transform must return a ModuleSpec, got {type(spec).__name__}")
    return spec


def gemma_model_parts(
    cfg: GemmaModelConfig, layer_spec_transform: LayerSpecTransform | None
) -> ModelParts:
    """Per-layer specs, final norm and post-build steps for `build_gpt_model`."""
    # One spec per distinct (window, rope) layer type: the transform runs once per type.
    by_kind: dict[tuple[Any, ...], Any] = {}
    specs = []
    for i in range(cfg.num_layers):
        kind = (cfg.is_sliding(i), cfg.layer_rope(i))
        if kind not in by_kind:
            by_kind[kind] = gemma_layer_spec(cfg, i, layer_spec_transform)
        specs.append(by_kind[kind])

    def finish(model: Any) -> None:
        install_embedding_scale(model, cfg.embedding_scale)
        install_logit_softcap(model, cfg.final_logit_softcapping)

    return ModelParts(layer_specs=specs, final_norm=ZeroCenteredRMSNorm, finish=finish)
