"""Attention head layout when head counts do not divide the tensor-parallel size.

Megatron's `linear_qkv` splits by query group, so it needs `groups % TP == 0` (and then
`heads % TP == 0` follows). When a model's KV groups do not divide TP we change the layout, never
the function:

- replicate a KV group `r` times; the group's query heads are dealt out over its replicas, and
  where they do not split evenly a replica gets zero query heads (zero rows in `linear_qkv`, zero
  columns in `linear_proj`) that add exactly nothing to the output;
- or append `d` dummy groups whose q, k, v and output columns are all zero.

`plan_head_layout` picks the (r, d) with the fewest padded query heads (compute), then the fewest
groups (KV cache and bytes). The maps from padded slots back to original heads are what the
converter and its reverse use.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeadLayout:
    """How the original heads sit in Megatron's padded, TP-divisible layout."""

    num_heads: int
    """Original query heads."""
    num_kv_heads: int
    """Original KV heads (query groups)."""
    kv_replication: int = 1
    """Each original KV group appears this many times in a row."""
    dummy_groups: int = 0
    """All-zero groups appended after the replicated ones."""

    def __post_init__(self) -> None:
        if self.num_heads <= 0 or self.num_kv_heads <= 0:
            raise ValueError(
                f"head counts must be positive, got num_heads={self.num_heads}, "
                f"num_kv_heads={self.num_kv_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads="
                f"{self.num_kv_heads}; grouped-query attention needs equal groups"
            )
        if self.kv_replication < 1 or self.dummy_groups < 0:
            raise ValueError(
                f"kv_replication must be >= 1 and dummy_groups >= 0, got "
                f"{self.kv_replication} and {self.dummy_groups}"
            )

    @property
    def heads_per_group(self) -> int:
        """Original query heads per KV group."""
        return self.num_heads // self.num_kv_heads

    @property
    def padded_heads_per_group(self) -> int:
        """Query heads per group in the padded layout (real ones first, zeros after)."""
        return math.ceil(self.heads_per_group / self.kv_replication)

    @property
    def padded_num_kv_heads(self) -> int:
        return self.num_kv_heads * self.kv_replication + self.dummy_groups

    @property
    def padded_num_heads(self) -> int:
        return self.padded_num_kv_heads * self.padded_heads_per_group

    @property
    def is_identity(self) -> bool:
        return self.kv_replication == 1 and self.dummy_groups == 0

    def kv_sources(self) -> list[int]:
        """For each padded group, the original KV head it copies, or -1 for a dummy group."""
        real = [g for g in range(self.num_kv_heads) for _ in range(self.kv_replication)]
        return real + [-1] * self.dummy_groups

    def query_sources(self) -> list[int]:
        """For each padded query head, the original query head it holds, or -1 for a zero head."""
        q, qp, r = self.heads_per_group, self.padded_heads_per_group, self.kv_replication
        out: list[int] = []
        for g in range(self.num_kv_heads):
            for j in range(r):
                for s in range(qp):
                    local = j * qp + s
                    out.append(g * q + local if local < q else -1)
        return out + [-1] * (self.dummy_groups * qp)

    def check_divides(self, tp: int) -> None:
        """Raise ValueError when this layout cannot be split over `tp` ranks."""
        if self.padded_num_kv_heads % tp:
            raise ValueError(
                f"{self.padded_num_kv_heads} query groups do not split over TP={tp}; convert the "
                f"checkpoint for this TP size (tpcomp-convert --tp {tp})"
            )


def plan_head_layout(num_heads: int, num_kv_heads: int, tp: int) -> HeadLayout:
    """The layout with the fewest padded query heads, then the fewest groups, for TP=`tp`."""
    if tp < 1:
        raise ValueError(f"tensor-parallel size must be >= 1, got {tp}")
    base = HeadLayout(num_heads=num_heads, num_kv_heads=num_kv_heads)
    if num_kv_heads % tp == 0:
        return base
    # r = tp with d = 0 always divides, so the search below always finds a layout.
    candidates = [
        HeadLayout(num_heads=num_heads, num_kv_heads=num_kv_heads, kv_replication=r, dummy_groups=d)
        for r in range(1, tp + 1)
        for d in range(tp)
        if (num_kv_heads * r + d) % tp == 0
    ]
    return min(
        candidates, key=lambda c: (c.padded_num_heads, c.padded_num_kv_heads, c.kv_replication)
    )
