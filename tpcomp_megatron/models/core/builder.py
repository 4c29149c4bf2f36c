"""Build a Megatron-core `GPTModel` for a model config at the current tensor-parallel size.

The config's family (the registry's `families.by_config`: its class, else its nearest registered
base) gives the layer specs, final norm and post-build steps (`Family.model_parts`) and the
TransformerConfig fields that differ from the Llama defaults set here
(`Family.transformer_overrides`): `llama_model_parts` below for the Llama family,
`gemma/spec.py` and `qwen/spec.py` for the others. This module imports no family.

Uses the local (non-Transformer-Engine) layer spec so the same model runs on CPU (inside
`cpu_megatron()`) and on GPU, with our `RMSNorm` in every norm slot (Hugging Face arithmetic, and
sequence parallelism allowed). `layer_spec_transform` lets callers swap submodule classes before the
model is built, e.g. `spec.submodules.self_attention.submodules.linear_proj = MyRowParallel`.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

import torch
import torch.nn.functional as F

from tpcomp_megatron.megatron.cpu import cpu_megatron_active

from . import families
from .config import LlamaModelConfig
from .norm import RMSNorm
from .rope import rope_inv_freq, set_model_rope

LayerSpecTransform = Callable[[Any], Any]
"""Takes the (deep-copied) TransformerLayer ModuleSpec; returns the spec to use (or None to keep
the one it was given, mutated in place)."""


@dataclasses.dataclass(frozen=True)
class ModelParts:
    """What a model family contributes to `build_gpt_model`."""

    layer_specs: list[Any]
    """One TransformerLayer spec per layer."""
    final_norm: type
    """The block's final norm class."""
    finish: Callable[[Any], None] | None = None
    """Called on the built GPTModel (e.g. embedding scale, logit soft-cap)."""


def model_parts(
    cfg: LlamaModelConfig, layer_spec_transform: LayerSpecTransform | None = None
) -> ModelParts:
    """Layer specs, final norm and post-build steps of `cfg`'s model family."""
    return families.by_config(cfg).model_parts(cfg, layer_spec_transform)


def llama_model_parts(
    cfg: LlamaModelConfig, layer_spec_transform: LayerSpecTransform | None = None
) -> ModelParts:
    """The Llama family's parts: one local layer spec for every layer, our RMSNorm at the end."""
    layer = llama_layer_spec(layer_spec_transform)
    return ModelParts(layer_specs=[layer] * cfg.num_layers, final_norm=RMSNorm)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """torch dtype for a config dtype name."""
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}")
    return _DTYPES[name]


def transformer_config(
    cfg: LlamaModelConfig,
    *,
    tensor_parallel_size: int,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype | None = None,
    perform_initialization: bool = True,
    use_cpu_initialization: bool | None = None,
    **overrides: Any,
) -> Any:
    """The Megatron `TransformerConfig` for `cfg` (padded shapes), inference-friendly defaults.

    `overrides` are passed to TransformerConfig last, for fields we do not set.
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    layout = cfg.head_layout
    layout.check_divides(tensor_parallel_size)
    for name, size in (
        ("padded_vocab_size", cfg.padded_vocab_size),
        ("padded_ffn_hidden_size", cfg.padded_ffn_hidden_size),
    ):
        if int(size or 0) % tensor_parallel_size:
            raise ValueError(
                f"{name}={size} does not split over TP={tensor_parallel_size}; convert the "
                f"checkpoint for this TP size (tpcomp-convert --tp {tensor_parallel_size})"
            )
    dtype = params_dtype if params_dtype is not None else torch_dtype(cfg.params_dtype)
    if use_cpu_initialization is None:
        use_cpu_initialization = cpu_megatron_active() or not torch.cuda.is_available()
    kwargs: dict[str, Any] = dict(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.padded_ffn_hidden_size,
        num_attention_heads=layout.padded_num_heads,
        num_query_groups=layout.padded_num_kv_heads,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps,
        add_bias_linear=False,
        add_qkv_bias=False,
        gated_linear_unit=True,
        activation_func=F.silu,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tensor_parallel_size,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=use_cpu_initialization,
        perform_initialization=perform_initialization,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        # The fused/jit kernels below are CUDA-only or change rounding; the plain paths are exact.
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
    )
    family_overrides = families.by_config(cfg).transformer_overrides
    if family_overrides is not None:
        kwargs.update(family_overrides(cfg))
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def llama_layer_spec(
    layer_spec_transform: LayerSpecTransform | None = None, *, qk_norm: bool = False
) -> Any:
    """The local GPT layer spec with our RMSNorm (also over each query / key head when `qk_norm`,
    as Qwen3 has), after the caller's transform."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=qk_norm))
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    if qk_norm:
        spec.submodules.self_attention.submodules.q_layernorm = RMSNorm
        spec.submodules.self_attention.submodules.k_layernorm = RMSNorm
    if layer_spec_transform is not None:
        out = layer_spec_transform(spec)
        spec = spec if out is None else out
    return spec


def build_gpt_model(
    cfg: LlamaModelConfig,
    *,
    layer_spec_transform: LayerSpecTransform | None = None,
    sequence_parallel: bool = False,
    parallel_output: bool = True,
    params_dtype: torch.dtype | None = None,
    perform_initialization: bool = True,
    pre_process: bool = True,
    post_process: bool = True,
    max_sequence_length: int | None = None,
    **config_overrides: Any,
) -> Any:
    """A `GPTModel` for `cfg` at the TP size of `megatron.core.parallel_state`.

    Call after `parallel_state.initialize_model_parallel(tp)` (on CPU inside `cpu_megatron()`).
    `parallel_output=False` gathers the (padded) vocab logits on every rank. `params_dtype`
    defaults to `cfg.params_dtype`. `perform_initialization=False` skips random init when weights
    are loaded right after (much faster for large models).
    """
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    if not parallel_state.model_parallel_is_initialized():
        raise RuntimeError(
            "Megatron model parallel is not initialized; call "
            "megatron.core.parallel_state.initialize_model_parallel(tp) first"
        )
    if parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError("build_gpt_model supports pipeline_model_parallel_size=1 only")
    tp = parallel_state.get_tensor_model_parallel_world_size()
    tconf = transformer_config(
        cfg,
        tensor_parallel_size=tp,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        perform_initialization=perform_initialization,
        **config_overrides,
    )
    parts = model_parts(cfg, layer_spec_transform)
    block = TransformerBlockSubmodules(layer_specs=parts.layer_specs, layer_norm=parts.final_norm)
    model = GPTModel(
        config=tconf,
        transformer_layer_spec=block,
        vocab_size=int(cfg.padded_vocab_size or cfg.vocab_size),
        max_sequence_length=max_sequence_length or cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=parallel_output,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_percent=1.0,
        rotary_base=int(cfg.rope_theta),
    )
    set_model_rope(model, rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling))
    if parts.finish is not None:
        parts.finish(model)
    return model


def causal_attention_mask(seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Megatron's boolean mask `[1, 1, s, s]`, True where attention is not allowed."""
    mask = torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)
    return mask[None, None]
