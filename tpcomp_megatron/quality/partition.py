"""Which input columns of a row-parallel linear each tensor-parallel rank holds, as Megatron shards them.

Megatron splits `linear_proj` and `linear_fc2` by input columns (dim 1) into TP equal chunks of the
*padded* global layout that the converter writes (`tpcomp_megatron.convert.mapping`):

* `linear_proj`: one column block of `head_dim` per padded query head, in `HeadLayout` order
  (`plan_head_layout(heads, kv_heads, TP)`); padding heads are zero columns. Rank r holds padded
  heads [r * P / TP, (r + 1) * P / TP), so its partial sum is the sum over the real heads among them.
* `linear_fc2`: the FFN padded with zero columns at the end to a multiple of TP, then chunked.

Zero columns add exactly nothing, so a rank's partial sum only needs its real columns: the
simulated partial sums equal the ones real ranks form (up to the summation order inside a matmul).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models.core.heads import plan_head_layout

KINDS = ("linear_proj", "linear_fc2")


@dataclass(frozen=True, kw_only=True)
class RowParallelShapes:
    """What decides a model's row-parallel split (read from its Hugging Face config)."""

    num_heads: int
    """Query heads."""
    num_kv_heads: int
    """KV heads (query groups)."""
    head_dim: int
    """Width of one head."""
    ffn_hidden_size: int
    """Input width of the MLP's down projection."""

    def __post_init__(self) -> None:
        for name in ("num_heads", "num_kv_heads", "head_dim", "ffn_hidden_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")

    @classmethod
    def from_hf_config(cls, config) -> RowParallelShapes:
        heads = int(config.num_attention_heads)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(num_heads=heads, num_kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
                   head_dim=int(head_dim), ffn_hidden_size=int(config.intermediate_size))


def attention_columns(shapes: RowParallelShapes, tp: int) -> list[torch.Tensor]:
    """For each rank, the `o_proj` input columns (int64, ascending within a head) it holds."""
    layout = plan_head_layout(shapes.num_heads, shapes.num_kv_heads, tp)
    slots = layout.query_sources()
    per_rank = len(slots) // tp
    d = shapes.head_dim
    out = []
    for r in range(tp):
        heads = [h for h in slots[r * per_rank:(r + 1) * per_rank] if h >= 0]
        cols = [torch.arange(h * d, (h + 1) * d) for h in heads]
        out.append(torch.cat(cols) if cols else torch.zeros(0, dtype=torch.int64))
    return out


def mlp_columns(shapes: RowParallelShapes, tp: int) -> list[torch.Tensor]:
    """For each rank, the `down_proj` input columns it holds (padding columns dropped)."""
    f = shapes.ffn_hidden_size
    chunk = -(-f // tp)  # the converter pads the FFN to a multiple of TP
    return [torch.arange(r * chunk, min((r + 1) * chunk, f)) for r in range(tp)]


def rank_columns(kind: str, shapes: RowParallelShapes, tp: int) -> list[torch.Tensor]:
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tensor-parallel size must be a positive integer, got {tp!r}")
    if kind == "linear_proj":
        return attention_columns(shapes, tp)
    if kind == "linear_fc2":
        return mlp_columns(shapes, tp)
    raise ValueError(f"unknown row-parallel layer kind {kind!r}; valid: {list(KINDS)}")
