"""Small Gemma pieces megatron-core's local spec lacks: the zero-centered RMSNorm, tanh-GeGLU's
activation, tanh soft-capping, the sqrt(hidden)-scaled embedding and the soft-capped output layer.

megatron-core has a zero-centered norm only in its Transformer Engine / Apex paths (the local
`WrappedTorchNorm` refuses `layernorm_zero_centered_gamma`), and its GLU takes any activation
function, so tanh-GeGLU needs only `gelu_tanh` here. The arithmetic of each piece follows Hugging
Face's Gemma modules operation by operation, so converted checkpoints reproduce HF logits.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.language_model_embedding import (
    LanguageModelEmbedding,
)
from megatron.core.tensor_parallel.layers import ColumnParallelLinear

from ..core.norm import RMSNorm


class ZeroCenteredRMSNorm(RMSNorm):
    """Gemma's RMSNorm: `x / rms(x) * (1 + w)`, everything in fp32, cast back at the end.

    The stored weight `w` is zero-centered (Hugging Face and Megatron's `zero_centered_gamma`
    store the same tensor), so checkpoints map one to one. Unlike Llama's norm, Gemma multiplies
    by the weight before the cast back (HF PR 29402), which matters in bf16.
    """

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-6, **kwargs: Any) -> None:
        super().__init__(config, hidden_size, eps, **kwargs)
        with torch.no_grad():
            self.weight.zero_()  # (1 + 0): the identity scale, as HF initializes it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata=None):
        """Replicated over TP, as Megatron's default for plain modules; defined here because
        Megatron's MLP asks every child for this method (the post-MLP norm lives there)."""
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            make_sharded_tensors_for_checkpoint,
        )

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True),
            prefix,
            {},
            sharded_offsets,
            dp_cp_group=metadata["dp_cp_group"],
        )


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation: HF's `gelu_pytorch_tanh` (Megatron's GLU gates with it)."""
    return F.gelu(x, approximate="tanh")


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """`cap * tanh(x / cap)`, in HF's operation order (divide, tanh, multiply)."""
    return torch.tanh(x / cap) * cap


class ScaledLanguageModelEmbedding(LanguageModelEmbedding):
    """Megatron's embedding times `embedding_scale` (sqrt(hidden) for Gemma).

    The scale is rounded to the weight's dtype before multiplying, as HF does: in bf16,
    sqrt(3072) = 55.43 becomes 55.5, and the checkpoint was trained with that.
    """

    embedding_scale: float = 1.0

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, tokentype_ids=None):
        out = super().forward(input_ids, position_ids, tokentype_ids)
        w = self.word_embeddings.weight
        scale = torch.tensor(self.embedding_scale, dtype=torch.float32, device=out.device)
        return out * scale.to(w.dtype)


class SoftcappedColumnParallelLinear(ColumnParallelLinear):
    """The output layer with tanh soft-capping of its logits (Gemma 2: 30).

    Soft-capping is elementwise, so it is the same on a rank's vocab shard as on gathered logits,
    and zero-padded vocab rows stay at logit 0.
    """

    logit_softcap: float | None = None

    def forward(self, input_: torch.Tensor, weight=None, runtime_gather_output=None):
        logits, bias = super().forward(input_, weight, runtime_gather_output)
        if self.logit_softcap is not None:
            logits = softcap(logits, self.logit_softcap)
        return logits, bias


def install_embedding_scale(model: torch.nn.Module, scale: float) -> None:
    """Make a built GPTModel's embedding scale its output (class swap; the subclass adds no state)."""
    emb = getattr(model, "embedding", None)
    if emb is None:
        return  # not the first pipeline stage
    if type(emb) not in (LanguageModelEmbedding, ScaledLanguageModelEmbedding):
        raise TypeError(
            f"expected Megatron's LanguageModelEmbedding, got {type(emb).__name__}; update "
            "tpcomp_megatron/models/gemma/layers.py for this megatron-core"
        )
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"embedding scale must be a positive number, got {scale}")
    emb.__class__ = ScaledLanguageModelEmbedding
    emb.embedding_scale = float(scale)


def install_logit_softcap(model: torch.nn.Module, cap: float | None) -> None:
    """Make a built GPTModel's output layer soft-cap its logits (None: no cap)."""
    out = getattr(model, "output_layer", None)
    if out is None or cap is None:
        return
    if type(out) not in (ColumnParallelLinear, SoftcappedColumnParallelLinear):
        raise TypeError(
            f"expected Megatron's ColumnParallelLinear output layer, got {type(out).__name__}"
        )
    out.__class__ = SoftcappedColumnParallelLinear
    out.logit_softcap = float(cap)
