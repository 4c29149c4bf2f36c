"""Helpers for tests and tools that need real `torch.distributed` ranks on one machine."""

from .dist import run_ranks

__all__ = ["run_ranks"]
