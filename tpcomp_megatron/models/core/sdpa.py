"""A core-attention module for the local spec that calls PyTorch's fused SDPA (flash on GPU).

Megatron's local `DotProductAttention` materializes [b, heads, s, s] scores with an unfused
softmax: correct, but at long prompts its time hides what communication costs. Timing studies
(tools/bench_ttft.py) and GPU runs without Transformer Engine use this instead. It handles the
causal prefill (sq == sk) and decode (sq == 1) of `greedy_generate`; anything else (masks, sliding
windows, soft-capped scores, softmax offsets, packed sequences, chunked prefill) is passed to the
parent unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention


class SDPADotProductAttention(DotProductAttention):
    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None, **kwargs):
        sq, sk = query.shape[0], key.shape[0]
        window = getattr(self.scale_mask_softmax, "window_size", None)
        capped = getattr(self.scale_mask_softmax, "softcap", None)  # Gemma 2's soft-capped scores
        if (attention_mask is not None or attention_bias is not None or packed_seq_params is not None
                or kwargs or window is not None or capped is not None or self.softmax_offset is not None
                or (sq != sk and sq != 1)
                or self.training and self.attention_dropout.p > 0):
            return super().forward(query, key, value, attention_mask, attn_mask_type, attention_bias, packed_seq_params)
        # [s, b, heads, hn] -> [b, heads, s, hn]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        ctx = F.scaled_dot_product_attention(q, k, v, is_causal=sq == sk and sq > 1, scale=self.softmax_scale,
                                             enable_gqa=q.shape[1] != k.shape[1])
        return ctx.permute(2, 0, 1, 3).reshape(sq, ctx.shape[0], self.hidden_size_per_partition)


def use_sdpa(layer_spec):
    """Layer-spec transform (for `build_gpt_model(layer_spec_transform=...)`): SDPA core attention."""
    layer_spec.submodules.self_attention.submodules.core_attention = SDPADotProductAttention
    return layer_spec
