"""Gemma attention and MLP blocks on top of megatron-core's local modules.

- `GemmaDotProductAttention`: Megatron's `DotProductAttention` (same GQA expansion and matmuls)
  with its softmax replaced by `CappedWindowSoftmax`: tanh soft-capping of the scaled scores, then
  the causal / sliding-window mask, then an fp32 softmax, in Hugging Face's order. Megatron's own
  windowed softmax builds its mask on device "cuda" by name (so it cannot run on CPU), ignores the
  mask it is given, and has no soft-cap.
- `GemmaSelfAttention` / `GemmaMLP`: Megatron's blocks plus Gemma 2/3's norm after attention /
  after the MLP. The norm runs on the block's output, i.e. on what `linear_proj` / `linear_fc2`
  return after their tensor-parallel reduction (compressed or not), before the residual add.
  `GemmaSelfAttention` can also carry its own rotary frequencies (Gemma 3's local layers).

The window follows Megatron's `window_size=(left, 0)` convention: a query sees keys at distance
0..left, so HF's `sliding_window=W` (W tokens, itself included) is `left = W - 1`.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLP

from ..core.rope import RopeScaling, rope_inv_freq
from ..core.sdpa import SDPADotProductAttention
from .layers import softcap as _softcap


class CappedWindowSoftmax(torch.nn.Module):
    """Scores `[b, np, sq, sk]` (already scaled) -> probabilities, for causal self-attention.

    Queries are the last `sq` of `sk` positions (prefill: sq == sk; decode with a KV cache:
    sq < sk). `mask` (True = blocked, broadcastable to the scores) is combined with the causal and
    window constraints rather than replacing them.
    """

    def __init__(
        self,
        *,
        causal: bool,
        window_size: tuple[int, int] | None,
        softcap: float | None,
        softmax_in_fp32: bool = True,
    ) -> None:
        super().__init__()
        if window_size is not None and (window_size[1] != 0 or window_size[0] < 0):
            raise ValueError(f"only causal windows (left >= 0, 0) are supported, got {window_size}")
        self.causal = causal
        self.window_size = window_size  # the attribute SDPADotProductAttention looks at
        self.softcap = softcap
        self.softmax_in_fp32 = softmax_in_fp32

    def forward(
        self,
        scores: torch.Tensor,
        mask: torch.Tensor | None,
        softmax_offset: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if softmax_offset is not None:
            raise ValueError("Gemma attention has no softmax offset; use softmax_type='vanilla'")
        x = scores.float() if self.softmax_in_fp32 else scores
        if self.softcap is not None:
            x = _softcap(x, self.softcap)
        sq, sk = x.shape[-2], x.shape[-1]
        q_pos = torch.arange(sk - sq, sk, device=x.device)[:, None]
        k_pos = torch.arange(sk, device=x.device)[None, :]
        blocked = k_pos > q_pos if self.causal else torch.zeros_like(k_pos > q_pos)
        if self.window_size is not None:
            blocked = blocked | (q_pos - k_pos > self.window_size[0])
        if mask is not None:
            blocked = blocked | mask.to(device=x.device, dtype=torch.bool)
        # HF adds finfo.min; filling gives the same exp() == 0 without overflow to -inf.
        x = x.masked_fill(blocked, torch.finfo(x.dtype).min)
        return torch.softmax(x, dim=-1).to(scores.dtype)


class GemmaDotProductAttention(DotProductAttention):
    """`DotProductAttention` with Gemma's soft-capped, windowed softmax (any device)."""

    def __init__(self, *args: Any, softcap: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.config.apply_query_key_layer_scaling:
            raise ValueError("Gemma attention does not use apply_query_key_layer_scaling")
        if self.softmax_offset is not None:
            raise ValueError("Gemma attention uses the vanilla softmax (softmax_type='vanilla')")
        # The parent chose this layer's window from window_size / window_attn_skip_freq.
        self.scale_mask_softmax = CappedWindowSoftmax(
            causal=self.attn_mask_type == AttnMaskType.causal,
            window_size=self.scale_mask_softmax.window_size,
            softcap=softcap,
            softmax_in_fp32=self.config.attention_softmax_in_fp32,
        )


class GemmaSDPADotProductAttention(SDPADotProductAttention, GemmaDotProductAttention):
    """What `use_sdpa` becomes in a Gemma spec: PyTorch's fused SDPA where it computes the same
    function (no window, no soft-cap), Gemma's eager softmax elsewhere."""


class GemmaSelfAttention(SelfAttention):
    """`SelfAttention`, optionally followed by a norm of its (reduced) output, and optionally with
    its own rotary frequencies instead of the model's."""

    def __init__(
        self,
        config: Any,
        submodules: Any,
        layer_number: int,
        *,
        post_layernorm: type | None = None,
        rope_theta: float | None = None,
        rope_scaling: RopeScaling | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(config, submodules, layer_number, **kwargs)
        self.post_layernorm = (
            post_layernorm(
                config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
            )
            if post_layernorm is not None
            else None
        )
        inv = None
        if rope_theta is not None:
            inv = rope_inv_freq(config.kv_channels, rope_theta, rope_scaling)
        # Not persistent: recomputed from the config, like Megatron's own rotary inv_freq.
        self.register_buffer("rope_inv_freq", inv, persistent=False)

    def _layer_rotary(self, model_emb: Any) -> Any:
        if self.rope_inv_freq is None or model_emb is None:
            return model_emb
        emb = model_emb[0] if isinstance(model_emb, tuple) else model_emb
        # Same positions as the model's embedding (Megatron slices it for KV-cache decode later),
        # computed as Megatron's RotaryEmbedding.get_emb does: outer(pos, inv_freq), halves repeated.
        inv = self.rope_inv_freq.to(emb.device)
        pos = torch.arange(emb.shape[0], device=emb.device, dtype=inv.dtype)
        freqs = torch.outer(pos, inv)
        return torch.cat((freqs, freqs), dim=-1)[:, None, None, :]

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Any,
        *args: Any,
        rotary_pos_emb: Any = None,
        **kwargs: Any,
    ):
        if args:
            raise TypeError("GemmaSelfAttention takes key_value_states etc. as keywords only")
        out, bias = super().forward(
            hidden_states,
            attention_mask,
            rotary_pos_emb=self._layer_rotary(rotary_pos_emb),
            **kwargs,
        )
        if self.post_layernorm is None:
            return out, bias
        if bias is not None:
            # The norm must see output + bias; Megatron would add the bias after returning.
            raise ValueError("a post-attention norm needs add_bias_linear=False")
        return self.post_layernorm(out), None


class GemmaMLP(MLP):
    """Megatron's MLP (GeGLU through `activation_func`), optionally followed by a norm of its
    reduced output (Gemma 2/3's post-feedforward norm)."""

    def __init__(
        self, config: Any, submodules: Any, *, post_layernorm: type | None = None, **kwargs: Any
    ) -> None:
        super().__init__(config, submodules, **kwargs)
        self.post_layernorm = (
            post_layernorm(
                config=config, hidden_size=config.hidden_size, eps=config.layernorm_epsilon
            )
            if post_layernorm is not None
            else None
        )

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any):
        out, bias = super().forward(hidden_states, *args, **kwargs)
        if self.post_layernorm is None:
            return out, bias
        if bias is not None:
            raise ValueError("a post-MLP norm needs add_bias_linear=False")
        return self.post_layernorm(out), None
