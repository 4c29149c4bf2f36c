"""Read a Hugging Face Qwen2 / Qwen3 `config.json` into a `QwenModelConfig`, refusing what would
change the function: sliding-window layers, Qwen3's `attention_bias` (it also biases o_proj),
activations other than SiLU, rope scalings we do not reproduce (YaRN)."""

from __future__ import annotations

from typing import Any

from ..config import TokenizerRef
from ..hf_config import common_fields
from ..rope import RopeScaling
from .config import QwenModelConfig

QWEN_ARCHITECTURES = {"Qwen2ForCausalLM": ("qwen2", 2), "Qwen3ForCausalLM": ("qwen3", 3)}


def qwen_architecture(hf: dict[str, Any]) -> str | None:
    """The Qwen class name `hf` describes, or None if it is not a dense Qwen2/3 causal LM."""
    for arch in hf.get("architectures") or []:
        if arch in QWEN_ARCHITECTURES:
            return arch
    if hf.get("architectures"):
        return None
    model_type = hf.get("model_type")
    return next((a for a, (t, _) in QWEN_ARCHITECTURES.items() if t == model_type), None)


def _refuse(what: str) -> ValueError:
    return ValueError(f"{what} is not supported by this converter (it would change the function)")


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
        raise _refuse(f"sliding-window attention (layers {sliding[:6]}, sliding_window="
                      f"{hf.get('sliding_window')})")


def qwen_config_from_hf(
    hf: dict[str, Any],
    *,
    tensor_parallel_size: int,
    params_dtype: str | None = None,
    tokenizer: TokenizerRef | None = None,
    source: str | None = None,
    make_vocab_size_divisible_by: int = 128,
) -> QwenModelConfig:
    """Our config from a Qwen2 / Qwen3 config dict (config.json or `to_dict()`)."""
    arch = qwen_architecture(hf)
    if arch is None:
        raise ValueError(f"not a Qwen2/Qwen3 config: {hf.get('architectures') or hf.get('model_type')!r}")
    version = QWEN_ARCHITECTURES[arch][1]
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise _refuse(f"hidden_act={act!r} (only silu/SwiGLU)")
    if version == 3 and hf.get("attention_bias"):
        raise _refuse("Qwen3 attention_bias=True (biases q, k, v and o_proj; no released Qwen3 sets it)")
    fields = common_fields(hf, arch=arch, params_dtype=params_dtype, max_positions=32768, tie_default=False,
                           tensor_parallel_size=tensor_parallel_size, tokenizer=tokenizer, source=source,
                           make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    _check_no_sliding_layers(hf, fields["num_layers"])
    # transformers 5 nests rope settings in `rope_parameters`; 4.x used rope_theta + rope_scaling.
    rope = hf.get("rope_parameters") or {}
    theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = RopeScaling.from_hf(hf.get("rope_scaling") or rope or None)
    return QwenModelConfig(rope_theta=theta, rope_scaling=scaling, qwen_version=version, **fields)
