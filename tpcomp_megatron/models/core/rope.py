"""Rotary embedding frequencies exactly as Hugging Face computes them, set on a Megatron model.

Megatron's `RotaryEmbedding(rope_scaling=True)` implements Llama 3 scaling with low/high frequency
factors 1 and 4 and an original context of 8192 hard-coded; Hugging Face reads all four values from
the config (Llama 3.2 and others differ). So we compute `inv_freq` with Hugging Face's formulas and
assign it to `model.rotary_pos_emb.inv_freq` before the first forward (Megatron caches the embedding
per sequence length after that).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """Rotary scaling from a Hugging Face config (`rope_scaling` or `rope_parameters`)."""

    rope_type: str
    """One of "linear" or "llama3" ("default" means no scaling and is stored as None)."""
    factor: float
    """Frequency divisor (linear: all frequencies; llama3: the low ones)."""
    low_freq_factor: float = 1.0
    """llama3 only: wavelengths above original_max_position_embeddings / this are divided."""
    high_freq_factor: float = 4.0
    """llama3 only: wavelengths below original_max_position_embeddings / this are kept."""
    original_max_position_embeddings: int = 8192
    """llama3 only: the pretraining context length."""

    def __post_init__(self) -> None:
        if self.rope_type not in ("linear", "llama3"):
            raise ValueError(
                f"rope scaling type {self.rope_type!r} is not supported; supported: "
                f"{SUPPORTED_ROPE_TYPES} (dynamic/yarn/longrope need a new rope module)"
            )
        if not 0 < self.factor < math.inf:
            raise ValueError(f"rope scaling factor must be > 0, got {self.factor}")
        if self.rope_type == "llama3":
            if not 0 < self.low_freq_factor < self.high_freq_factor:
                raise ValueError(
                    "llama3 rope scaling needs 0 < low_freq_factor < high_freq_factor, got "
                    f"{self.low_freq_factor} and {self.high_freq_factor}"
                )
            if self.original_max_position_embeddings <= 0:
                raise ValueError(
                    "llama3 rope scaling needs original_max_position_embeddings > 0, got "
                    f"{self.original_max_position_embeddings}"
                )

    @classmethod
    def from_hf(cls, params: dict[str, Any] | None) -> "RopeScaling | None":
        """Parse a Hugging Face rope dict (old `type` or new `rope_type` key); None if unscaled."""
        if not params:
            return None
        if not isinstance(params, dict):
            raise ValueError(f"rope settings must be a JSON object, got {params!r:.60}")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind == "default":
            return None
        if kind not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope scaling type {kind!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
            )
        if "factor" not in params:
            raise ValueError(f"rope scaling {kind!r} has no 'factor' in the config: {params}")
        if kind == "linear":
            return cls(rope_type=kind, factor=float(params["factor"]))
        missing = [
            k
            for k in ("low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
            if k not in params
        ]
        if missing:
            raise ValueError(f"llama3 rope scaling is missing {missing} in the config: {params}")
        return cls(
            rope_type=kind,
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> torch.Tensor:
    """fp32 inverse frequencies, operation for operation as transformers' rope init functions."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"rotary head_dim must be a positive even number, got {head_dim}")
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64).to(dtype=torch.float) / head_dim
    inv_freq = 1.0 / (theta**exponent)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    factor, lo, hi = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / lo
    high_freq_wavelen = old_len / hi
    wavelen = 2 * math.pi / inv_freq
    inv_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * inv_llama / factor + smooth * inv_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_llama)


def set_model_rope(model: torch.nn.Module, inv_freq: torch.Tensor) -> None:
    """Give a Megatron GPTModel our `inv_freq`; raise if this Megatron keeps it elsewhere."""
    rope = getattr(model, "rotary_pos_emb", None)
    old = getattr(rope, "inv_freq", None)
    if not isinstance(old, torch.Tensor):
        raise RuntimeError(
            "this megatron-core has no GPTModel.rotary_pos_emb.inv_freq tensor (known in 0.16.1 "
            "to 0.19.x); update tpcomp_megatron/models/core/rope.py for it"
        )
    if old.shape != inv_freq.shape:
        raise ValueError(
            f"rotary inv_freq shape {tuple(inv_freq.shape)} does not match the model's "
            f"{tuple(old.shape)}; check head_dim and rotary_percent"
        )
    rope.inv_freq = inv_freq.to(device=old.device, dtype=old.dtype)
