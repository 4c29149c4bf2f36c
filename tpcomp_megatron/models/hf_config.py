"""Read a Hugging Face Llama-family `config.json` into a `LlamaModelConfig`, refusing what we can't
reproduce exactly (biases, other activations, sliding windows, unknown rope types). Gemma and Qwen
configs go to their families' readers; `check_architecture` tells, from the config alone, whether
any family takes a model, so a source is refused before a tensor of it is read."""

from __future__ import annotations

import json
from typing import Any

from .config import LlamaModelConfig, TokenizerRef
from .rope import RopeScaling

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}
"""The Llama family's classes and model types (Gemma and Qwen have their own tables)."""

GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",  # Llama, SmolLM2 and Mistral GGUFs (transformers tells Mistral by name)
    "mistral": "MistralForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
"""GGUF `general.architecture` -> the Hugging Face class it converts as (the ones both we and
transformers' GGUF loader support)."""

_HF_DTYPES = ("float32", "bfloat16", "float16")
_REQUIRED = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")


def _unsupported(what: str) -> ValueError:
    return ValueError(f"{what} is not supported by this converter (it would change the function)")


def common_fields(hf: dict[str, Any], *, arch: str, params_dtype: str | None, max_positions: int,
                  tie_default: bool, **passthrough) -> dict[str, Any]:
    """The fields every family reads the same way (sizes, heads, norm, dtype, the stored HF config),
    as keyword arguments of `LlamaModelConfig` and its subclasses; rope is the family's own.
    `params_dtype` None keeps the source dtype (`torch_dtype`/`dtype`, float32 if absent or odd)."""
    missing = [k for k in _REQUIRED if hf.get(k) is None]
    if missing:
        raise ValueError(f"config.json is missing {missing}")
    for key in (*_REQUIRED, "num_key_value_heads", "head_dim", "max_position_embeddings"):
        if hf.get(key) is not None:
            _check_size(key, hf[key])
    scaling, params = hf.get("rope_scaling"), hf.get("rope_parameters")
    if scaling and params and scaling != params:
        # transformers 4.x reads only rope_scaling (+ rope_theta), 5.x lets rope_scaling replace
        # rope_parameters (theta then defaults to 1e4): no reading is right for both
        raise ValueError("config.json sets both 'rope_scaling' and 'rope_parameters', and they differ; "
                         "transformers versions read such a file differently: keep one of them")
    heads = int(hf["num_attention_heads"])
    if params_dtype is None:
        src = str(hf.get("torch_dtype") or hf.get("dtype") or "float32").replace("torch.", "")
        params_dtype = src if src in _HF_DTYPES else "float32"
    return dict(
        num_layers=int(hf["num_hidden_layers"]),
        hidden_size=int(hf["hidden_size"]),
        ffn_hidden_size=int(hf["intermediate_size"]),
        num_attention_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or int(hf["hidden_size"]) // heads),
        vocab_size=int(hf["vocab_size"]),
        max_position_embeddings=int(hf.get("max_position_embeddings", max_positions)),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", tie_default)),
        params_dtype=params_dtype,
        hf_architecture=arch,
        # Through JSON once, so the stored copy equals what a reload of our JSON gives back.
        hf_config=json.loads(json.dumps(hf)),
        **passthrough,
    )


MAX_SIZE = 2**31 - 1
"""Largest size a config field may give (tensor dimensions and layer counts far below it; checked
against the tensors present in `convert.mapping.check_hf_tensors`)."""


