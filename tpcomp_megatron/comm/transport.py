"""The process-group calls the compressed collectives make, and how their failures read.

Shared by the general path (`collectives.py`) and its replays (`replay.py`).
"""

from __future__ import annotations

import torch.distributed as dist

# torch 2.13 renamed all_gather_into_tensor (deprecated alias kept); older torch has only the old name.
all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
all_to_all = dist.all_to_all_single


class CollectiveError(RuntimeError):
    """A collective failed or timed out; usually a peer rank died or diverged."""


def run(what: str, group, fn, *args, **kwargs):
    """`fn(*args, group=group)`, its failure raised as a `CollectiveError` naming `what`."""
    try:
        return fn(*args, group=group, **kwargs)
    except RuntimeError as e:  # gloo/NCCL errors (DistBackendError, timeouts) are RuntimeErrors
        raise CollectiveError(
            f"compressed {what} over a group of {dist.get_world_size(group)} ranks failed on rank "
            f"{dist.get_rank(group)} (a peer may have died, diverged or timed out): {e}"
        ) from e


_SOURCES: dict = {}


def sources(n: int, source: int | None = None) -> tuple:
    """(0, ..., n-1), or `source` n times: the payloads' sources (cached: a call builds none)."""
    key = (n, source)
    got = _SOURCES.get(key)
    if got is None:
        got = _SOURCES[key] = tuple(range(n)) if source is None else (source,) * n
    return got


def ring_bytes(nbytes: int, n: int, op: str) -> int:
    """Bytes each rank sends in a ring algorithm for a message of `nbytes` (the full tensor)."""
    return nbytes * 2 * (n - 1) // n if op == "all_reduce" else nbytes * (n - 1) // n
