"""The process-group calls the compressed collectives make, and how their failures read.

Used by the collectives (`collectives.py`, over the kits of `engine.py`), which call the
group's own methods (`gather_into`, `all_to_all_into`): what `torch.distributed`'s functions call
after checking their arguments, checks a kit's buffers pass by construction.
"""

from __future__ import annotations

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

# torch 2.13 renamed all_gather_into_tensor (deprecated alias kept); older torch has only the old name.
all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
all_to_all = dist.all_to_all_single


def _name(*names: str) -> str | None:
    """The first of `names` this torch's ProcessGroup has (torch >= 2.12 names first)."""
    return next((n for n in names if hasattr(dist.ProcessGroup, n)), None)


def _options(cls):
    opts = cls()
    if hasattr(opts, "asyncOp"):
        opts.asyncOp = False
    return opts


# Looked up on the group at each call: a process group written in Python (the stand-in groups of
# testing/onerank.py) overrides them there.
_GATHER = _name("all_gather_single", "_allgather_base")
_ALL_TO_ALL = _name("all_to_all_single", "alltoall_base")
_GATHER_OPTS = _options(c10d.AllgatherOptions)
_ALL_TO_ALL_OPTS = _options(c10d.AllToAllOptions)
_NO_SPLITS: list = []


def gather_into(out, inp, group) -> None:
    """`all_gather(out, inp, group=group)` through the group's method, then waited on as the
    synchronous function waits (`group`: a ProcessGroup holding this rank)."""
    work = getattr(group, _GATHER)(out, inp, _GATHER_OPTS)
    if work is not None:
        work.wait()


def all_to_all_into(out, inp, group) -> None:
    """`all_to_all(out, inp, group=group)` (equal splits) through the group's method, waited on."""
    work = getattr(group, _ALL_TO_ALL)(out, inp, _NO_SPLITS, _NO_SPLITS, _ALL_TO_ALL_OPTS)
    if work is not None:
        work.wait()


if _GATHER is None or _ALL_TO_ALL is None:  # a torch without them: the public functions
    def gather_into(out, inp, group) -> None:  # noqa: F811
        all_gather(out, inp, group=group)

    def all_to_all_into(out, inp, group) -> None:  # noqa: F811
        all_to_all(out, inp, group=group)


def gather_fn(traced: bool):
    """The all-gather of `run`: the group's method (`gather_into`), or traced by torch.compile the
    public function, which Dynamo knows."""
    return all_gather if traced else gather_into


def all_to_all_fn(traced: bool):
    """The all-to-all of `run` (equal splits), as `gather_fn`."""
    return all_to_all if traced else all_to_all_into


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
