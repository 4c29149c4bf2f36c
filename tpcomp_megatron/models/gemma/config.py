"""The Gemma 1/2/3 model config: `LlamaModelConfig` plus what Gemma changes.

Shapes, padding, head layout, rope and the tokenizer reference are inherited unchanged (a Gemma
checkpoint pads and shards exactly like a Llama one). The added fields say which Gemma features a
layer has; the generation decides the norm layout:

- Gemma 1: Llama's layer with zero-centered RMSNorm `(1 + w)`, tanh-GeGLU and the embedding
  scaled by sqrt(hidden);
- Gemma 2: adds norms after attention and after the MLP (applied to the TP-reduced outputs),
  `query_pre_attn_scalar`, attention (50) and final (30) logit soft-caps, alternating
  sliding-window/global layers;
- Gemma 3: Gemma 2's layout with QK-norm instead of the attention soft-cap, a 5:1 local/global
  pattern and a rope base per layer type (local 10k, global 1M with its own scaling).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from ..core.config import LlamaModelConfig
from ..core.rope import RopeScaling

GEMMA_FORMAT = "tpcomp-gemma-config/1"
SLIDING, FULL = "sliding_attention", "full_attention"
ACTIVATIONS = ("gelu_pytorch_tanh", "gelu")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemmaModelConfig(LlamaModelConfig):
    """A Gemma 1, 2 or 3 text decoder at one tensor-parallel size."""

    FORMAT: ClassVar[str] = GEMMA_FORMAT

    gemma_version: int = 1
    """1, 2 or 3: picks the norm layout (post-norms from 2, QK-norm in 3)."""
    activation: str = "gelu_pytorch_tanh"
    """GeGLU activation, by its Hugging Face name: gelu_pytorch_tanh (all released Gemmas) or gelu."""
    query_pre_attn_scalar: float | None = None
    """Attention scores are scaled by this ** -0.5; None means head_dim (Gemma 1)."""
    attn_logit_softcapping: float | None = None
    """Attention scores become `cap * tanh(scores / cap)` before masking (Gemma 2: 50)."""
    final_logit_softcapping: float | None = None
    """Logits become `cap * tanh(logits / cap)` (Gemma 2: 30)."""
    sliding_window: int | None = None
    """Tokens a sliding layer sees, itself included (HF's `sliding_window`)."""
    layer_types: tuple[str, ...] | None = None
    """Per layer, "sliding_attention" or "full_attention"; None means all full."""
    local_rope_theta: float | None = None
    """Rotary base of sliding layers (Gemma 3: 10k); None means rope_theta for every layer."""
    local_rope_scaling: RopeScaling | None = None
    """Rotary scaling of sliding layers (rope_scaling applies to the full layers)."""
    hf_architecture: str = "GemmaForCausalLM"
    tie_word_embeddings: bool = True
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        if isinstance(self.layer_types, list):
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        super().__post_init__()
        if self.gemma_version not in (1, 2, 3):
            raise ValueError(f"gemma_version must be 1, 2 or 3, got {self.gemma_version!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation {self.activation!r} is not supported; use one of {ACTIVATIONS}"
            )
        for name in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"{name} must be a positive number or None, got {value!r}")
        if self.gemma_version == 3 and self.attn_logit_softcapping is not None:
            # Hugging Face's Gemma 3 attention never applies it; honouring it would change the model.
            raise ValueError("Gemma 3 has no attention soft-cap; set attn_logit_softcapping=None")
        if self.local_rope_theta is not None and not self.local_rope_theta > 0:
            raise ValueError(f"local_rope_theta must be > 0, got {self.local_rope_theta}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                raise ValueError(
                    f"layer_types has {len(self.layer_types)} entries for {self.num_layers} layers"
                )
            bad = sorted({t for t in self.layer_types if t not in (SLIDING, FULL)})
            if bad:
                raise ValueError(f"layer_types {bad} unknown; use {SLIDING!r} or {FULL!r}")
            if SLIDING in self.layer_types and not (
                isinstance(self.sliding_window, int) and self.sliding_window > 0
            ):
                raise ValueError(
                    f"sliding layers need sliding_window > 0, got {self.sliding_window!r}"
                )

    @property
    def post_norms(self) -> bool:
        """Norms after attention and after the MLP (Gemma 2 and 3)."""
        return self.gemma_version >= 2

    @property
    def qk_norm(self) -> bool:
        """Per-head RMSNorm on queries and keys before rope (Gemma 3)."""
        return self.gemma_version == 3

    @property
    def embedding_scale(self) -> float:
        """Input embeddings are multiplied by sqrt(hidden_size) (in the model dtype)."""
        return math.sqrt(self.hidden_size)

    @property
    def softmax_scale(self) -> float:
        """The attention-score scale: query_pre_attn_scalar ** -0.5 (head_dim for Gemma 1)."""
        return float(self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def is_sliding(self, layer: int) -> bool:
        """Whether 0-based `layer` attends within a sliding window."""
        return self.layer_types is not None and self.layer_types[layer] == SLIDING

    def layer_rope(self, layer: int) -> tuple[float, RopeScaling | None]:
        """(rope base, scaling) of 0-based `layer`."""
        if self.is_sliding(layer) and self.local_rope_theta is not None:
            return self.local_rope_theta, self.local_rope_scaling
        return self.rope_theta, self.rope_scaling

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GemmaModelConfig":
        data = dict(data)
        if data.get("local_rope_scaling") is not None:
            data["local_rope_scaling"] = RopeScaling(**data["local_rope_scaling"])
        if data.get("layer_types") is not None:
            data["layer_types"] = tuple(data["layer_types"])
        return super().from_dict(data)  # type: ignore[return-value]