def _check_size(key: str, value: Any) -> None:
    """A config size is a positive JSON integer below MAX_SIZE: `int()` would take 1e300, "12",
    true or 2.5, and raise OverflowError on Infinity."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= MAX_SIZE:
        raise ValueError(f"config.json field {key!r} must be an integer in [1, {MAX_SIZE}], got {value!r:.60}")


def supported_architectures() -> list[str]:
    """Every Hugging Face class name the converter takes."""
    from .gemma.hf_config import GEMMA_ARCHITECTURES
    from .qwen.hf_config import QWEN_ARCHITECTURES

    return sorted([*SUPPORTED_ARCHITECTURES, *GEMMA_ARCHITECTURES, *QWEN_ARCHITECTURES])


def unsupported_architecture(what: object) -> ValueError:
    return ValueError(f"unsupported architecture {what!r}; supported: {', '.join(supported_architectures())}")


def _family(hf: dict[str, Any]) -> str | None:
    """The family ("gemma", "qwen" or "llama") that converts `hf`, else None."""
    from .gemma.hf_config import gemma_architecture
    from .qwen.hf_config import qwen_architecture

    if gemma_architecture(hf) is not None:
        return "gemma"
    if qwen_architecture(hf) is not None:
        return "qwen"
    archs = hf.get("architectures") or []
    if any(a in SUPPORTED_ARCHITECTURES for a in archs):
        return "llama"
    if not archs and hf.get("model_type") in SUPPORTED_ARCHITECTURES.values():
        return "llama"
    return None


def check_architecture(hf: dict[str, Any]) -> None:
    """Raise ValueError naming the supported classes unless some family converts `hf` (a config
    dict); cheap, so sources check it before reading any tensor."""
    if _family(hf) is None:
        raise unsupported_architecture(hf.get("architectures") or hf.get("model_type"))


def config_from_hf(
    hf: dict[str, Any],
    *,
    tensor_parallel_size: int,
    params_dtype: str | None = None,
    tokenizer: TokenizerRef | None = None,
    source: str | None = None,
    make_vocab_size_divisible_by: int = 128,
) -> LlamaModelConfig:
    """Build our config from a Hugging Face config dict (as in config.json or `to_dict()`).

    `params_dtype` None keeps the source dtype (`torch_dtype`/`dtype`, float32 if absent).
    Gemma 1/2/3 configs give a `GemmaModelConfig`, Qwen2/3 ones a `QwenModelConfig`.
    Any bad value raises ValueError.
    """
    try:
        return _config_from_hf(hf, tensor_parallel_size=tensor_parallel_size, params_dtype=params_dtype,
                               tokenizer=tokenizer, source=source,
                               make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    except (TypeError, AttributeError, KeyError, OverflowError, ZeroDivisionError) as e:  # a value of the wrong type
        raise ValueError(f"config.json holds a value of the wrong type or size ({type(e).__name__}: {e})") from None


def _config_from_hf(hf: dict[str, Any], *, tensor_parallel_size: int, params_dtype: str | None,
                    tokenizer: TokenizerRef | None, source: str | None, make_vocab_size_divisible_by: int
                    ) -> LlamaModelConfig:
    from .gemma.hf_config import gemma_config_from_hf
    from .qwen.hf_config import qwen_config_from_hf

    check_architecture(hf)
    family_reader = {"gemma": gemma_config_from_hf, "qwen": qwen_config_from_hf}.get(str(_family(hf)))
    if family_reader is not None:
        return family_reader(
            hf,
            tensor_parallel_size=tensor_parallel_size,
            params_dtype=params_dtype,
            tokenizer=tokenizer,
            source=source,
            make_vocab_size_divisible_by=make_vocab_size_divisible_by,
        )
    archs = hf.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
    if arch is None:
        arch = next(a for a, t in SUPPORTED_ARCHITECTURES.items() if t == hf.get("model_type"))
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise _unsupported(f"hidden_act={act!r} (only silu/SwiGLU)")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise _unsupported(f"{flag}=True")
    window = hf.get("sliding_window")
    if window is not None and hf.get("use_sliding_window", True):
        raise _unsupported(f"sliding_window={window}")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise _unsupported(f"partial_rotary_factor={hf['partial_rotary_factor']}")

    # transformers 5 nests rope settings in `rope_parameters`; 4.x used rope_theta + rope_scaling.
    rope_params = hf.get("rope_parameters") or {}
    if "rope_theta" in rope_params:
        theta = float(rope_params["rope_theta"])
    else:
        theta = float(hf.get("rope_theta", 10000.0))
    scaling = RopeScaling.from_hf(hf.get("rope_scaling") or rope_params or None)
    return LlamaModelConfig(
        rope_theta=theta,
        rope_scaling=scaling,
        **common_fields(hf, arch=arch, params_dtype=params_dtype, max_positions=4096, tie_default=False,
                        tensor_parallel_size=tensor_parallel_size, tokenizer=tokenizer, source=source,
                        make_vocab_size_divisible_by=make_vocab_size_divisible_by),
    )
