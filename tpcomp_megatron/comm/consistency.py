"""Setup-time check that every rank of a group was given the same compression configuration.

Ranks that disagree (one compresses, another does not; different codecs or calibrations) would
post collectives of different sizes and hang. A digest of the configuration is all-gathered once
at setup, and a mismatch raises on every rank with the ranks' configurations spelled out.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")


def check_same_config(description: str, group=None) -> None:
    """Raise ValueError on every rank unless all ranks of `group` pass the same `description`."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    n = dist.get_world_size(group)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else torch.device("cpu")
    mine = torch.tensor([_digest(description)], dtype=torch.int64, device=device)
    allv = torch.empty(n, dtype=torch.int64, device=device)
    (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(allv, mine, group=group)
    if (allv == mine).all():
        return
    descs: list = [None] * n
    dist.all_gather_object(descs, description, group=group)
    lines = "\n".join(f"  rank {r}: {d}" for r, d in enumerate(descs))
    raise ValueError(
        "ranks of the tensor-parallel group were given different compression configurations; "
        f"pass the same --tp-comm-compression spec and calibration file to every rank:\n{lines}"
    )
