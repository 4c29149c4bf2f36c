"""The Qwen2 / Qwen3 model config: `LlamaModelConfig` plus which Qwen generation it is.

- Qwen2 (and Qwen2.5): Llama's layer with a bias on the q, k and v projections (none on o_proj);
- Qwen3: no biases, an RMSNorm over each query and key head (HF `q_norm` / `k_norm`, Llama's
  arithmetic) before rope, and a head_dim that need not be hidden / heads.

Shapes, padding, head layout (zero query heads get zero bias rows too, replicated KV groups copy
their bias), rope and the tokenizer reference are inherited unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from ..core.config import LlamaModelConfig

QWEN_FORMAT = "tpcomp-qwen-config/1"


@dataclasses.dataclass(frozen=True, kw_only=True)
class QwenModelConfig(LlamaModelConfig):
    """A Qwen2 / Qwen2.5 / Qwen3 dense decoder at one tensor-parallel size."""

    FORMAT: ClassVar[str] = QWEN_FORMAT

    qwen_version: int = 2
    """2 (Qwen2 and Qwen2.5: QKV bias) or 3 (Qwen3: QK-norm, no bias)."""
    hf_architecture: str = "Qwen2ForCausalLM"
    rms_norm_eps: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.qwen_version not in (2, 3):
            raise ValueError(f"qwen_version must be 2 or 3, got {self.qwen_version!r}")

    @property
    def qkv_bias(self) -> bool:
        """Biases on the q, k and v projections (Qwen2)."""
        return self.qwen_version == 2

    @property
    def qk_norm(self) -> bool:
        """Per-head RMSNorm on queries and keys before rope (Qwen3)."""
        return self.qwen_version == 3
