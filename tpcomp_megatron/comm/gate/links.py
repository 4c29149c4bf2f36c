"""The link a group's collectives travel over: its class, its speed, and whether symmetric memory
can serve it. Read by the gate's thresholds, its measured tables' keys and the collectives'
transport choice."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

LINKS = ("nvlink", "pcie_class", "network_class", "cpu")
LINK_BYTES_PER_S = {"nvlink": 169e9, "pcie_class": 26e9, "network_class": 3.6e9, "cpu": 3.6e9}
"""bf16 all-reduce message bytes per second of each link class, world size 2, 2048 x 5120
(../shared/links/h200x2_2026-11-23.json: 0.124 / 0.802 / 5.76 ms for 21 MB); cpu (gloo) taken as
the network class."""


def detect_link() -> str:
    """The link class NCCL will use between this host's GPUs, from its settings and the hardware."""
    if not torch.cuda.is_available():
        return "cpu"
    if os.environ.get("NCCL_P2P_DISABLE", "0") == "1":
        return "network_class" if os.environ.get("NCCL_SHM_DISABLE", "0") == "1" else "pcie_class"
    n = torch.cuda.device_count()
    if n > 1 and torch.cuda.can_device_access_peer(0, 1):
        return "nvlink"  # peer access without NVLink (PCIe P2P) is rare on servers; override if so
    return "pcie_class"


def symm_mem_available(group) -> str | None:
    """Why symmetric memory cannot serve `group`, or None when it can."""
    if not torch.cuda.is_available():
        return "no CUDA"
    if dist.get_backend(group) != "nccl":
        return "process group is not NCCL"
    try:  # (imported under another name: a bare `import torch.x` would make `torch` local here)
        import torch.distributed._symmetric_memory as _symm  # noqa: F401
    except ImportError:
        return "this torch has no symmetric memory"
    return None
