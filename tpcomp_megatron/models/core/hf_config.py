"""Read a Hugging Face `config.json` into our config, for whichever registered family converts it.

`config_from_hf` asks the registry (`families.for_hf_config`) which family and class the config
is, reads what every family reads the same way (`common_fields`: sizes, heads, norm epsilon, dtype,
the stored config; checked sizes), then hands the rest to the family's reader
(`Family.read_hf`), which refuses what would change the function and adds its own fields. The
Llama-style rope reading (`rope_fields`) and the SiLU check (`require_silu`) are here for the
families that share them. `check_architecture` tells, from the config alone, whether any family
takes a model, so a source is refused before a tensor of it is read. No family is imported here:
each registers itself (see `families`).
"""

from __future__ import annotations

import json
from typing import Any

from . import families
from .config import LlamaModelConfig, TokenizerRef
from .rope import RopeScaling

_HF_DTYPES = ("float32", "bfloat16", "float16")
_REQUIRED = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size")


def unsupported(what: str) -> ValueError:
    """The error for a config value the converter refuses because it would change the function."""
    return ValueError(f"{what} is not supported by this converter (it would change the function)")


def require_silu(hf: dict[str, Any]) -> None:
    """Refuse activations other than SiLU (SwiGLU MLPs: Llama, Mistral, Qwen)."""
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise unsupported(f"hidden_act={act!r} (only silu/SwiGLU)")


def rope_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """`rope_theta` and `rope_scaling` of a config with one rope for every layer (Llama, Qwen).
    transformers 5 nests rope settings in `rope_parameters`; 4.x used rope_theta + rope_scaling."""
    params = hf.get("rope_parameters") or {}
    theta = float(params["rope_theta"]) if "rope_theta" in params else float(hf.get("rope_theta", 10000.0))
    return dict(rope_theta=theta, rope_scaling=RopeScaling.from_hf(hf.get("rope_scaling") or params or None))


def common_fields(hf: dict[str, Any], *, arch: str, params_dtype: str | None, max_positions: int,
                  tie_default: bool, **passthrough) -> dict[str, Any]:
    """The fields every family reads the same way (sizes, heads, norm, dtype, the stored HF config),
    as keyword arguments of `LlamaModelConfig` and its subclasses; rope is the family's reader's
    (`rope_fields` for most). `max_positions` / `tie_default` are the family's defaults for absent
    fields. `params_dtype` None keeps the source dtype (`torch_dtype`/`dtype`, float32 if absent or
    odd)."""
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
    """Every Hugging Face class name the converter takes (over every registered family)."""
    return families.hf_architectures()


def check_architecture(hf: dict[str, Any]) -> None:
    """Raise ValueError naming the supported classes unless some family converts `hf` (a config
    dict); cheap, so sources check it before reading any tensor."""
    families.for_hf_config(hf)


def config_from_hf(
    hf: dict[str, Any],
    *,
    tensor_parallel_size: int,
    params_dtype: str | None = None,
    tokenizer: TokenizerRef | None = None,
    source: str | None = None,
    make_vocab_size_divisible_by: int = 128,
    family: str | None = None,
) -> LlamaModelConfig:
    """Build our config from a Hugging Face config dict (as in config.json or `to_dict()`).

    The family that converts `hf` decides the class: `LlamaModelConfig` for Llama, Mistral and
    SmolLM2, `GemmaModelConfig` for Gemma 1/2/3, `QwenModelConfig` for Qwen2/3 (see
    `families.families()`); `family` (a registered name) refuses any other family's config.
    `params_dtype` None keeps the source dtype (`torch_dtype`/`dtype`, float32 if absent).
    Any bad value raises ValueError.
    """
    try:
        found, arch = families.for_hf_config(hf)
        if family is not None and found is not families.by_name(family):
            raise ValueError(f"not a {family} config: {hf.get('architectures') or hf.get('model_type')!r} "
                             f"is a {found.name} model")
        fields = common_fields(hf, arch=arch, params_dtype=params_dtype, max_positions=found.max_positions,
                               tie_default=found.tie_embeddings, tensor_parallel_size=tensor_parallel_size,
                               tokenizer=tokenizer, source=source,
                               make_vocab_size_divisible_by=make_vocab_size_divisible_by)
        return found.read_hf(hf, arch, fields)
    except (TypeError, AttributeError, KeyError, OverflowError, ZeroDivisionError) as e:  # a value of the wrong type
        raise ValueError(f"config.json holds a value of the wrong type or size ({type(e).__name__}: {e})") from None
