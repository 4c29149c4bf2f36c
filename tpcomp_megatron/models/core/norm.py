"""RMSNorm for Megatron layer specs: Hugging Face Llama's arithmetic, sequence-parallel aware.

The local spec's `WrappedTorchNorm` refuses `sequence_parallel=True`. Under sequence parallelism
each rank normalizes its own slice of tokens with a replicated weight, and Megatron all-reduces the
gradients of parameters marked `sequence_parallel`; this module sets that mark. The forward matches
`LlamaRMSNorm` (fp32 statistics, cast back, then scale) so converted checkpoints reproduce HF logits.
"""

from __future__ import annotations

from typing import Any

import torch


class RMSNorm(torch.nn.Module):
    """`weight * x / sqrt(mean(x^2) + eps)`, statistics in fp32; the signature Megatron builds with."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **kwargs: Any) -> None:
        super().__init__()
        if hidden_size <= 0:
            raise ValueError(f"RMSNorm hidden_size must be positive, got {hidden_size}")
        self.eps = float(eps)
        device = "cpu" if getattr(config, "use_cpu_initialization", True) else None
        dtype = getattr(config, "params_dtype", torch.float32)
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))
        # Megatron's grad reduction for sequence-parallel regions looks for this attribute.
        self.weight.sequence_parallel = bool(getattr(config, "sequence_parallel", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(in_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
